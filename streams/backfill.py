"""Batch backfill of Redis from event files: the state the stream would have written, without Kafka.

Why: millions of users need vectors before the stream starts, and replaying months of events through
Kafka runs at stream speed.  The backfill computes the same Redis state in batch, by construction: it
writes through the same atomic, compare-and-set apply script (``StreamStore.apply_many``, pipelined) the
plans of the same pure planner.  A user with nothing stored yet (the usual case) is planned on columns
(``streams.planner.plan_new``: one coarse fold for a batch of users, no Python object per event; held
equal to ``plan`` by a unit test); any other user, or one whose write conflicted, goes through ``plan``
on the ``Accepted`` events the agents build (dedup, rebuild, poison checks).  Refinement is the refinement
tick's code (``Refresher.run``) in large batches, one batch refining (in the refiner's thread)
while the next one is applied; vectors are written with one pipelined round.

Larger than memory: events are read in chunks (Parquet checked column-wise, ``models.event_table``) and
spilled to ``buckets`` Arrow files by a hash of the user, so each bucket holds whole users and is
processed alone (sorted by user, time and line in memory).

Resumable: a finished bucket is recorded in Redis (``<p>:backfill:<run>``, the run named by the input
files, the cut and the checkpoint), so a restarted run skips it; a bucket cut short by a crash is done
again, and each event the first attempt applied is a duplicate by the hand-over watermark below.

Hand-over to the stream (the watermark, ``state.users.BACKFILL_TS`` / ``BACKFILL_IDS``): per user, the
newest event time the backfill applied and the ids of the events applied at exactly that time.  When
the stream later replays events, one older than that time, or at that time with a backfilled id, is a
duplicate; any later event is applied once, with the stream's own offset watermarks from then on.  So
an event at or before the cut that was *not* in the backfilled files but reaches the stream later is
taken as covered and skipped (the backfill owns everything up to each user's cut).  Event ids: the
file's ``event_id``, or one derived from the event's fields (``models.schema.derived_event_id``), the same
in ``mirstream replay`` of the same files.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tempfile
import time
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from models.event_table import SCHEMA, read_event_tables
from models.files import Rejects, read_items
from models.user_model import Checkpoint
from state import trend
from state.store import StreamStore
from state.users import UserRow, UserUpdate
from streams.events import Event, Item, Message
from streams.items import ItemHandler
from streams.planner import Accepted, PlanContext, UserPlan, plan, plan_new
from streams.refinement import Refresher, event_loop_threads
from streams.security import redis_async
from streams.settings import Settings
from streams.switch import Codebooks

BACKFILL_TOPIC = "backfill"  # the synthetic Message topic of file events (never a Kafka watermark)


@dataclass
class BackfillReport:
    events_read: int = 0
    events_applied: int = 0
    duplicates: int = 0
    after_cut: int = 0
    users: int = 0
    items: int = 0
    buckets_skipped: int = 0
    rejected: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def wall(self) -> float:
        return self.seconds.get("wall", 0.0)

    def line(self) -> str:
        s, wall = self.seconds, max(self.wall, 1e-9)
        split = ", ".join(f"{k} {s[k]:.1f}s" for k in ("spill", "encode", "coarse", "refine", "redis") if k in s)
        return (
            f"backfilled {self.events_applied} events of {self.users} users in {wall:.1f}s "
            f"({self.events_applied / wall:.0f} events/s, {self.users / wall:.0f} users/s; {split}); "
            f"{self.duplicates} already applied, {self.after_cut} after the cut, {self.rejected} rejected"
        )


def run_id(events: list[str], until: float | None, ckpt: Checkpoint, buckets: int) -> str:
    """Names a run by its inputs: the same files, cut, checkpoint and bucket count resume the same run."""
    parts = [ckpt.state_id, repr(until), str(buckets)]
    for p in events:
        st = os.stat(p)
        parts += [str(Path(p).resolve()), str(st.st_size), str(st.st_mtime_ns)]
    return hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()


def kafka_partition(user: str, partitions: int) -> int:
    """The partition Kafka's default partitioner gives this user key (whose worker owns the user)."""
    from kafka.partitioner.default import murmur2

    return (murmur2(user.encode()) & 0x7FFFFFFF) % partitions


