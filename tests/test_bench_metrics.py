"""The freshness figures the benchmarks print come from the worker's Prometheus histogram: quantiles as
bucket upper bounds, and the share of refreshes within a bucket bound."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streams.bench import histogram_quantiles, histogram_share


def _scrape(values: list[float]) -> str:
    registry = CollectorRegistry()
    h = Histogram("f_seconds", "test", buckets=(0.5, 1, 1.5, 5), registry=registry)
    for v in values:
        h.observe(v)
    return generate_latest(registry).decode()


def test_quantiles_and_share_read_the_cumulative_buckets():
    text = _scrape([0.2] * 90 + [0.8] * 8 + [1.2] * 2)  # 98 % within 1 s
    assert histogram_quantiles(text, "f_seconds", (0.5, 0.95, 0.99)) == {0.5: 0.5, 0.95: 1.0, 0.99: 1.5}
    assert histogram_share(text, "f_seconds", 1.0) == 0.98
    assert histogram_share(text, "f_seconds", 0.5) == 0.9
    assert math.isnan(histogram_share(text, "f_seconds", 0.7))  # not a bucket bound
    assert math.isnan(histogram_share(_scrape([]), "f_seconds", 1.0))  # nothing observed
