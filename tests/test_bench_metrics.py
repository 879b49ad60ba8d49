"""The figures the benchmarks print: the worker's Prometheus histogram (quantiles as bucket upper bounds,
the share of refreshes within a bucket bound), the per-event latency (``streams.latency``), and a reader's
CPU per event (``streams.ceilings.Span``, ``WorkerProcess.cpu_seconds``)."""

from __future__ import annotations

import math
import os
import time

import numpy as np
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from streams.bench import histogram_quantiles, histogram_share
from streams.ceilings import Span
from streams.latency import event_latencies, group, summary
from streams.workerproc import _cpu


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


def test_per_event_latency_is_the_first_refinement_that_covers_each_event():
    """A user's j-th event waits for the first refinement with seq >= j, whatever order the refinements
    are listed in; a refinement with a lower seq written later covers nothing new; an event no
    refinement covers never counts as reflected."""
    sent = {"a": np.array([0.0, 1.0, 2.0]), "b": np.array([5.0]), "c": np.array([7.0])}
    refreshed = {"a": [(3, 4.0), (1, 0.5), (0, 3.0)], "b": [(1, 5.25)]}  # "c": never refined
    lat = event_latencies(sent, refreshed)
    assert lat[:4].tolist() == [0.5, 3.0, 2.0, 0.25] and math.isinf(lat[4])
    s = summary(lat)
    assert s["within_1s"] == 0.4 and s["p50_s"] == 2.0 and math.isinf(s["p99_s"])
    grouped = group(np.array(["b", "a", "b", "a"]), np.array([1.0, 2.0, 3.0, 4.0]))
    assert {u: t.tolist() for u, t in grouped.items()} == {"a": [2.0, 4.0], "b": [1.0, 3.0]}


def test_cpu_per_event_counts_the_events_after_the_first_batch() -> None:
    """As events/s: the first batch (its start-up) is left out, the CPU from its end to the last event's."""
    span = Span()
    span.note(100, now=1.0, cpu=2.0)  # the first batch, whatever it cost
    span.note(300, now=2.0, cpu=2.5)
    span.note(200, now=3.0, cpu=3.0)
    assert span.per_s == 250 and math.isclose(span.cpu_us_per_event, 1e6 / 500)
    assert math.isnan(Span().cpu_us_per_event)


def test_a_process_cpu_time_read_from_proc_is_its_own() -> None:
    """``/proc/<pid>/stat`` user + system time of this process tracks ``time.process_time`` (clock ticks apart)."""
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert abs(_cpu(os.getpid()) - time.process_time()) < 3 * tick + 0.05 and _cpu(2**22 + 7) == 0.0
