"""The stream page's numbers: a small in-process ring buffer of this worker's metrics, sampled every few
seconds, turned into rates and percentiles over the last minutes.

Why a ring buffer and not Prometheus: the page must work with nothing but the worker (no second server,
no scraper), and counters alone give totals, not "events/s over the last minutes".  Each sample reads
the worker's own Prometheus registry (``streams.metrics``) and the refinement queue depth from Redis; it
is one worker's view (each worker of a group shows its own partitions' events and lag).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass

from state.store import StreamStore
from streams import metrics
from streams.retry import is_transient
from streams.settings import Settings

EVERY_S = 2.0  # one sample this often
KEEP_S = 600.0  # samples kept
WINDOW_S = 30.0  # freshness percentiles: observations of this trailing window


@dataclass(frozen=True)
class Sample:
    t: float
    events: dict[str, float]  # scenario → events applied (counter)
    lag: dict[str, float]  # "topic[partition]" → lag
    queue: int | None  # users waiting for refinement (None: Redis did not answer)
    buckets: tuple[tuple[float, float], ...]  # freshness histogram: (upper bound, cumulative count)


def _samples(metric) -> list:
    return [s for family in metric.collect() for s in family.samples]


def read_metrics() -> tuple[dict[str, float], dict[str, float], tuple[tuple[float, float], ...], dict[str, float]]:
    """Events per scenario, lag per partition, freshness buckets, dead letters per source: now."""
    events = {s.labels["scenario"]: s.value for s in _samples(metrics.EVENTS) if s.name.endswith("_total")}
    lag = {f"{s.labels['topic']}[{s.labels['partition']}]": s.value for s in _samples(metrics.LAG)}
    buckets = tuple((float(s.labels["le"]), s.value) for s in _samples(metrics.FRESHNESS) if s.name.endswith("_bucket"))
    dead = {s.labels["source"]: s.value for s in _samples(metrics.DEADLETTER) if s.name.endswith("_total")}
    return events, lag, buckets, dead


def quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: linear inside the bucket (None without observations)."""
    total = buckets[-1][1] if buckets else 0.0
    if total <= 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower  # beyond the largest bound: the bound is all we know
            inside = count - below
            return lower + (upper - lower) * ((rank - below) / inside if inside else 1.0)
        lower, below = upper, count
    return lower


class StreamSamples:
    def __init__(self, settings: Settings, store: StreamStore, keep_s: float = KEEP_S) -> None:
        self.settings = settings
        self.store = store
        self.samples: deque[Sample] = deque(maxlen=int(keep_s / EVERY_S) + 1)
        self.deadletters: deque[dict] = deque(maxlen=8)

    def note_deadletter(self, reason: str, source: str, topic: str) -> None:
        """Called for every dead letter the worker sends: the page lists the last few reasons."""
        self.deadletters.append({"at": time.time(), "reason": reason, "source": source, "topic": topic})

    async def sample(self) -> None:
        events, lag, buckets, _ = read_metrics()
        inputs = {*(self.settings.events_topic(s) for s in self.settings.scenarios), self.settings.items_topic}
        lag = {  # our input topics (not Faust's own), named without the deployment's prefix
            k.removeprefix(f"{self.settings.prefix}."): v for k, v in lag.items() if k.rsplit("[", 1)[0] in inputs
        }
        try:
            queue: int | None = await asyncio.wait_for(
                self.store.dirty_count(range(self.settings.partitions)), timeout=1.0
            )
        except Exception as exc:
            if not is_transient(exc) and not isinstance(exc, asyncio.TimeoutError):
                raise
            queue = None
        self.samples.append(Sample(time.time(), events, lag, queue, buckets))

    def series(self, window_s: float = WINDOW_S) -> dict:
        """The page's document: per sample time, events/s per scenario, lag per partition, queue depth and
        freshness p50/p99 over the trailing ``window_s``; dead-letter totals and the last reasons."""
        s = list(self.samples)
        _, _, _, dead = read_metrics()
        out: dict = {"t": [], "events_per_s": {}, "lag": {}, "queue": [], "fresh_p50": [], "fresh_p99": []}
        scenarios = sorted({k for x in s for k in x.events} | set(self.settings.scenarios))
        parts = sorted({k for x in s for k in x.lag})
        for name in scenarios:
            out["events_per_s"][name] = []
        for name in parts:
            out["lag"][name] = []
        j = 0  # start of the freshness window
        for i in range(1, len(s)):
            cur, prev = s[i], s[i - 1]
            dt = max(cur.t - prev.t, 1e-6)
            out["t"].append(cur.t)
            for name in scenarios:
                rate = (cur.events.get(name, 0.0) - prev.events.get(name, 0.0)) / dt
                out["events_per_s"][name].append(max(0.0, rate))
            for name in parts:
                out["lag"][name].append(cur.lag.get(name))
            out["queue"].append(cur.queue)
            while s[j].t < cur.t - window_s and j < i - 1:
                j += 1
            old = dict(s[j].buckets)
            delta = [(le, n - old.get(le, 0.0)) for le, n in cur.buckets]
            out["fresh_p50"].append(quantile(0.5, delta))
            out["fresh_p99"].append(quantile(0.99, delta))
        out["deadletter_total"] = sum(dead.values())
        out["deadletter_by_source"] = dead
        out["deadletter_last"] = list(self.deadletters)[::-1]
        out["now"] = time.time()
        out["window_s"] = window_s
        return out
