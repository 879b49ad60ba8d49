"""Refinement scheduler: micro-batches dirty users, runs the refiner off the event loop, writes vectors.

Each tick takes up to ``refine_batch`` users from the dirty sets of the partitions this worker owns
(a user is skipped while it was refined less than ``refine_debounce_ms`` ago), reads their coarse
state and recent history, runs the refiner off the event loop, and writes K vectors per scenario with
the seq they reflect.  A user leaves its dirty set only if no newer event re-marked it meanwhile, so no
refinement is lost across crashes or rebalances.  A history is decoded with the codebook that wrote it,
and a coarse state another checkpoint built is recomputed from the history for the call
(``streams.switch``).  The worker runs the refiner in a process of its own (``refine_process``), so its
Python shares no interpreter lock with the agents' event loop.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from models.codebook import ResidualCodebook
from models.refiner import UserInput, select_recent
from models.user_model import Checkpoint
from state.history import encode, records
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
    """The refiner's torch thread count (0: one per core), set in its thread or process.  OpenMP's count
    is per thread, so the worker's event loop can run its small model calls on one thread
    (``event_loop_threads``) while the refiner's large batches use every core."""
    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))


def event_loop_threads() -> None:
    """One torch thread for the thread that runs the agents.  Their model calls are small (a batch's coarse
    fold: tens of events), and an OpenMP team on a busy machine costs more in hand-off than such a call
    computes: 58 ms against 0.85 ms for 13 events, two threads against one, with Kafka, Redis and other
    jobs on two cores."""
    torch.set_num_threads(1)


