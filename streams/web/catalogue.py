"""The item catalogue as the pages need it: titles, a faiss index over the retrieval vectors, code → item.

Why in the worker: the pages answer "which items does this vector point at" and "which item was this
history record", and both need every item.  Loaded from Redis once and reloaded when the item count
changes (checked at most every ``check_every_s``), like ``streams.search.ItemSearch`` but async, so a
page never blocks the worker's event loop (the index is built in a thread).  A catalogue of millions of
items belongs in a retrieval service, not in each worker's memory: this is a look-inside tool.

History records hold an item's codes (codes + α bytes of the history's codebook), not its id; the same
bytes are stored on the item (``code:<codebook>``), so an exact match names the item.  Two items with
identical codes are both listed; an item re-stored with new content since the event no longer matches.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from models.metrics import item_index
from state import trend
from state.keys import Keys
from state.store import AsyncInterestReader


@dataclass
class Snapshot:
    ids: list[str]
    titles: list[str]
    vectors: np.ndarray  # (n, d) float32 retrieval vectors
    index: object | None  # faiss.IndexFlatIP over ``vectors``
    by_code: dict[str, dict[bytes, list[int]]] = field(default_factory=dict)  # codebook → codes → rows

    def nearest(self, vectors: np.ndarray, n: int) -> list[list[tuple[int, float]]]:
        """Per query vector, its ``n`` best items (row, inner product); [] when the dimensions differ."""
        if self.index is None or vectors.shape[1] != self.vectors.shape[1]:
            return [[] for _ in range(len(vectors))]
        scores, rows = self.index.search(np.ascontiguousarray(vectors, dtype=np.float32), min(n, len(self.ids)))
        return [
            [(int(j), float(s)) for j, s in zip(r, sc, strict=True) if j >= 0]
            for r, sc in zip(rows.tolist(), scores.tolist(), strict=True)
        ]


class Catalogue:
    def __init__(self, reader: AsyncInterestReader, check_every_s: float = 2.0, trend_tau_s: float = 0.0) -> None:
        self.reader = reader
        #: A trend model's τ: the index then carries each item's trend coordinate, as ``streams.search``'s
        #: does (read at the newest counted event time when the catalogue is loaded).
        self.trend_tau_s = trend_tau_s
        self.check_every_s = check_every_s
        self.snap = Snapshot([], [], np.zeros((0, 0), np.float32), None)
        self._checked = 0.0
        self._lock = asyncio.Lock()

    async def current(self) -> Snapshot:
        """The catalogue, reloaded first when items were added since the last look."""
        async with self._lock:
            if time.monotonic() - self._checked >= self.check_every_s:
                if await self.reader.item_count() != len(self.snap.ids):
                    self.snap = await self._load()
                self._checked = time.monotonic()
            return self.snap

    async def _load(self) -> Snapshot:
        ids = await self.reader.item_ids()
        rows = await self.reader.item_fields(ids, ["ret", "title", trend.COUNT, trend.TIME])
        keep = [i for i, row in enumerate(rows) if row[0] is not None]
        ids = [ids[i] for i in keep]
        titles = [(rows[i][1] or b"").decode(errors="replace") for i in keep]
        vectors = np.stack([np.frombuffer(rows[i][0], dtype="<f4") for i in keep]) if keep else np.zeros((0, 0))
        vectors = vectors.astype(np.float32)
        if self.trend_tau_s and keep:
            count = np.asarray([float(rows[i][2] or 0.0) for i in keep])
            last = np.asarray([float(rows[i][3] or 0.0) for i in keep])
            vectors = trend.with_trend_column(vectors, count, last, self.trend_tau_s)
        index = await asyncio.to_thread(item_index, vectors) if len(ids) else None
        return Snapshot(ids, titles, vectors, index)

    async def code_map(self, snap: Snapshot, codebook: str) -> dict[bytes, list[int]]:
        """Codes in ``codebook`` → catalogue rows of the items that have exactly those codes."""
        if codebook not in snap.by_code:
            got = await self.reader.item_fields(snap.ids, [Keys.item_code(codebook)])
            out: dict[bytes, list[int]] = {}
            for row, (code,) in enumerate(got):
                if code is not None:
                    out.setdefault(bytes(code), []).append(row)
            snap.by_code[codebook] = out
        return snap.by_code[codebook]
