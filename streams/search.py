"""Retrieval for a user: a faiss index over every item's retrieval vector, queried with the user's K vectors.

The index is built from the items ``state.store.InterestReader`` lists (each one's ``ret`` vector) and
rebuilt by ``refresh()`` when the item count changed: a service calls ``refresh()`` on a timer, or after
reading ``<prefix>.items``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from models.metrics import item_index
from state.store import InterestReader
from state.trend import with_trend_column
from streams.security import interest_reader
from streams.settings import Settings


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    interest: int
    title: str


def index_vectors(reader: InterestReader, at: float | None = None) -> tuple[list[str], np.ndarray]:
    """Every item's row of the retrieval index: its stored ``ret``, plus, when a trend model's worker
    counts item trends, the trend coordinate read at ``at`` (None: the newest counted event time, the
    stream's own clock), so a user's (d + 1)-vectors score ``u · ret + w · trend``."""
    ids, vectors = reader.item_vectors()
    tau = reader.trend_tau()
    if tau is None or not ids:
        return ids, vectors
    count, last = reader.item_trend(ids)
    return ids, with_trend_column(vectors, count, last, tau, at)


class ItemSearch:
    def __init__(self, settings: Settings, at: float | None = None, trend_max_age_s: float = 10.0) -> None:
        self.reader = interest_reader(settings)
        self.at = at
        self.trend_max_age_s = trend_max_age_s
        self.ids: list[str] = []
        self.index = None
        self.built = 0.0
        self.refresh()

    def refresh(self, force: bool = False) -> bool:
        """Rebuilds the index when items were added, or the trend coordinates are older than
        ``trend_max_age_s`` (they move with every event); returns whether it did."""
        if not force and self.index is not None and self.reader.item_count() == len(self.ids):
            old = time.monotonic() - self.built > self.trend_max_age_s
            if not (old and self.reader.trend_tau() is not None):
                return False
        self.ids, vectors = index_vectors(self.reader, self.at)
        self.index = item_index(vectors) if len(self.ids) else None
        self.built = time.monotonic()
        return True

    def for_user(self, user: str, scenario: str | None = None, k: int = 20) -> list[Hit]:
        vecs, _ = self.reader.get_user_interests(user, scenario)
        if self.index is None:
            return []
        if vecs.shape[1] != self.index.d:
            raise ValueError(
                f"user {user!r} has {vecs.shape[1]}-d vectors but the item index is {self.index.d}-d "
                "(vectors of another model version; wait for the roll-out or pin a version)"
            )
        scores, ids = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), min(k, len(self.ids)))
        best: dict[int, tuple[float, int]] = {}
        for interest in range(len(vecs)):
            for j, s in zip(ids[interest].tolist(), scores[interest].tolist(), strict=True):
                if j >= 0 and s > best.get(j, (-np.inf, 0))[0]:
                    best[j] = (s, interest)
        top = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
        titles = self.reader.item_titles([self.ids[j] for j, _ in top])
        return [Hit(self.ids[j], s, i, t) for (j, (s, i)), t in zip(top, titles, strict=True)]
