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
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from models.codebook import ResidualCodebook
from models.refiner import UserInput, select_recent
from models.user_model import Checkpoint
from state.store import StreamStore
from state.users import CorruptState, UserRow, decode_coarse, decode_history
from streams import metrics
from streams.retry import fatal, is_transient
from streams.security import auth_failure
from streams.settings import Settings
from streams.switch import Codebooks, built_elsewhere, rebuild_user

log = logging.getLogger(__name__)
#: Errors a user's own stored data causes (it is quarantined), as opposed to the worker's.
DATA_ERRORS = (CorruptState, LookupError)
Emit = Callable[[str, dict], Awaitable[None]]
#: A micro-batch: the (partition, user) picked, their rows, the codebooks of rows other checkpoints wrote.
Batch = tuple[list[tuple[int, str]], dict[str, UserRow], dict[str, ResidualCodebook]]
#: A refined batch: vectors per row (None: failed), reasons of rows failed on their data, and otherwise.
Refined = tuple[list[np.ndarray | None], dict[str, str], dict[str, str]]


def user_inputs(
    ckpt: Checkpoint, rows: list[UserRow], books: dict[str, ResidualCodebook] | None = None, cap: int | None = None
) -> list[UserInput]:
    """Redis rows → refiner inputs: coarse interests read from the state, the newest ``cap`` history records
    (all when None; a stored history holds up to ``cap + trim_slack(cap)``, ``streams.planner``) decoded and
    time-ordered.  Only the events the refiner reads (``select_recent``: at most ``recent`` of them) are
    decoded, so a long history costs no more to refine than a short one.  ``books`` holds the codebooks of
    rows written by another checkpoint (see ``streams.switch``).  Raises ``CorruptState`` / ``KeyError`` for
    a row that cannot be decoded."""
    model = ckpt.model.coarse
    books = {**(books or {}), ckpt.codebook_id: ckpt.codebook}
    code_bytes = ckpt.codebook.cfg.bytes_per_item
    states, histories = [], []  # histories: each row's decoded records
    for r in rows:
        book = books[r.codebook or ckpt.codebook_id]
        rec = decode_history(r.history, book.cfg.bytes_per_item)  # whole records, or CorruptState
        if built_elsewhere(ckpt, r.state_id):  # rebuild for this call
            try:
                state, history = rebuild_user(ckpt, book, r.history, cap)
            except ValueError as exc:
                raise CorruptState(f"its history cannot be rebuilt: {exc}") from None
            states.append(state)
            histories.append(decode_history(history, code_bytes))
        else:
            state = decode_coarse(r.coarse, model.state_size)
            states.append(model.init_state() if state is None else state)
            # Records decode the same for any codebook of the same record size: decoded once.
            histories.append(rec if book.cfg.bytes_per_item == code_bytes else decode_history(r.history, code_bytes))
    coarse = model.read_many(np.stack(states)).numpy()
    refiner = ckpt.model.refiner.cfg if ckpt.model.refiner is not None else None
    out = []
    for rec, c in zip(histories, coarse, strict=True):
        if cap is not None:
            rec = rec[-cap:]  # the newest in the order applied
        order = np.lexsort((rec["scenario"], rec["ts"]))  # time order; scenario breaks ties
        rec = rec[order]
        if refiner is not None:  # select_recent of what it picks picks it all: the refiner sees the same events
            rec = rec[select_recent(rec["scenario"], rec["ts"], refiner.recent, refiner.quotas)]
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


#: Above this many entries the debounce map drops those older than the debounce window.
LAST_REFINED_MAX = 100_000
#: Ticks in a row a user may fail alone (not on its data, while the rest of its batch refines) before it
#: is quarantined: a fault that follows one user is that user's, whatever its type.
RETRY_LIMIT = 3


def refiner_threads(threads: int) -> None:
    """The refiner thread's torch thread count (0: one per core).  OpenMP's count is per thread, so the
    worker's event loop can run its small model calls on one thread (``event_loop_threads``) while the
    refiner's large batches use every core."""
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def event_loop_threads() -> None:
    """One torch thread for the thread that runs the agents.  Their model calls are small (a batch's coarse
    fold: tens of events), and an OpenMP team on a busy machine costs more in hand-off than such a call
    computes: 58 ms against 0.85 ms for 13 events, two threads against one, with Kafka, Redis and other
    jobs on two cores."""
    torch.set_num_threads(1)