class RowRefiner:
    """The refiner's computation on stored rows: CPU only (no Redis, no Kafka), so the same code runs in
    a refiner thread (backfill, tests) and in the worker's refiner process."""

    def __init__(self, ckpt: Checkpoint, cap: int | None) -> None:
        self.ckpt = ckpt
        self.cap = cap
        self.scenario_ids = list(range(len(ckpt.model.cfg.scenarios)))

    def refine(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """Vectors per row (None: that row failed), the reasons of rows that failed on their own stored
        data (``DATA_ERRORS``: quarantined), and of those that failed otherwise (they stay dirty, see
        ``RETRY_LIMIT``).  When the batch fails, each row is tried alone, so a bad row fails only itself.
        When every row fails and none on its data, the fault is the worker's: that is raised."""
        try:
            return list(self.vectors(rows, books)), {}, {}
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
            return self.vectors([row], books)[0], None
        except Exception as exc:
            return None, exc

    def vectors(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> np.ndarray:
        """(rows, scenarios, K, dim) refined vectors."""
        return self.ckpt.model.refine_users(user_inputs(self.ckpt, rows, books, self.cap), self.scenario_ids)


#: The error of a user whose call killed the refiner process while a known-good call after it did not.
DIED_ALONE = "BrokenProcessPool: the refiner process died refining this user"


async def isolate_deaths(
    rows: list[UserRow], call: Callable[[list[UserRow]], Awaitable[Refined]], probe: Callable[[], Awaitable[None]]
) -> Refined:
    """``call(rows)``; when the call kills the refiner process (``BrokenProcessPool``), each half is called
    on its own, and a half that kills it again is split again, down to one user.  ``probe`` refines a row
    known to refine (``Refresher._probe``) and raises ``BrokenProcessPool`` when that kills the process too:
    the fault is then the worker's (raised: the batch stays dirty), not any user's.  So a user whose call
    killed the process fails alone (an error in ``Refined``: it stays dirty, is retried, and is quarantined
    after ``RETRY_LIMIT`` ticks in a row) only when a probe after its death survived.  The probe also runs
    when both halves of the batch kill the process, so a worker that dies on every call is told after four
    deaths (the batch, its halves, the probe), not after a bisection down to one user."""
    try:
        return await call(rows)
    except BrokenProcessPool:
        if len(rows) == 1:
            await probe()
            return [None], {}, {rows[0].user: DIED_ALONE}
    return await _halves(rows, call, probe, top=True)


async def _halves(
    rows: list[UserRow],
    call: Callable[[list[UserRow]], Awaitable[Refined]],
    probe: Callable[[], Awaitable[None]],
    top: bool,
) -> Refined:
    parts = [rows[: len(rows) // 2], rows[len(rows) // 2 :]]
    got: list[Refined | None] = []
    for part in parts:
        try:
            got.append(await call(part))
        except BrokenProcessPool:
            got.append(None)
    if top and got[0] is None and got[1] is None:
        await probe()
    vectors: list[np.ndarray | None] = []
    failed: dict[str, str] = {}
    errors: dict[str, str] = {}
    for part, refined in zip(parts, got, strict=True):
        if refined is None and len(part) == 1:  # it killed the process alone: pinned once a probe survives
            await probe()
            refined = [None], {}, {part[0].user: DIED_ALONE}
        elif refined is None:
            refined = await _halves(part, call, probe, top=False)
        vectors += refined[0]
        failed.update(refined[1])
        errors.update(refined[2])
    return vectors, failed, errors


#: The refiner process's computation (``_child_init`` builds it from the worker's settings).
_CHILD: RowRefiner | None = None


def _child_init(checkpoint: str, cap: int | None, threads: int, parent: int, kind: type[RowRefiner]) -> None:
    """``kind``: the worker's ``RowRefiner`` class (a subclass in tests), built here from the checkpoint."""
    global _CHILD
    # The worker stops its refiner (pool shutdown, or ``_exit_with``): a Ctrl-C or SIGTERM sent to the
    # whole process group must not kill it under a batch first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(parent,), name="parent-watch", daemon=True).start()
    refiner_threads(threads)
    _CHILD = kind(Checkpoint.load(checkpoint), cap)


def _exit_with(parent: int) -> None:
    """Ends the refiner process once its worker is gone: a worker killed alone (not its process group)
    would otherwise leave it holding a model's memory, as nothing else reads its queue."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(0)


def _child_ready() -> bool:
    return _CHILD is not None


def probe_row(ckpt: Checkpoint, events: int = 8) -> UserRow:
    """The probe's row before any call refined a user: a few events on items made of the codebook's own
    codewords, so the probe decodes a history and runs the model over events, as a user's call does.  Its
    id is not printable, so no user has it (``models.schema.ident``)."""
    codes = ckpt.codebook.encode(ckpt.codebook.codewords[0][:events]).records()
    n = len(codes)
    history = encode(records(codes, np.zeros(n, np.int64), np.zeros(n, np.int64), 1.7e9 + 60.0 * np.arange(n)))
    return UserRow("\x00probe", history=history, codebook=ckpt.codebook_id, state_id=ckpt.state_id)


def _child_refine(rows: list[UserRow], books: dict[str, ResidualCodebook]) -> tuple[str, Refined]:
    """Runs in the refiner process; returns which checkpoint computed the result (``fingerprint``) with it."""
    assert _CHILD is not None, "the refiner process was not initialised"
    return _CHILD.ckpt.fingerprint, _CHILD.refine(rows, books)


class CheckpointChanged(RuntimeError):
    """The refiner process computed with another checkpoint than the worker's: no user's fault."""


class Refresher:
    """Refines dirty users in micro-batches.  A user whose refinement fails is *quarantined* (listed in
    Redis with the reason, counted, left out of its dirty set) so it cannot stall or crash its
    partition; it is tried again when a new event marks it dirty, or by ``mirstream quarantine --retry``."""

    def __init__(
        self,
        settings: Settings,
        ckpt: Checkpoint,
        store: StreamStore,
        codebooks: Codebooks,
        emit: Emit,
        rows: RowRefiner | None = None,
        process: bool = False,
    ) -> None:
        """``rows``: the refiner's computation (default: this checkpoint's ``RowRefiner``), run in a thread;
        with ``process``, a child process builds one of the same class from ``settings.checkpoint``."""
        self.settings = settings
        self.ckpt = ckpt
        self.store = store
        self.codebooks = codebooks
        self.emit = emit
        self.scenarios = list(ckpt.model.cfg.scenarios)
        self.rows = rows or RowRefiner(ckpt, settings.history_cap)
        self.process = process
        self.executor = self._executor()
        self.last_refined: dict[str, float] = {}  # debounce: user → when last refined (pruned, see _tick)
        #: user → (its partition, ticks in a row it failed alone: see ``RETRY_LIMIT``); a partition this
        #: worker no longer owns drops its users' counts, so one that comes back starts them afresh
        self.retries: dict[str, tuple[int, int]] = {}
        self._turn = 0
        self._computing = asyncio.Lock()  # one tick at a time reads and refines (see ``_tick``)
        self._held: set[str] = set()  # users in a tick now
        self._breaks = 0  # refiner processes lost in a row (a back-off before the next one)
        #: The probe's call (``_probe``): the last row a refiner process refined, and the codebook it used.
        self._known_good: tuple[list[UserRow], dict[str, ResidualCodebook]] = ([probe_row(ckpt)], {})
        self._closed = False
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
        if n or not self._held:  # an empty batch beside a tick in flight tells nothing of that tick
            self.failing_since = None
            metrics.LAST_PROGRESS.labels("refine").set(time.time())
        return n

    async def _tick(self, partitions: list[int]) -> int:
        """Reads a batch, refines it off the event loop, writes it.  Ticks may run side by side (the worker
        runs two): one at a time reads and refines (``_computing``), so a batch is read only once the one
        before it is refined and its snapshots are current, while the one before writes.  A user in a tick
        (``_held``) is left out of the other's batch: no user is in two batches at once.  Reading the next
        batch while one refines was tried: its snapshots were a refiner call old, so users with newer events
        came out stale and were refined twice (2,000 evenly active users at 1,000 events/s: p99 <= 5 s with
        it, <= 1.5 s without; Zipf: <= 10 s against <= 5 s)."""
        held: set[str] = set()
        try:
            async with self._computing:
                batch = await self._gather(partitions)
                if batch is None:
                    return 0
                picked, rows, books = batch
                held = {u for _, u in picked}
                self._held |= held
                refined = await self.run([rows[u] for _, u in picked], books)
            await self._write(picked, rows, refined)
        finally:
            self._held -= held
        return len(picked)

    async def _write(self, picked: list[tuple[int, str]], rows: dict[str, UserRow], refined: Refined) -> None:
        """Stores a refined batch: vectors, quarantines, retries; then takes the users off their dirty sets."""
        vectors, failed, errors = refined
        writes: list[tuple[int, UserRow, dict[str, np.ndarray]]] = []
        cleared: list[tuple[int, str, int]] = []
        for (p, user), vecs in zip(picked, vectors, strict=True):
            row = rows[user]
            if vecs is not None and not np.isfinite(vecs).all():
                failed[user] = "refined vectors hold NaN or infinite values"
            if vecs is None and user not in failed:  # failed alone, not on its data: stays dirty, retried
                tries = self.retries.get(user, (p, 0))[1] + 1
                self.retries[user] = p, tries
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
        done = []
        for (_, row, per_scenario), was_written in zip(writes, written, strict=True):
            self.last_refined[row.user] = now
            done.append(row.user)
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
        await self.store.unquarantine(done)
        metrics.QUARANTINED.set(await self.store.quarantined_count())

    async def _gather(self, partitions: list[int]) -> Batch | None:
        """The next micro-batch: up to ``refine_batch`` dirty users (not refined within the debounce window),
        each with one consistent snapshot of its state and history."""
        now = time.monotonic()
        debounce = self.settings.refine_debounce_ms / 1000
        picked: list[tuple[int, str]] = []
        if any(p not in partitions for p, _ in self.retries.values()):
            self.retries = {u: (p, n) for u, (p, n) in self.retries.items() if p in partitions}
        if len(self.last_refined) > LAST_REFINED_MAX:  # only entries inside the debounce window matter
            self.last_refined = {u: t for u, t in self.last_refined.items() if now - t < debounce}
        # Round robin: each tick starts at the next partition, so under a backlog none waits behind the others.
        self._turn = (self._turn + 1) % max(1, len(partitions))
        for p in partitions[self._turn :] + partitions[: self._turn]:
            for user, _seq in await self.store.dirty_users(p, self.settings.refine_batch * 2):
                if now - self.last_refined.get(user, -1e9) >= debounce and user not in self._held:
                    picked.append((p, user))
            if len(picked) >= self.settings.refine_batch:
                break
        picked = picked[: self.settings.refine_batch]
        if not picked:
            return None
        rows = await self.store.read_for_refine([u for _, u in picked])
        books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
        return picked, rows, books

    def _executor(self) -> Executor:
        if not self.process:
            return ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="refiner",
                initializer=refiner_threads,
                initargs=(self.settings.refine_threads,),
            )
        # spawn, not fork: a forked copy of a process whose OpenMP and Kafka threads already ran can hang
        return ProcessPoolExecutor(
            max_workers=1,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_child_init,
            initargs=(
                self.settings.checkpoint,
                self.settings.history_cap,
                self.settings.refine_threads,
                os.getpid(),
                type(self.rows),
            ),
        )

    async def run(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """The refiner's computation for these rows, off the event loop (``RowRefiner.refine``).  In the
        refiner process, a call that kills it (a crash, the OOM killer) is split (``isolate_deaths``), so a
        user whose data kills the process fails alone; users that failed alone before (``retries``) are
        refined each on its own, after the rest, so such a user costs one process per tick, not a
        bisection.  Each process lost is replaced, after a back-off that doubles with each one lost in a
        row (up to 30 s).  A process that loaded another checkpoint than this worker's (its directory
        changed under it) raises: vectors are stored under this worker's version."""
        if self._closed:  # the worker is stopping
            raise asyncio.CancelledError
        t0 = time.perf_counter()
        try:
            if not self.process:
                return await asyncio.get_running_loop().run_in_executor(self.executor, self.rows.refine, rows, books)
            return await self._isolated(rows, books)
        finally:
            metrics.REFINE_BATCH.observe(time.perf_counter() - t0)

    async def _isolated(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """``isolate_deaths`` over the rows not suspected, then over each suspected row alone; in rows order.
        A suspected row alone that raises is that user's failure once a probe survives (``RowRefiner.refine``
        raises when every row of a call fails, which one row alone always is): the rest are kept."""
        suspected = [i for i, r in enumerate(rows) if r.user in self.retries]
        rest = [i for i, r in enumerate(rows) if r.user not in self.retries]
        vectors: list[np.ndarray | None] = [None] * len(rows)
        failed: dict[str, str] = {}
        errors: dict[str, str] = {}
        for part in ([rest] if rest else []) + [[i] for i in suspected]:
            batch = [rows[i] for i in part]
            try:
                got = await isolate_deaths(batch, lambda b: self._in_process(b, books), self._probe)
            except (BrokenProcessPool, CheckpointChanged):
                raise
            except Exception as exc:
                if part is rest:
                    raise
                await self._probe()  # raises when the worker is at fault: the batch stays dirty
                got = [None], {}, {batch[0].user: f"{type(exc).__name__}: {exc}"}
            for i, v in zip(part, got[0], strict=True):
                vectors[i] = v
            failed.update(got[1])
            errors.update(got[2])
        return vectors, failed, errors

    async def _in_process(self, rows: list[UserRow], books: dict[str, ResidualCodebook]) -> Refined:
        """One refiner call in the refiner process, checked against this worker's checkpoint; a row it
        refined to finite vectors becomes the probe's."""
        made_by, refined = await self._submit(f"a call for {len(rows)} user(s)", _child_refine, rows, books)
        if made_by != self.ckpt.fingerprint:
            raise CheckpointChanged(
                f"the refiner process loaded checkpoint {made_by}, this worker runs {self.ckpt.fingerprint} "
                f"(version {self.ckpt.version}): {self.settings.checkpoint} changed; restart the worker"
            )
        good = next((r for r, v in zip(rows, refined[0], strict=True) if v is not None and np.isfinite(v).all()), None)
        if good is not None:
            self._known_good = [good], {k: b for k, b in books.items() if k == good.codebook}
        return refined

    async def _probe(self) -> None:
        """Refines a row a refiner process refined before (``probe_row`` until one has): raises
        ``BrokenProcessPool`` when the process dies on that too.  A call that refines nobody would not do: a
        fault that kills every model call (a broken kernel, memory) would pass it, and every user of the
        batch would be blamed.  A stop meanwhile raises ``CancelledError``: nobody is blamed on the way out."""
        rows, books = self._known_good
        await self._submit("the probe", _child_refine, rows, books)
        if self._closed:
            raise asyncio.CancelledError

    async def _submit(self, what: str, fn: Callable[..., Any], *args: object) -> Any:
        """``fn(*args)`` in the refiner process.  A process that died (in this call, or idle before it)
        raises ``BrokenProcessPool`` (counted, logged) and is replaced for the next call, after a back-off
        that doubles with each process lost in a row."""
        if self._breaks:
            await asyncio.sleep(min(30.0, 0.5 * 2 ** (self._breaks - 1)))
        if self._closed:  # the worker is stopping (checked after the back-off too)
            raise asyncio.CancelledError
        try:
            got = await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        except BrokenProcessPool:
            self.executor.shutdown(wait=False)
            self._breaks += 1
            metrics.AGENT_ERRORS.labels("refine", "process_died").inc()
            log.warning("the refiner process died (%s, or before it); a new one is started", what)
            if not self._closed:
                self.executor = self._executor()
            raise
        self._breaks = 0
        return got

    def warm(self) -> None:
        """Starts the refiner process now (it loads torch and the checkpoint: seconds) rather than at the
        first tick."""
        if self.process:
            self.executor.submit(_child_ready)

    def close(self) -> None:
        """No more batches; the refiner process (if any) exits once its current call is done."""
        self._closed = True
        self.executor.shutdown(wait=False, cancel_futures=True)
