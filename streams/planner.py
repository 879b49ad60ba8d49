"""The apply step as a pure function: a batch's events + each user's stored row → the writes to make.

No I/O here.  ``streams.ingest`` reads every user of a batch as one consistent snapshot (``UserRow``),
calls ``plan``, and writes each ``UserPlan`` as compare-and-set steps on the user's version; a user
whose version moved meanwhile is re-read and re-planned.  A plan is a function of one snapshot, so a
race costs a retry and never a wrong write.

Per user, in order:
1. **dedup**: an event at or below its (topic, partition) watermark, or whose origin was already applied,
   or repeated in the batch, is a duplicate;
2. **poison check**: a stored state that cannot be decoded, a history in a codebook nobody published, or an
   event this checkpoint cannot represent makes the user *poison*: its fresh events are dead-lettered with
   the reason and nothing of it is written (the other users of the batch go on);
3. **parking**: fresh events whose item is unknown are parked (marked in the user's state first);
4. **rebuild**: a state another checkpoint built is rebuilt from its history (``streams.switch``);
5. **fold**: the applied events of every user go through the coarse model in one batched call;
6. **history**: the new records are appended (encoded after the stored history's last record,
   ``state.history``); when the history would pass ``cap + trim_slack(cap)`` records (``cap // 64``, at
   least 1) it is rewritten whole, trimmed to the newest ``cap``, so the planner's re-encode is amortised
   over ``trim_slack(cap)`` events and Redis never trims (readers use the newest ``cap`` records,
   ``streams.refinement``).  The slack is small on purpose: at about 8 B a record, 1,015 records stay in
   the string size class 1,000 records take (8,186 B of value cost 8,264 B in Redis, 8,187 B cost 10,312 B),
   so a user past the cap costs what a user at the cap does.  A rewrite costs Redis no more than an append
   (``APPLY_USER`` writes the whole history with one ``SET`` either way).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from models.codebook import ResidualCodebook
from models.user_model import Checkpoint
from state.history import TIME_LIMIT_S as RECORD_TIME_LIMIT
from state.history import encode, encode_many, records, tail_many
from state.users import (
    CorruptState,
    UserRow,
    UserUpdate,
    decode_coarse_many,
    decode_history,
    encode_coarse_many,
    usable_coarse_many,
    watermark,
)
from streams.events import Event, Message
from streams.switch import built_elsewhere, rebuild_user


class Accepted(NamedTuple):
    """A parsed event with the message it came in (a named tuple: one is built per event)."""

    event: Event
    msg: Message
    origin: str  # "topic:partition:offset" of its first delivery ("file:<line>" for a backfill)
    replayed: bool  # re-produced from a parking list
    #: Read from a file by the batch backfill (``streams.backfill``): no Kafka watermark; the update moves
    #: the backfill's hand-over watermark (time, ids) instead.
    backfill: bool = False

    @property
    def topic(self) -> str:
        return self.msg.topic

    @property
    def partition(self) -> int:
        return self.msg.partition

    @property
    def offset(self) -> int:
        return self.msg.offset

    @property
    def kafka_ts(self) -> float:
        """Producer time, seconds."""
        return self.msg.timestamp

    @property
    def mark(self) -> str:
        return watermark(self.msg.topic, self.msg.partition)


def trim_slack(cap: int) -> int:
    """Records a history may hold past ``cap`` before it is rewritten, trimmed to ``cap``: ``cap // 64``, at
    least 1 (a 1,000-record history then stays within Redis's 8,264-B allocation, see the module's doc)."""
    return max(1, cap // 64)


@dataclass(frozen=True)
class PlanContext:
    """What a plan needs of the worker: its checkpoint, the codebooks it could load, the history cap."""

    ckpt: Checkpoint
    books: Mapping[str, ResidualCodebook]  # every codebook the rows name that could be loaded
    cap: int

    @property
    def trim_at(self) -> int:
        """Records past which a history is rewritten, trimmed to ``cap``."""
        return self.cap + trim_slack(self.cap)


@dataclass
class UserPlan:
    user: str
    duplicates: int = 0
    poison: str | None = None  # why this user's fresh events are dead-lettered instead
    dead: list[Accepted] = field(default_factory=list)  # fresh events to dead-letter (poison user)
    mark: tuple[str, ...] = ()  # origins to mark parked (a versioned write) before parking
    park: list[Accepted] = field(default_factory=list)  # events to park, once marked
    applied: list[Accepted] = field(default_factory=list)  # events the update folds in
    waiting: list[Accepted] = field(default_factory=list)  # fresh events whose item is unknown
    update: UserUpdate | None = None
    rebuilt: bool = False
    remark_dirty: bool = False  # nothing fresh, but the user has events its vectors do not reflect yet


def plan(
    rows: Mapping[str, UserRow],
    events: Mapping[str, list[Accepted]],
    codes: Mapping[str, bytes | None],
    ctx: PlanContext,
    handled: frozenset[str] | set[str] = frozenset(),
) -> dict[str, UserPlan]:
    """Each user's writes.  ``codes``: item → codes in this worker's codebook (None: unknown item);
    ``handled``: origins this batch already parked or dead-lettered (a re-plan must not repeat them)."""
    out: dict[str, UserPlan] = {}
    starts: dict[str, np.ndarray] = {}  # user → coarse state the fold starts from
    bases: dict[str, Base] = {}  # user → the stored history the new records follow
    fresh_of: dict[str, list[Accepted]] = {}
    for user, batch in events.items():
        row = rows[user]
        p = out[user] = UserPlan(user)
        fresh = _fresh(row, batch)
        p.duplicates = len(batch) - len(fresh)
        if fresh:
            fresh_of[user] = fresh
        else:
            p.remark_dirty = row.seq > row.refined_seq  # a crash between apply and dirty-marking
    tails = _tails({u: rows[u] for u in fresh_of}, ctx)
    stored = decode_coarse_many([rows[u].coarse for u in fresh_of], ctx.ckpt.model.coarse.state_size)
    for (user, fresh), coarse in zip(fresh_of.items(), stored, strict=True):
        row, p = rows[user], out[user]
        try:
            start, bases[user], p.rebuilt = _start(row, fresh, ctx, coarse, tails.get(user))
        except (CorruptState, LookupError) as exc:
            p.poison, p.dead = f"user {user!r}: {exc}", [a for a in fresh if a.origin not in handled]
            continue
        starts[user] = start
        for a in fresh:
            (p.applied if codes.get(a.event.item_id) is not None else p.waiting).append(a)
        if p.waiting:
            p.park = [a for a in p.waiting if a.origin not in handled]
            p.mark = tuple(a.origin for a in p.waiting if a.origin not in row.parked)
    folded = _fold({u: (starts[u], out[u].applied) for u in starts}, codes, ctx)
    finite = usable_coarse_many(np.stack([state for state, _, _ in folded.values()])) if folded else []
    kept: dict[str, tuple[np.ndarray, np.ndarray, float]] = {}
    for (user, (state, recs, last_ts)), usable in zip(folded.items(), finite, strict=True):
        p = out[user]
        timeless = next((a.event for a in p.applied if not abs(a.event.ts) < RECORD_TIME_LIMIT), None)
        if not usable:
            p.poison = f"user {user!r}: these events would make the coarse state NaN or infinite"
        elif timeless is not None:
            p.poison = f"user {user!r}: event {timeless.event_id!r} has a time no history record holds: {timeless.ts!r}"
        if p.poison:
            p.dead = [a for a in p.applied + p.waiting if a.origin not in handled]
            p.park, p.mark, p.applied, p.waiting = [], (), [], []
            continue
        kept[user] = state, recs, last_ts
    rebuilt = {u for u in kept if out[u].rebuilt}
    writes = history_writes({u: bases[u] for u in kept}, {u: recs for u, (_, recs, _) in kept.items()}, rebuilt, ctx)
    coarse = encode_coarse_many(np.stack([state for state, _, _ in kept.values()])) if kept else []
    for (user, (_, _, last_ts)), state_bytes in zip(kept.items(), coarse, strict=True):
        out[user].update = _update(rows[user], out[user], state_bytes, writes[user], last_ts, ctx, handled)
    return out


def _fresh(row: UserRow, batch: list[Accepted]) -> list[Accepted]:
    """Events not applied yet, each once (a parked copy and its redelivered original can share a batch).
    An event the backfill already applied (by time and id, ``UserRow.backfilled``) is a duplicate too."""
    fresh, seen = [], set()
    for a in batch:
        if a.origin in seen or a.origin in row.applied:
            continue
        if row.backfill_ts and row.backfilled(a.event.ts, a.event.event_id):
            continue
        if a.backfill or a.offset > row.watermarks.get(a.mark, -1):
            fresh.append(a)
            seen.add(a.origin)
    return fresh


#: A stored history's record count and each scenario's last minute, or why it does not decode.
Tail = tuple[int, dict[int, int]] | ValueError


@dataclass(frozen=True)
class Base:
    """The stored history new records follow: its bytes, their record size, and what an append needs of
    it (record count, each scenario's last minute: ``state.history.tail``), so that an append never decodes
    the records; a trim (``history_writes``) does."""

    blob: bytes
    code_bytes: int
    count: int
    after: dict[int, int]

    @classmethod
    def of(cls, blob: bytes, code_bytes: int, summary: Tail | None = None) -> Base:
        """``summary``: the blob's ``tail_many`` result when the caller has it (``_tails``)."""
        got = tail_many([blob], code_bytes)[0] if summary is None else summary
        if isinstance(got, ValueError):
            raise CorruptState(str(got))
        return cls(blob, code_bytes, *got)

    def records(self) -> np.ndarray:
        return decode_history(self.blob, self.code_bytes)


def _tails(rows: Mapping[str, UserRow], ctx: PlanContext) -> dict[str, Tail]:
    """Each user's stored-history tail, one ``tail_many`` pass per record size (users whose codebook is
    unknown are left out: ``_start`` refuses them first)."""
    by_size: dict[int, list[str]] = {}
    for user, row in rows.items():
        book = ctx.books.get(row.codebook or ctx.ckpt.codebook_id)
        if book is not None:
            by_size.setdefault(book.cfg.bytes_per_item, []).append(user)
    out: dict[str, Tail] = {}
    for size, users in by_size.items():
        out.update(zip(users, tail_many([rows[u].history for u in users], size), strict=True))
    return out


def _start(
    row: UserRow,
    fresh: list[Accepted],
    ctx: PlanContext,
    stored: np.ndarray | CorruptState | None,
    summary: Tail | None = None,
) -> tuple[np.ndarray, Base, bool]:
    """The coarse state the fold starts from, the history the new records follow, and whether that
    history was rebuilt (another checkpoint built the stored one: it is written whole).  ``stored``: the
    row's coarse state decoded (``decode_coarse_many``); ``summary``: the stored history's tail, when
    ``_tails`` read it.  Raises ``CorruptState`` / ``LookupError`` for a user that cannot be applied."""
    cfg = ctx.ckpt.model.cfg
    for a in fresh:
        if not (0 <= a.event.scenario < len(cfg.scenarios) and 0 <= a.event.action < len(cfg.actions)):
            raise LookupError(f"event {a.event.event_id!r} has a scenario or action this checkpoint does not know")
    coarse = ctx.ckpt.model.coarse
    book_id = row.codebook or ctx.ckpt.codebook_id
    if book_id not in ctx.books:
        raise LookupError(f"its history is in codebook {book_id}, which was never published to this Redis")
    base = Base.of(row.history, ctx.books[book_id].cfg.bytes_per_item, summary)  # whole records, or CorruptState
    if (row.seq or base.count) and built_elsewhere(ctx.ckpt, row.state_id):
        try:
            state, rebuilt = rebuild_user(ctx.ckpt, ctx.books[book_id], row.history, ctx.cap)
        except ValueError as exc:
            raise CorruptState(f"its history cannot be rebuilt: {exc}") from None
        return state, Base.of(rebuilt, ctx.ckpt.codebook.cfg.bytes_per_item), True
    if isinstance(stored, CorruptState):
        raise stored
    return (coarse.init_state() if stored is None else stored), base, False


def history_writes(
    bases: Mapping[str, Base], new: Mapping[str, np.ndarray], rewrite: set[str], ctx: PlanContext
) -> dict[str, tuple[bytes, bytes | None]]:
    """Per user, (records to append, whole history to write first or None) for its ``new`` records after
    its base: an append while the history stays within ``ctx.trim_at`` records (every user's appends
    encoded in one ``encode_many`` pass), else (or for a user in ``rewrite``) the newest ``ctx.cap`` of
    both, written whole."""
    out: dict[str, tuple[bytes, bytes | None]] = {}
    appends: list[str] = []
    for user, recs in new.items():
        base = bases[user]
        if user in rewrite or base.count + len(recs) > ctx.trim_at:
            keep = np.concatenate([base.records(), recs])
            out[user] = b"", encode(keep[-ctx.cap :]) if len(keep) and ctx.cap > 0 else b""
        elif len(recs):
            appends.append(user)
        else:
            out[user] = b"", None
    if appends:
        after = [bases[u].after if bases[u].count else None for u in appends]
        # The dtype given, numpy skips promoting the record fields array by array (4x faster for 250 users).
        flat = np.concatenate([new[u] for u in appends], dtype=new[appends[0]].dtype)
        blobs = encode_many(flat, [len(new[u]) for u in appends], after)
        out.update((u, (blob, None)) for u, blob in zip(appends, blobs, strict=True))
    return out


def _fold(
    users: dict[str, tuple[np.ndarray, list[Accepted]]], codes: Mapping[str, bytes | None], ctx: PlanContext
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """Per user (start state, applied events) → (new state, history records, newest event time):
    every user's events through the coarse model in one call, each user's in (time, offset) order."""
    if not users:
        return {}
    names = list(users)
    ordered = [sorted(users[u][1], key=lambda a: (a.event.ts, a.offset)) for u in names]
    flat = [a for applied in ordered for a in applied]
    states = np.stack([users[u][0] for u in names])
    code_bytes = ctx.ckpt.codebook.cfg.bytes_per_item
    blob = b"".join(codes[a.event.item_id] for a in flat)  # type: ignore[misc]
    scen = np.asarray([a.event.scenario for a in flat], dtype=np.int64)
    act = np.asarray([a.event.action for a in flat], dtype=np.int64)
    ts = np.asarray([a.event.ts for a in flat], dtype=np.float64)
    if flat:
        vecs = ctx.ckpt.codebook.from_bytes(blob, len(flat))
        owner = np.repeat(np.arange(len(names)), [len(a) for a in ordered])
        states = ctx.ckpt.model.coarse.update_many(states, vecs, scen, act, ts, owner)
    held = np.where(np.abs(ts) < RECORD_TIME_LIMIT, ts, 0.0)  # a user with any other time is made poison
    recs = records(np.frombuffer(blob, dtype=np.uint8).reshape(len(flat), code_bytes), scen, act, held)
    out, start = {}, 0
    for i, user in enumerate(names):
        end = start + len(ordered[i])
        out[user] = (states[i], recs[start:end], float(ts[start:end].max()) if end > start else 0.0)
        start = end
    return out


def _update(
    row: UserRow,
    p: UserPlan,
    coarse: bytes,
    writes: tuple[bytes, bytes | None],
    last_ts: float,
    ctx: PlanContext,
    handled: frozenset[str] | set[str],
) -> UserUpdate:
    marks: dict[str, int] = {}
    for a in p.applied + p.waiting:  # the watermark passes parked events too: their parked copy carries them on
        if not a.backfill:
            marks[a.mark] = max(marks.get(a.mark, -1), a.offset)
    # the sets are built only for a user with parked origins (the usual user has none)
    ever_parked = set(row.parked) | set(p.mark) | set(handled) if row.parked or p.mark or handled else ()
    applied = tuple(a.origin for a in p.applied if a.replayed or a.origin in ever_parked)
    new_state = row.state_id != ctx.ckpt.state_id
    records, history = writes
    changed = bool(p.applied) or p.rebuilt
    return UserUpdate(
        expected_version=row.version + (1 if p.mark else 0),  # the parking mark bumps it first
        expected_state_id=row.state_id,
        n_events=len(p.applied),
        coarse=coarse if changed else None,
        records=records,
        history=history,
        last_ts=last_ts,
        kts=max((a.kafka_ts for a in p.applied), default=0.0),
        watermarks=marks,
        applied=applied,
        state_id=ctx.ckpt.state_id if new_state else None,
        codebook=ctx.ckpt.codebook_id if new_state else None,
        backfill=_backfill_mark(row, p.applied),
    )


def _backfill_mark(row: UserRow, applied: list[Accepted]) -> tuple[float, tuple[str, ...]] | None:
    """The hand-over watermark after a backfill batch: its newest event time and the ids applied at it."""
    times = [a.event.ts for a in applied if a.backfill]
    if not times:
        return None
    top = max(times)
    ids = {a.event.event_id for a in applied if a.backfill and a.event.ts == top}
    if top < row.backfill_ts:  # cannot happen (older events are duplicates), but never move it back
        return None
    if top == row.backfill_ts:
        ids |= row.backfill_ids
    return top, tuple(sorted(ids))


def plan_new(
    users: list[str],
    counts: np.ndarray,
    codes: np.ndarray,
    scenario: np.ndarray,
    action: np.ndarray,
    ts: np.ndarray,
    event_ids: list[str],
    ctx: PlanContext,
) -> dict[str, UserUpdate | None]:
    """``plan`` for users with nothing stored (``UserRow.is_new``) and file events, on columns: the same
    updates, without a Python object per event (the batch backfill's fast path; ``tests/test_planner.py``
    holds it equal to ``plan``).  Events are grouped by user in ``users`` order, ``counts[i]`` each, and
    each user's in the order ``plan`` folds them (time, then line).  None: the user's state would not be
    usable (``plan`` makes it poison; the caller hands that user to ``plan`` for the reasons)."""
    coarse = ctx.ckpt.model.coarse
    n = len(ts)
    owner = np.repeat(np.arange(len(users)), counts)
    states = np.repeat(coarse.init_state()[None], len(users), axis=0)
    if n:
        vecs = ctx.ckpt.codebook.from_bytes(codes.tobytes(), n)
        states = coarse.update_many(states, vecs, scenario, action, ts, owner)
    timeless = ~(np.abs(ts) < RECORD_TIME_LIMIT)  # such a user goes to ``plan``, which says why
    recs = records(codes, scenario, action, np.where(timeless, 0.0, ts))
    bad = np.bincount(owner[timeless], minlength=len(users)) > 0
    # Each user's history as ``history_writes`` makes it from nothing: whole, trimmed past ``trim_at``.
    ends = np.cumsum(counts)
    trimmed = counts > ctx.trim_at
    first = np.where(trimmed, ends - ctx.cap, ends - counts)
    kept = ends - first
    blobs = encode_many(recs[np.arange(int(kept.sum())) + np.repeat(first - (np.cumsum(kept) - kept), kept)], kept)
    usable, coarse_bytes = usable_coarse_many(states), encode_coarse_many(states)
    out: dict[str, UserUpdate | None] = {}
    for i, user in enumerate(users):
        start, end = int(ends[i] - counts[i]), int(ends[i])
        if not usable[i] or end == start or bad[i]:
            out[user] = None
            continue
        appended, history = (b"", blobs[i]) if trimmed[i] else (blobs[i], None)
        top = float(ts[start:end].max())
        at_top = tuple(sorted({event_ids[k] for k in range(start, end) if ts[k] == top}))
        out[user] = UserUpdate(
            expected_version=0,
            expected_state_id=None,
            n_events=end - start,
            coarse=coarse_bytes[i],
            records=appended,
            history=history,
            last_ts=top,
            kts=0.0,
            state_id=ctx.ckpt.state_id,
            codebook=ctx.ckpt.codebook_id,
            backfill=(top, at_top),
        )
    return out
