"""Retrieval for a user: a faiss index over every item's retrieval vector, queried with the user's K vectors.

The index is built from the items ``state.store.InterestReader`` lists (each one's ``ret`` vector) and
rebuilt by ``refresh()`` when the item count changed: a service calls ``refresh()`` on a timer, or after
reading ``<prefix>.items``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from models.metrics import item_index
from streams.security import interest_reader
from streams.settings import Settings


@dataclass(frozen=True)
class Hit:
    item_id: str
    score: float
    interest: int
    title: str


class ItemSearch:
    def __init__(self, settings: Settings) -> None:
        self.reader = interest_reader(settings)
        self.ids: list[str] = []
        self.index = None
        self.refresh()

    def refresh(self) -> bool:
        """Rebuilds the index when items were added; returns whether it did."""
        if self.index is not None and self.reader.item_count() == len(self.ids):
            return False
        self.ids, vectors = self.reader.item_vectors()
        self.index = item_index(vectors) if len(self.ids) else None
        return True

    def for_user(self, user: str, scenario: str | None = None, k: int = 20) -> list[Hit]:
        vecs, _ = self.reader.get_user_interests(user, scenario)
        if self.index is None:
            return []
        scores, ids = self.index.search(np.ascontiguousarray(vecs, dtype=np.float32), min(k, len(self.ids)))
        best: dict[int, tuple[float, int]] = {}
        for interest in range(len(vecs)):
            for j, s in zip(ids[interest].tolist(), scores[interest].tolist(), strict=True):
                if j >= 0 and s > best.get(j, (-np.inf, 0))[0]:
                    best[j] = (s, interest)
        top = sorted(best.items(), key=lambda kv: -kv[1][0])[:k]
        titles = self.reader.item_titles([self.ids[j] for j, _ in top])
        return [Hit(self.ids[j], s, i, t) for (j, (s, i)), t in zip(top, titles, strict=True)]