class Backfill:
    def __init__(
        self,
        settings: Settings,
        ckpt: Checkpoint,
        rejects: Rejects,
        users_per_batch: int = 1024,
        refine_batch: int = 256,
        refine: bool = True,
        progress: bool = True,
    ) -> None:
        self.settings = settings
        self.ckpt = ckpt
        self.rejects = rejects
        self.users_per_batch = users_per_batch
        self.refine_batch = refine_batch
        self.refine = refine
        self.progress = progress
        self.scenarios = tuple(ckpt.model.cfg.scenarios)
        self.actions = tuple(ckpt.model.cfg.actions)
        self.report = BackfillReport()
        self.store: StreamStore | None = None
        self.trend_tau_s = ckpt.model.trend_tau_s  # 0: the model scores no trend, nothing is counted
        self._files: list[str] = []
        self.planner = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="backfill-plan", initializer=event_loop_threads
        )
        self._refining: asyncio.Task | None = None  # one batch refines while the next one is applied
        self._trend_mark = ""

    async def run(
        self, events: list[str], items: list[str] | None = None, until: float | None = None, buckets: int = 16
    ) -> BackfillReport:
        t0 = time.perf_counter()
        self.store = store = StreamStore(redis_async(self.settings), self.settings.prefix)
        self.codebooks = Codebooks(store, self.ckpt.codebook)
        self.refresher = Refresher(self.settings, self.ckpt, store, self.codebooks, emit=_no_emit)
        try:
            await self.codebooks.publish()
            if self.trend_tau_s:
                await store.set_trend_tau(self.trend_tau_s)
            if items:
                await self._items(items)
            run = run_id(events, until, self.ckpt, buckets)
            self._files = list(events)
            done = await store.backfill_done(run)
            with tempfile.TemporaryDirectory(prefix="mirstream-backfill-") as tmp:
                paths = self._spill(events, until, buckets, Path(tmp))
                bar = tqdm(desc="backfill", unit="user", disable=not self.progress)
                try:
                    for b, path in enumerate(paths):
                        if b in done:
                            self.report.buckets_skipped += 1
                            continue
                        self._trend_mark = trend.mark(f"{BACKFILL_TOPIC}:{run}", b)
                        await self._bucket(path, bar)
                        # recorded once its last batch is refined, while the next bucket is read and applied
                        self._refining = asyncio.create_task(self._record_after(self._refining, run, b))
                    await self._settle()
                finally:
                    if self._refining is not None:  # an error: what refines now is not recorded as done
                        self._refining.cancel()
                        with contextlib.suppress(BaseException):
                            await self._refining
                bar.close()
        finally:
            await store.close()
            self.refresher.close()
            self.planner.shutdown(wait=False)
        self.report.rejected = self.rejects.total
        self.report.seconds["wall"] = time.perf_counter() - t0
        return self.report

    # ------------------------------------------------------------------ items
    async def _items(self, items: list[str]) -> None:
        """The item agent's path in batch: vector (given, or text through the item tower) → codes and
        retrieval vector → ``put_items``."""
        handler = ItemHandler(self.settings, self.ckpt, self.store, self.codebooks, _no_deadletter, _no_republish)
        dim = self.ckpt.codebook.cfg.dim
        for chunk in read_items(items, self.rejects, dim=dim):
            t = time.perf_counter()
            recs = [it for _, it in chunk]
            vecs = handler._vectors([Item(r.item_id, r.text, r.vector) for r in recs])
            table_rows = self.ckpt.item_rows([r.item_id for r in recs])  # as the item agent stores them
            retrieval = self.ckpt.model.stored_retrieval(vecs, table_rows).astype("<f4")
            ok = np.isfinite(vecs).all(axis=1) & np.isfinite(retrieval).all(axis=1)
            for (line, _), good in zip(chunk, ok, strict=True):
                if not good:
                    self.rejects.add(items[0], line, "the item's vector gives NaN or infinite model outputs")
            keep = np.flatnonzero(ok)
            codes = self.ckpt.codebook.encode(vecs[keep]).records()
            rows = [
                (recs[i].item_id, codes[n].tobytes(), retrieval[i].tobytes(), self.ckpt.version, recs[i].text or "")
                for n, i in enumerate(keep.tolist())
            ]
            self.report.seconds["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            await self.store.put_items(rows, self.ckpt.codebook_id)
            self.report.seconds["redis"] += time.perf_counter() - t
            self.report.items += len(rows)

    # ------------------------------------------------------------------ events
    def _spill(self, events: list[str], until: float | None, buckets: int, tmp: Path) -> list[Path]:
        """Valid events → ``buckets`` Arrow files by user hash (each bucket holds whole users)."""
        t = time.perf_counter()
        paths = [tmp / f"bucket-{b}.arrow" for b in range(buckets)]
        sinks = [pa.OSFile(str(p), "wb") for p in paths]
        writers = [pa.ipc.new_stream(sink, SCHEMA) for sink in sinks]
        try:
            for table in read_event_tables(events, self.rejects, self.scenarios, self.actions):
                self.report.events_read += table.num_rows
                if until is not None:
                    kept = table.filter(pc.less_equal(table.column("ts"), until))
                    self.report.after_cut += table.num_rows - kept.num_rows
                    table = kept
                users = table.column("user_id").to_numpy(zero_copy_only=False)
                uniq, inverse = np.unique(users, return_inverse=True)
                bucket = np.asarray([zlib.crc32(u.encode()) % buckets for u in uniq], dtype=np.int64)[inverse]
                for b in np.unique(bucket).tolist():
                    writers[b].write_table(table.take(np.flatnonzero(bucket == b)))
        finally:
            for w, sink in zip(writers, sinks, strict=True):
                w.close()
                sink.close()
        self.report.seconds["spill"] += time.perf_counter() - t
        return paths

    async def _bucket(self, path: Path, bar: tqdm) -> None:
        with pa.OSFile(str(path), "rb") as source:
            table = pa.ipc.open_stream(source).read_all()
        if not table.num_rows:
            return
        col = {name: table.column(name).to_numpy(zero_copy_only=False) for name in SCHEMA.names}
        uniq_users, ucode = np.unique(col["user_id"], return_inverse=True)
        # user, then the order the planner folds a user's events in: time, line (then file)
        order = np.lexsort((col["file"], col["line"], col["ts"], ucode))
        col = {k: v[order] for k, v in col.items()}
        # each event's place in the bucket (the trend's marks count by it), set before events of unknown
        # items drop out, so a re-run that has meanwhile learnt those items numbers the others alike
        col["pos"] = np.arange(len(order))
        ucode = ucode[order]
        t = time.perf_counter()
        unique_items = np.unique(col["item_id"]).tolist()
        codes: dict[str, bytes | None] = {}
        for i in range(0, len(unique_items), 10_000):
            codes.update(await self.store.item_codes(unique_items[i : i + 10_000], self.codebooks.own_id))
        self.report.seconds["redis"] += time.perf_counter() - t
        self._codes = codes
        known = np.asarray([codes.get(it) is not None for it in col["item_id"].tolist()], dtype=bool)
        for k in np.flatnonzero(~known).tolist():
            item = col["item_id"][k]
            reason = f"unknown item: {item!r} is not in Redis (give --items, or let the item agent store it)"
            self.rejects.add(self._files[col["file"][k]], int(col["line"][k]), reason)
        if not known.all():
            col = {k: v[known] for k, v in col.items()}
            ucode = ucode[known]
        bounds = np.flatnonzero(np.diff(ucode)) + 1
        starts = np.concatenate([[0], bounds]).astype(np.int64)
        ends = np.concatenate([bounds, [len(ucode)]]).astype(np.int64)
        users = [str(uniq_users[ucode[s]]) for s in starts.tolist()] if len(ucode) else []
        for i in range(0, len(users), self.users_per_batch):
            span = slice(i, i + self.users_per_batch)
            applied = await self._apply_columns(users[span], starts[span], ends[span], col)
            await self._settle()
            if self.refine and applied:
                self._refining = asyncio.create_task(self._refine(applied))
            self.report.users += len(users[span])
            bar.update(len(users[span]))
            wall = bar.format_dict.get("elapsed") or 1e-9
            bar.set_postfix(events_s=f"{self.report.events_applied / wall:.0f}", refresh=False)

    async def _settle(self) -> None:
        """Waits for the batch refining now (and the bucket record that may follow it)."""
        if self._refining is not None:
            task, self._refining = self._refining, None
            await task

    async def _record_after(self, before: asyncio.Task | None, run: str, bucket: int) -> None:
        """A bucket is recorded as done only once its last batch's vectors are written."""
        if before is not None:
            await before
        await self.store.mark_backfill_done(run, bucket)

    async def _apply_columns(
        self, users: list[str], starts: np.ndarray, ends: np.ndarray, col: dict[str, np.ndarray]
    ) -> list[str]:
        """One batch of users: read, plan (in the planner's thread, so the event loop keeps the refining
        batch going), count the applied events in their items' trend before any user write, apply; users
        whose write conflicted are re-read and re-planned (``_apply``).  Returns the users to refine."""
        t = time.perf_counter()
        rows = await self.store.read_users({u: ([], []) for u in users})
        books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
        self.report.seconds["redis"] += time.perf_counter() - t
        ctx = PlanContext(self.ckpt, books, self.settings.history_cap)
        t = time.perf_counter()
        fast, pending, plans, counted = await asyncio.get_running_loop().run_in_executor(
            self.planner, self._plan, users, starts, ends, col, rows, ctx
        )
        self.report.seconds["coarse"] += time.perf_counter() - t
        await self._count_trend(counted)
        changed, conflicts = await self._write(fast, plans, first=True)
        if conflicts:  # another writer meanwhile: re-read, re-plan (their events are counted already)
            place = {u: k for k, u in enumerate(users)}
            retry = {u: pending.get(u) or self._accepted(starts[place[u]], ends[place[u]], col) for u in conflicts}
            changed += await self._apply(retry)
        return changed

    def _plan(
        self,
        users: list[str],
        starts: np.ndarray,
        ends: np.ndarray,
        col: dict[str, np.ndarray],
        rows: dict[str, UserRow],
        ctx: PlanContext,
    ) -> tuple[dict[str, UserUpdate], dict[str, list[Accepted]], dict[str, UserPlan], list[tuple[str, int, float]]]:
        """New users by ``plan_new`` on the columns; the others (and new users ``plan_new`` leaves to it) by
        ``plan`` on ``Accepted`` events, as the stream does.  Also the (item, index in the bucket, time) of
        every event the plans apply, for the trend."""
        new = [k for k, u in enumerate(users) if rows[u].is_new] if self.ckpt.codebook_id in ctx.books else []
        fast: dict[str, UserUpdate] = {}
        counted: list[tuple[str, int, float]] = []
        if new:
            idx = np.concatenate([np.arange(starts[k], ends[k]) for k in new])
            items = col["item_id"][idx].tolist()
            code_bytes = self.ckpt.codebook.cfg.bytes_per_item
            updates = plan_new(
                [users[k] for k in new],
                ends[new] - starts[new],
                np.frombuffer(b"".join(self._codes[it] for it in items), np.uint8).reshape(len(idx), code_bytes),
                col["scenario"][idx],
                col["action"][idx],
                col["ts"][idx],
                col["event_id"][idx].tolist(),
                ctx,
            )
            fast = {u: up for u, up in updates.items() if up is not None}
            owners = np.repeat([users[k] for k in new], ends[new] - starts[new]).tolist()
            times = col["ts"][idx].tolist()
            places = col["pos"][idx].tolist()
            counted += [(it, k, ts) for it, k, ts, u in zip(items, places, times, owners, strict=True) if u in fast]
        pending = {users[k]: self._accepted(starts[k], ends[k], col) for k in range(len(users)) if users[k] not in fast}
        plans = plan({u: rows[u] for u in pending}, pending, self.codes_of(pending), ctx) if pending else {}
        counted += [(a.event.item_id, a.offset, a.event.ts) for p in plans.values() if p.update for a in p.applied]
        return fast, pending, plans, counted

    def _accepted(self, start: int, end: int, col: dict[str, np.ndarray]) -> list[Accepted]:
        """A user's events as the stream's agents hand them to the planner; the message offset is the
        event's place in the bucket (the planner folds by (time, offset), which is (time, line) order,
        and the trend counts by it)."""
        out = []
        for k in range(start, end):
            line, f = int(col["line"][k]), int(col["file"][k])
            event = Event(
                col["event_id"][k],
                col["user_id"][k],
                col["item_id"][k],
                int(col["scenario"][k]),
                int(col["action"][k]),
                float(col["ts"][k]),
                col["query"][k],
            )
            msg = Message(BACKFILL_TOPIC, 0, int(col["pos"][k]), None, b"", 0.0)
            out.append(Accepted(event, msg, f"file:{f}:{line}", False, backfill=True))
        return out

    async def _count_trend(self, counted: list[tuple[str, int, float]]) -> None:
        """Counts applied events in their items' trend (``state.trend``), before the users are written, as
        the scenario agents do: by index in the bucket under a mark of this run and bucket, so a bucket
        redone after a crash adds nothing twice."""
        if not self.trend_tau_s or not counted:
            return
        events: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for item, k, ts in counted:
            events[(item, self._trend_mark)].append((k, ts))
        t = time.perf_counter()
        await self.store.add_trend(events, self.trend_tau_s)
        self.report.seconds["redis"] += time.perf_counter() - t

    async def _write(
        self, fast: dict[str, UserUpdate], plans: dict[str, UserPlan], first: bool
    ) -> tuple[list[str], set[str]]:
        """Applies the updates; returns the users to refine and those whose write conflicted."""
        for p in plans.values():
            if first:
                self.report.duplicates += p.duplicates
            if p.poison:
                for a in p.dead:
                    f, line = a.origin.split(":")[1:]
                    self.rejects.add(self._files[int(f)], int(line), str(p.poison))
        updates = {**fast, **{u: p.update for u, p in plans.items() if p.update is not None}}
        t = time.perf_counter()
        results = await self.store.apply_many(updates) if updates else {}
        self.report.seconds["redis"] += time.perf_counter() - t
        conflicts = {u for u, r in results.items() if r is None}
        changed = []
        for u, r in results.items():
            n = fast[u].n_events if u in fast else len(plans[u].applied)
            if r is not None and n:
                changed.append(u)
                self.report.events_applied += n
        # nothing new, but vectors behind the state: an earlier run stopped between apply and refine
        changed += [u for u, p in plans.items() if p.remark_dirty and u not in conflicts]
        return changed, conflicts

    async def _apply(self, pending: dict[str, list[Accepted]]) -> list[str]:
        """Read → plan → compare-and-set apply until no user conflicts, as ``streams.ingest`` re-plans."""
        changed: list[str] = []
        attempt = 0
        while pending:
            attempt += 1
            await asyncio.sleep(min(0.001 * 2**attempt, 0.5))
            t = time.perf_counter()
            rows = await self.store.read_users({u: ([], []) for u in pending})
            books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
            self.report.seconds["redis"] += time.perf_counter() - t
            ctx = PlanContext(self.ckpt, books, self.settings.history_cap)
            plans = plan(rows, pending, self.codes_of(pending), ctx)
            done, conflicts = await self._write({}, plans, first=False)
            changed += done
            pending = {u: pending[u] for u in conflicts}
        return changed

    def codes_of(self, pending: dict[str, list[Accepted]]) -> dict[str, bytes | None]:
        return {a.event.item_id: self._codes[a.event.item_id] for v in pending.values() for a in v}

    async def _refine(self, users: list[str]) -> None:
        """The refinement tick's computation in large batches; vectors written in one pipelined round."""
        for i in range(0, len(users), self.refine_batch):
            part = users[i : i + self.refine_batch]
            t = time.perf_counter()
            rows = await self.store.read_for_refine(part)
            books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
            self.report.seconds["redis"] += time.perf_counter() - t
            t = time.perf_counter()
            vectors, failed, errors = await self.refresher.run([rows[u] for u in part], books)
            self.report.seconds["refine"] += time.perf_counter() - t
            t = time.perf_counter()
            writes = []
            for user, vecs in zip(part, vectors, strict=True):
                row = rows[user]
                if vecs is not None and not np.isfinite(vecs).all():
                    failed[user] = "refined vectors hold NaN or infinite values"
                if user in failed or vecs is None:
                    reason = failed.get(user) or errors.get(user, "refinement failed")
                    partition = kafka_partition(user, self.settings.partitions)
                    await self.store.quarantine(user, partition, row.seq, reason)
                    continue
                per = {s: vecs[j] for j, s in enumerate(self.refresher.scenarios)}
                writes.append((user, row.seq, row.last_ts, row.kts or row.last_ts, per))  # no Kafka time
            await self.store.write_vectors_many(writes, self.ckpt.version, self.settings.version_ttl_s)
            self.report.seconds["redis"] += time.perf_counter() - t


async def _no_emit(user: str, body: dict) -> None:
    return None


async def _no_deadletter(msg: Message, reason: str, source: str) -> None:  # pragma: no cover - never called
    raise RuntimeError(reason)


async def _no_republish(scenario: str, user: str, body: bytes) -> None:  # pragma: no cover - never called
    raise RuntimeError("the backfill does not park events")


def run_backfill(
    settings: Settings,
    events: list[str],
    items: list[str] | None = None,
    until: float | None = None,
    rejects: Rejects | None = None,
    buckets: int = 16,
    progress: bool = True,
    **kw,
) -> BackfillReport:
    ckpt = Checkpoint.load(settings.checkpoint)
    bf = Backfill(settings, ckpt, rejects or Rejects(), progress=progress, **kw)
    return asyncio.run(bf.run(events, items, until, buckets))
