"""Event → vector latency per event, for ``mirstream bench freshness`` (benchmark tooling, no worker imports it).

The worker's ``mirstream_freshness_seconds`` histogram is observed once per refinement, from the newest
event it reflects.  A user who keeps sending events looks fresh by it even while each of its events
waited in the queue, and a refinement that reflects 20 events counts once.  This module measures what
a user of the served vectors sees: for every event sent, the time until vectors that reflect it were
written.  Send times are taken by the producer (``replay.send_events``); refinements are read back from
the interests topic the worker emits to (``seq``, ``updated_at`` per refinement).  A user's j-th event
counts as reflected by the first refinement whose ``seq`` is at least j (events of one user that arrive
on different scenario topics may be applied a batch apart, so that order is the send order only up to
one batch).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np
import orjson
from kafka import KafkaConsumer, TopicPartition

from streams.security import kafka_python_config
from streams.settings import Settings


def group(users: np.ndarray, times: np.ndarray) -> dict[str, np.ndarray]:
    """Per user, its entries of ``times`` in their order (``users[i]`` owns ``times[i]``)."""
    order = np.argsort(users, kind="stable")
    names, starts = np.unique(users[order], return_index=True)
    return {str(u): t for u, t in zip(names, np.split(times[order], starts[1:]), strict=True)}


def event_latencies(sent: dict[str, np.ndarray], refreshed: dict[str, list[tuple[int, float]]]) -> np.ndarray:
    """Seconds from each event's send to the first refinement that reflects it (inf: none did).

    ``sent``: per user, its events' send times in send order; ``refreshed``: per user, (seq, written at)
    of each refinement, in any order."""
    out = []
    for user, times in sent.items():
        times = np.asarray(times, dtype=np.float64)
        done = sorted(refreshed.get(user, ()), key=lambda r: r[1])
        at = np.asarray([t for _, t in done], dtype=np.float64)
        seqs = np.asarray([s for s, _ in done], dtype=np.int64)
        reach = np.maximum.accumulate(seqs) if done else seqs  # the seq reached by each refinement's time
        first = np.searchsorted(reach, np.arange(1, len(times) + 1), side="left")  # first refinement with seq >= j
        covered = first < len(at)
        lat = np.full(len(times), np.inf)
        lat[covered] = at[first[covered]] - times[covered]
        out.append(lat)
    return np.concatenate(out) if out else np.zeros(0)


def summary(latencies: np.ndarray) -> dict[str, float]:
    """p50 / p95 / p99 (exact, seconds; inf when more than that share was never reflected) and the share
    of events reflected within 1 s."""
    if not len(latencies):
        return {"p50_s": float("nan"), "p95_s": float("nan"), "p99_s": float("nan"), "within_1s": float("nan")}
    qs = np.quantile(latencies, [0.5, 0.95, 0.99], method="higher")
    return {
        "p50_s": float(qs[0]),
        "p95_s": float(qs[1]),
        "p99_s": float(qs[2]),
        "within_1s": float(np.mean(latencies <= 1.0)),
    }


def read_refinements(settings: Settings, timeout_s: float = 900.0) -> dict[str, list[tuple[int, float]]]:
    """Every refinement on the interests topic so far: per user, (seq, updated_at)."""
    topic = settings.interests_topic
    consumer = KafkaConsumer(**kafka_python_config(settings), enable_auto_commit=False, consumer_timeout_ms=2000)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: dict[str, list[tuple[int, float]]] = defaultdict(list)
        deadline = time.monotonic() + timeout_s
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the interests topic {topic} was not read to its end in {timeout_s:g} s")
            for records in consumer.poll(timeout_ms=1000, max_records=5000).values():
                for msg in records:
                    body = orjson.loads(msg.value)
                    out[body["user_id"]].append((int(body["seq"]), float(body["updated_at"])))
        return dict(out)
    finally:
        consumer.close()