class Refresher:
    """Refines dirty users in micro-batches.  A user whose refinement fails is *quarantined* (listed in
    Redis with the reason, counted, left out of its dirty set) so it cannot stall or crash its
    partition; it is tried again when a new event marks it dirty, or by ``mirstream quarantine --retry``."""

    def __init__(
        self, settings: Settings, ckpt: Checkpoint, store: StreamStore, codebooks: Codebooks, emit: Emit
    ) -> None:
        self.settings = settings
        self.ckpt = ckpt
        self.store = store
        self.codebooks = codebooks
        self.emit = emit
        self.scenarios = list(ckpt.model.cfg.scenarios)
        self.executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="refiner",
            initializer=refiner_threads,
            initargs=(settings.refine_threads,),
        )
        self.last_refined: dict[str, float] = {}  # debounce: user → when last refined (pruned, see _tick)
        self.retries: dict[str, int] = {}  # user → ticks in a row it failed alone (see ``RETRY_LIMIT``)
        self._turn = 0
        self.failing_since: float | None = None  # monotonic time of the first failed tick in a row

    async def tick(self, partitions: list[int]) -> int:
        """One micro-batch; returns how many users were refined.  Never raises: a failure the tick cannot
        pin on a user is counted and logged, and ``failing_since`` tells the health check."""
        try:
            n = await self._tick(partitions)
        except Exception as exc:
            if auth_failure(exc) is not None:  # refused credentials: every tick would fail the same way
                fatal("refine", exc)
            transient = is_transient(exc)
            metrics.AGENT_ERRORS.labels("refine", "transient" if transient else type(exc).__name__).inc()
            log.log(
                logging.WARNING if transient else logging.ERROR,
                "refinement tick failed (%s: %s); users stay dirty",
                type(exc).__name__,
                exc,
                exc_info=None if transient else exc,
            )
            self.failing_since = self.failing_since or time.monotonic()
            return 0
        self.failing_since = None
        metrics.LAST_PROGRESS.labels("refine").set(time.time())
        return n

    async def _tick(self, partitions: list[int]) -> int:
        """Reads a batch, refines it off the event loop, writes it.  A batch is read once the one before is
        written.  Reading the next batch while one refines was tried: its snapshots were a refiner call
        old, so users with newer events came out stale and were refined twice (2,000 evenly active users
        at 1,000 events/s: p99 <= 5 s with it, <= 1.5 s without; Zipf: <= 10 s against <= 5 s)."""
        batch = await self._gather(partitions)
        if batch is None:
            return 0
        picked, rows, books = batch
        vectors, failed, errors = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._timed_refine, [rows[u] for _, u in picked], books
        )
        writes: list[tuple[int, UserRow, dict[str, np.ndarray]]] = []
        cleared: list[tuple[int, str, int]] = []
        for (p, user), vecs in zip(picked, vectors, strict=True):
            row = rows[user]
            if vecs is not None and not np.isfinite(vecs).all():
                failed[user] = "refined vectors hold NaN or infinite values"
            if vecs is None and user not in failed:  # failed alone, not on its data: stays dirty, retried
                self.retries[user] = tries = self.retries.get(user, 0) + 1
                if tries < RETRY_LIMIT:
                    metrics.AGENT_ERRORS.labels("refine", "user_retry").inc()
                    log.warning(
                        "refining user %s failed (%s); it stays dirty, try %d of %d",
                        user,
                        errors.get(user),
                        tries,
                        RETRY_LIMIT,
                    )
                    continue
                failed[user] = f"refinement failed alone {tries} ticks in a row: {errors.get(user)}"
            self.retries.pop(user, None)
            if user in failed:
                await self.store.quarantine(user, p, row.seq, failed[user])
                cleared.append((p, user, row.seq))
                log.error("quarantined user %s at seq %d: %s", user, row.seq, failed[user])
                continue
            writes.append((p, row, {s: vecs[i] for i, s in enumerate(self.scenarios)}))
        # One round trip writes every user's vectors, the next takes the users off their dirty sets: a crash
        # in between leaves them dirty, to be refined again (a write never goes back in seq).
        written = await self.store.write_vectors_many(
            [(row.user, row.seq, row.last_ts, row.kts, per_scenario) for _, row, per_scenario in writes],
            self.ckpt.version,
            self.settings.version_ttl_s,
        )
        await self.store.clear_dirty_many(cleared + [(p, row.user, row.seq) for p, row, _ in writes])
        now = time.monotonic()
        refined = []
        for (_, row, per_scenario), was_written in zip(writes, written, strict=True):
            self.last_refined[row.user] = now
            refined.append(row.user)
            if was_written:
                metrics.REFINEMENTS.inc()
                if row.kts > 0:
                    metrics.FRESHNESS.observe(max(0.0, time.time() - row.kts))
                await self.emit(
                    row.user,
                    {
                        "user_id": row.user,
                        "seq": row.seq,
                        "version": self.ckpt.version,
                        "event_ts": row.last_ts,
                        "updated_at": time.time(),
                        "vectors": {s: v.tolist() for s, v in per_scenario.items()},
                    },
                )
        await self.store.unquarantine(refined)
        metrics.QUARANTINED.set(await self.store.quarantined_count())
        return len(picked)

    async def _gather(self, partitions: list[int]) -> Batch | None:
        """The next micro-batch: up to ``refine_batch`` dirty users (not refined within the debounce window),
        each with one consistent snapshot of its state and history."""
        now = time.monotonic()
        debounce = self.settings.refine_debounce_ms / 1000
        picked: list[tuple[int, str]] = []
        if len(self.last_refined) > LAST_REFINED_MAX:  # only entries inside the debounce window matter
            self.last_refined = {u: t for u, t in self.last_refined.items() if now - t < debounce}
        # Round robin: each tick starts at the next partition, so under a backlog none waits behind the others.
        self._turn = (self._turn + 1) % max(1, len(partitions))
        for p in partitions[self._turn :] + partitions[: self._turn]:
            for user, _seq in await self.store.dirty_users(p, self.settings.refine_batch * 2):
                if now - self.last_refined.get(user, -1e9) >= debounce:
                    picked.append((p, user))
            if len(picked) >= self.settings.refine_batch:
                break
        picked = picked[: self.settings.refine_batch]
        if not picked:
            return None
        rows = await self.store.read_for_refine([u for _, u in picked])
        books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
        return picked, rows, books

    def _timed_refine(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        t0 = time.perf_counter()
        try:
            return self._refine(rows, books)
        finally:
            metrics.REFINE_BATCH.observe(time.perf_counter() - t0)

    def refine_rows(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """The tick's computation for any rows (the batch backfill calls it with large batches)."""
        return self._refine(rows, books)

    def _refine(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """Vectors per row (None: that row failed), the reasons of rows that failed on their own stored
        data (``DATA_ERRORS``: quarantined), and of those that failed otherwise (they stay dirty, see
        ``RETRY_LIMIT``).  When the batch fails, each row is tried alone, so a bad row fails only itself.
        When every row fails and none on its data, the fault is the worker's: that is raised."""
        try:
            return list(self._vectors(rows, books)), {}, {}
        except Exception:
            alone = [self._alone(row, books) for row in rows] if len(rows) > 1 else [(None, sys.exc_info()[1])]
            reasons = {r.user: (f"{type(e).__name__}: {e}", e) for r, (_, e) in zip(rows, alone, strict=True) if e}
            failed = {u: why for u, (why, e) in reasons.items() if isinstance(e, DATA_ERRORS)}
            if not failed and all(v is None for v, _ in alone):
                raise
            errors = {u: why for u, (why, _) in reasons.items() if u not in failed}
            return [v for v, _ in alone], failed, errors

    def _alone(self, row: UserRow, books: dict[str, ResidualCodebook]) -> tuple[np.ndarray | None, Exception | None]:
        try:
            return self._vectors([row], books)[0], None
        except Exception as exc:
            return None, exc

    def _vectors(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> np.ndarray:
        inputs = user_inputs(self.ckpt, rows, books, self.settings.history_cap)
        return self.ckpt.model.refine_users(inputs, list(range(len(self.scenarios))))
