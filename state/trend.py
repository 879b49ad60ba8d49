"""Item trend counts: an exponentially decayed count of each item's events, kept fresh by the stream.

Per item the store keeps ``tc`` (the decayed count at time ``tt``) and ``tt`` (the newest event time
counted).  An event at time t adds ``exp(-(tt - t) / τ)`` to the count at ``tt`` (moving ``tt`` up to t
first when it is newer), so the pair always equals ``Σ exp(-(tt - t_i) / τ)`` over the counted events,
in any arrival order.  Read at time ``at`` it gives ``log(1 + tc · exp(-(at - tt) / τ))``: the trend
coordinate the retrieval index carries (``models.temporal.trend_feature`` computes the same from a
dataset, which is how training sees it without leakage).

Each event is counted once: the scenario agents count the events a batch applies, per (item, topic,
partition) in offset order, and the item hash keeps the highest offset counted per (topic, partition)
(``tm:<topic>:<partition>``), so a redelivered batch or a second worker replaying the same offsets adds
nothing.  ``state.scripts.TREND_ADD`` does this atomically in Redis; ``fold`` is its reference.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

COUNT = "tc"
TIME = "tt"


def mark(topic: str, partition: int) -> str:
    """The item-hash field with the highest offset of (topic, partition) counted in the item's trend."""
    return f"tm:{topic}:{partition}"


def fold(
    count: float, last: float | None, counted: int, events: Iterable[tuple[int, float]], tau_s: float
) -> tuple[float, float | None, int, int]:
    """Adds ``events`` ((offset, ts), offset order) above offset ``counted``; returns the new
    (count, last time, counted offset, events added).  ``last`` None: nothing counted yet."""
    added = 0
    for offset, ts in events:
        if offset <= counted:
            continue
        if last is None:
            count, last = 1.0, ts
        elif ts >= last:
            count, last = count * math.exp(-(ts - last) / tau_s) + 1.0, ts
        else:
            count += math.exp(-(last - ts) / tau_s)
        counted, added = offset, added + 1
    return count, last, counted, added


def trend_at(count: np.ndarray, last: np.ndarray, at: float, tau_s: float) -> np.ndarray:
    """The trend coordinate log(1 + decayed count) of each item at time ``at`` (0 for uncounted items:
    pass count 0).  Reads before an item's last counted event are clamped to it (no growth backwards)."""
    count = np.asarray(count, np.float64)
    age = np.maximum(at - np.asarray(last, np.float64), 0.0)
    return np.log1p(count * np.exp(-age / tau_s)).astype(np.float32)


def with_trend_column(vectors: np.ndarray, count: np.ndarray, last: np.ndarray, tau_s: float, at: float | None = None):
    """Index rows: each item's stored ``ret`` plus its trend coordinate read at ``at`` (None: the newest
    counted event time, the stream's own clock)."""
    when = float(np.max(last)) if at is None else float(at)
    return np.concatenate([vectors, trend_at(count, last, when, tau_s)[:, None]], 1)
