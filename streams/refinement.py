"""Refinement scheduler: micro-batches dirty users, runs the refiner off the event loop, writes vectors.

Each tick takes up to ``refine_batch`` users from the dirty sets of the partitions this worker owns
(a user is skipped while it was refined less than ``refine_debounce_ms`` ago), reads their coarse
state and recent history, runs the refiner in a thread, and writes K vectors per scenario with the
seq they reflect.  A user leaves its dirty set only if no newer event re-marked it meanwhile, so no
refinement is lost across crashes or rebalances.  A history is decoded with the codebook that wrote it,
and a coarse state another checkpoint built is recomputed from the history for the call
(``streams.switch``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from models.codebook import ResidualCodebook
from models.refiner import UserInput
from models.user_model import Checkpoint
from state.history import unpack
from state.store import RefineRow, StreamStore
from streams import metrics
from streams.settings import Settings
from streams.switch import Codebooks, built_elsewhere, rebuild_user

Emit = Callable[[str, dict], Awaitable[None]]


def user_inputs(
    ckpt: Checkpoint, rows: list[RefineRow], books: dict[str, ResidualCodebook] | None = None
) -> list[UserInput]:
    """Redis rows → refiner inputs: coarse interests read from the state, history decoded, time-ordered.
    ``books`` holds the codebooks of rows written by another checkpoint (see ``streams.switch``)."""
    model = ckpt.model.coarse
    books = {**(books or {}), ckpt.codebook_id: ckpt.codebook}
    states, histories = [], []
    for r in rows:
        book = books[r.codebook or ckpt.codebook_id]
        if built_elsewhere(ckpt, r.state_id):  # rebuild for this call
            state, history = rebuild_user(ckpt, book, r.history)
            states.append(state)
            histories.append(history)
        else:
            states.append(np.frombuffer(r.coarse, dtype="<f8") if r.coarse else model.init_state())
            histories.append(r.history)
    coarse = model.read_many(np.stack(states)).numpy()
    code_bytes = ckpt.codebook.cfg.bytes_per_item
    out = []
    for history, c in zip(histories, coarse, strict=True):
        rec = unpack(history, code_bytes)
        order = np.lexsort((rec["scenario"], rec["ts"]))  # time order; scenario breaks ties
        rec = rec[order]
        items = (
            ckpt.codebook.from_bytes(rec["code"].tobytes(), len(rec))
            if len(rec)
            else np.zeros((0, ckpt.codebook.cfg.dim), np.float32)
        )
        out.append(
            UserInput(
                c, items, rec["scenario"].astype(np.int64), rec["action"].astype(np.int64), rec["ts"].astype(np.float64)
            )
        )
    return out


class Refresher:
    def __init__(
        self, settings: Settings, ckpt: Checkpoint, store: StreamStore, codebooks: Codebooks, emit: Emit
    ) -> None:
        self.settings = settings
        self.ckpt = ckpt
        self.store = store
        self.codebooks = codebooks
        self.emit = emit
        self.scenarios = list(ckpt.model.cfg.scenarios)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refiner")
        self.last_refined: dict[str, float] = {}

    async def tick(self, partitions: list[int]) -> int:
        """One micro-batch; returns how many users were refined."""
        now = time.monotonic()
        debounce = self.settings.refine_debounce_ms / 1000
        picked: list[tuple[int, str]] = []
        for p in partitions:
            for user, _seq in await self.store.dirty_users(p, self.settings.refine_batch * 2):
                if now - self.last_refined.get(user, -1e9) >= debounce:
                    picked.append((p, user))
            if len(picked) >= self.settings.refine_batch:
                break
        picked = picked[: self.settings.refine_batch]
        if not picked:
            return 0
        users = [u for _, u in picked]
        rows = await self.store.read_for_refine(users)
        books = {cb: await self.codebooks.get(cb) for cb in {r.codebook for r in rows.values()} if cb}
        t0 = time.perf_counter()
        vectors = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._refine, [rows[u] for u in users], books
        )
        metrics.REFINE_BATCH.observe(time.perf_counter() - t0)
        for (p, user), vecs in zip(picked, vectors, strict=True):
            row = rows[user]
            per_scenario = {s: vecs[i] for i, s in enumerate(self.scenarios)}
            written = await self.store.write_vectors(
                user, row.seq, self.ckpt.version, row.last_ts, row.kts, per_scenario, self.settings.version_ttl_s
            )
            await self.store.clear_dirty(p, user, row.seq)
            self.last_refined[user] = time.monotonic()
            if written:
                metrics.REFINEMENTS.inc()
                if row.kts > 0:
                    metrics.FRESHNESS.observe(max(0.0, time.time() - row.kts))
                await self.emit(
                    user,
                    {
                        "user_id": user,
                        "seq": row.seq,
                        "version": self.ckpt.version,
                        "event_ts": row.last_ts,
                        "updated_at": time.time(),
                        "vectors": {s: v.tolist() for s, v in per_scenario.items()},
                    },
                )
        return len(picked)

    def _refine(self, rows: list[RefineRow], books: dict[str, ResidualCodebook]) -> np.ndarray:
        inputs = user_inputs(self.ckpt, rows, books)
        return self.ckpt.model.refine_users(inputs, list(range(len(self.scenarios))))
