"""A user's stored state: its field names, the row a worker reads, the update it writes, and the codecs.

This module is the one place that knows how a user is laid out in Redis (``state.keys`` names the keys,
``state.scripts`` holds the Lua that reads and writes them in the argument order defined here).  The
agents in ``streams/`` see only ``UserRow`` and ``UserUpdate``.

Concurrency: every write to a user's state hash bumps ``ver``, and every write is a compare-and-set on
the ``ver`` (and the ``gen``) its writer read.  The read is one Lua call that returns the state fields,
the coarse state (a key of its own) and the history together, so a row is always one consistent
snapshot.  A writer that lost a race gets a conflict, re-reads and re-plans: no stale plan can ever land.
The only field written outside that protocol is ``refined_seq`` (by the refiner, max-only); no plan
depends on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from state.history import decode

VERSION = "ver"  # bumped by every apply and parking mark: the compare-and-set token
SEQ = "seq"  # events folded in so far
#: The state hash's field that held the coarse-interest state before it got a key of its own
#: (``Keys.user_coarse``: a ~1.3 KB binary field made Redis store the whole hash as a hashtable).  Still
#: read when that key is missing; the next write of a coarse state drops it.
COARSE_IN_STATE = "coarse"
CODEBOOK = "cb"  # the codebook of the history's codes
STATE_ID = "gen"  # the checkpoint state id (codebook + coarse weights) that built ``coarse``
LAST_TS = "last_ts"  # newest event time folded in
KTS = "kts"  # newest Kafka (producer) timestamp folded in: freshness is measured from it
REFINED_SEQ = "refined_seq"  # seq of the newest vectors written
#: The backfill's hand-over watermark (``streams.backfill``): the newest event time a batch backfill
#: applied to this user, and the ids of the events it applied at exactly that time ('\n'-joined).  An
#: event older than ``bts``, or at ``bts`` with an id in ``bids``, is already in the state (a duplicate),
#: whichever path, stream or backfill, brings it again.
BACKFILL_TS = "bts"
BACKFILL_IDS = "bids"
MARKS = "nm"  # how many o:/p: marks the hash holds (pruned past ``MARKS_CAP``)
#: Most o:/p: marks kept per user: past it the older half is dropped (a mark's value is the ``ver`` that
#: wrote it).  A mark guards against the second copy of a parked event; that copy comes within a
#: release's retry, long before a user has parked this many newer events.
MARKS_CAP = 256
#: Fields every read returns, in this order, before the requested per-batch fields.
ROW_FIELDS = (VERSION, SEQ, CODEBOOK, STATE_ID, REFINED_SEQ, LAST_TS, KTS, BACKFILL_TS, BACKFILL_IDS)


@lru_cache(maxsize=4096)  # a worker meets a few (topic, partition) pairs, once per event each
def watermark(topic: str, partition: int) -> str:
    """Highest offset of (topic, partition) applied to this user: a redelivery at or below it is skipped."""
    return f"w:{topic}:{partition}"


def applied_mark(origin: str) -> str:
    """Set once an event that was ever parked is applied (its other copy is then skipped)."""
    return f"o:{origin}"


def parked_mark(origin: str) -> str:
    """Set before an event is parked: whichever of its two copies is applied must record it."""
    return f"p:{origin}"


class CorruptState(ValueError):
    """Stored bytes of a user that cannot be decoded: the user's own data, never a worker bug."""


@dataclass(frozen=True)
class UserRow:
    """One consistent snapshot of a user (state hash + coarse state + history), as ``StreamStore.read_users``
    returns it."""

    user: str
    version: int = 0
    seq: int = 0
    coarse: bytes | None = None
    codebook: str | None = None  # None: no history yet
    state_id: str | None = None  # None: no state yet (or one from before ``gen`` existed)
    refined_seq: int = 0
    last_ts: float = 0.0
    kts: float = 0.0
    watermarks: dict[str, int] = field(default_factory=dict)  # only the fields asked for
    applied: frozenset[str] = frozenset()  # origins (of those asked for) with an applied mark
    parked: frozenset[str] = frozenset()  # origins (of those asked for) with a parked mark
    history: bytes = b""
    backfill_ts: float = 0.0  # the hand-over watermark (``BACKFILL_TS``); 0: never backfilled
    backfill_ids: frozenset[str] = frozenset()

    @property
    def is_new(self) -> bool:
        """Nothing of this user is stored yet (every field as a user never written reads)."""
        return self == UserRow(self.user)

    def backfilled(self, ts: float, event_id: str) -> bool:
        """Whether the batch backfill already applied this event (by time, then by id at the cut's time)."""
        return ts < self.backfill_ts or (ts == self.backfill_ts and event_id in self.backfill_ids)


@dataclass(frozen=True)
class UserUpdate:
    """One atomic write of a user: applied only if ``ver`` and ``gen`` are still what the plan read."""

    expected_version: int
    expected_state_id: str | None
    n_events: int
    coarse: bytes | None  # None keeps the stored state
    records: bytes  # history records to append (``state.history``: units only, or a whole history when none is stored)
    history: bytes | None = None  # replaces the stored history before the append (a rebuild or a trim)
    last_ts: float = 0.0  # max-merged in Redis
    kts: float = 0.0  # max-merged in Redis
    watermarks: dict[str, int] = field(default_factory=dict)  # max-merged in Redis
    applied: tuple[str, ...] = ()  # origins to mark applied; their parked marks are dropped
    state_id: str | None = None  # new ``gen`` + ``cb`` (a rebuild, or a user's first write)
    codebook: str | None = None
    #: A backfill moves the hand-over watermark to (time, ids at that time); None keeps it.
    backfill: tuple[float, tuple[str, ...]] | None = None

    def args(self) -> list:
        """ARGV of ``state.scripts.APPLY_USER``, in its order."""
        out: list = [
            self.expected_version,
            self.expected_state_id or "",
            self.n_events,
            "" if self.coarse is None else "1",
            self.coarse or b"",
            repr(float(self.last_ts)),
            repr(float(self.kts)),
            self.records,
            "" if self.history is None else "1",
            self.history or b"",
            self.state_id or "",
            self.codebook or "",
            "" if self.backfill is None else repr(float(self.backfill[0])),
            "" if self.backfill is None else "\n".join(self.backfill[1]),
            len(self.watermarks),
        ]
        for name, offset in self.watermarks.items():
            out += [name, offset]
        for origin in self.applied:
            out += [applied_mark(origin), parked_mark(origin)]
        return out


@dataclass(frozen=True)
class Applied:
    """What an applied update left: the user's new seq and version, and the seq of its newest vectors."""

    seq: int
    version: int
    refined_seq: int


def read_args(watermarks: list[str], origins: list[str]) -> list[str]:
    """ARGV of ``state.scripts.READ_USER``: the extra fields of this batch."""
    return [*watermarks, *(applied_mark(o) for o in origins), *(parked_mark(o) for o in origins)]


def parse_row(user: str, raw: list, watermarks: list[str], origins: list[str]) -> UserRow:
    """``READ_USER``'s reply (the fields, the coarse state, the history) → a row."""
    fixed, extra, (coarse, history) = raw[: len(ROW_FIELDS)], raw[len(ROW_FIELDS) : -2], raw[-2:]
    ver, seq, cb, gen, refined, last_ts, kts, bts, bids = fixed
    n_w, n_o = len(watermarks), len(origins)
    marks = {w: int(float(v)) for w, v in zip(watermarks, extra[:n_w], strict=True) if v is not None}
    if len(extra) - n_w != 2 * n_o:
        raise ValueError(f"a read of user {user!r} returned {len(extra) - n_w} mark values for {n_o} origins")
    if extra.count(None) - n_w + len(marks) == 2 * n_o:  # no origin marked: the usual case, checked in C
        applied = parked = frozenset()
    else:
        applied = frozenset(o for o, v in zip(origins, extra[n_w : n_w + n_o], strict=True) if v is not None)
        parked = frozenset(o for o, v in zip(origins, extra[n_w + n_o :], strict=True) if v is not None)
    return UserRow(
        user,
        int(ver or 0),
        int(seq or 0),
        coarse,
        _text(cb),
        _text(gen),
        int(refined or 0),
        float(last_ts or 0),
        float(kts or 0),
        marks,
        applied,
        parked,
        history or b"",
        float(bts or 0),
        frozenset(bids.decode().split("\n")) if bids else frozenset(),
    )


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode()


# --------------------------------------------------------------------------- codecs


#: Leading values of the coarse state kept as float64 (``models.coarse``: the event count and the reference
#: time, ~1.7e9 s, which float32 would round to minutes); the running log-sum-exp values that follow are
#: stored as float32, half the bytes, and computed in float64 between a read and a write.
COARSE_HEAD = 2


def decode_coarse(raw: bytes | None, size: int) -> np.ndarray | None:
    """The stored coarse state as float64 (None: no state yet): float64 head + float32 rest as written now,
    or all float64 as written before; ``CorruptState`` when it is neither, or not finite."""
    if raw is None or raw == b"":
        return None
    compact = 8 * COARSE_HEAD + 4 * (size - COARSE_HEAD)
    if len(raw) == compact:
        head = np.frombuffer(raw, dtype="<f8", count=COARSE_HEAD)
        state = np.concatenate([head, np.frombuffer(raw, dtype="<f4", offset=8 * COARSE_HEAD)]).astype(np.float64)
    elif len(raw) == 8 * size:
        state = np.frombuffer(raw, dtype="<f8")
    else:
        raise CorruptState(f"coarse state of {len(raw)} bytes, expected {compact} (or {8 * size} as float64)")
    if not usable_coarse(state):
        raise CorruptState("coarse state holds NaN or +infinite values")
    return state


def usable_coarse(state: np.ndarray) -> bool:
    """No NaN, no +inf (a fresh state's running maxima start at -inf, which is fine): the maximum is NaN
    when any value is, +inf when any is (one reduction; it runs for every user of every batch)."""
    top = state.max()
    return bool(top == top and top != np.inf)


def usable_coarse_many(states: np.ndarray) -> np.ndarray:
    """``usable_coarse`` of each row of ``states`` (rows, size), in one reduction."""
    top = states.max(axis=1) if len(states) else np.zeros(0)
    return (top == top) & (top != np.inf)


def encode_coarse(state: np.ndarray) -> bytes:
    head = np.ascontiguousarray(state[:COARSE_HEAD], dtype="<f8").tobytes()
    return head + np.ascontiguousarray(state[COARSE_HEAD:], dtype="<f4").tobytes()


def decode_coarse_many(raws: list[bytes | None], size: int) -> list[np.ndarray | CorruptState | None]:
    """``decode_coarse`` of each (its result, or the ``CorruptState`` it raises), the states as written
    now decoded in one pass: a batch plans hundreds of users, and per user the small numpy calls cost
    more than their arithmetic.  Each state is writable and shares no memory with another."""
    compact = 8 * COARSE_HEAD + 4 * (size - COARSE_HEAD)
    out: list[np.ndarray | CorruptState | None] = [None] * len(raws)
    fast = [i for i, raw in enumerate(raws) if raw is not None and len(raw) == compact]
    if fast:
        buf = np.frombuffer(b"".join([raws[i] for i in fast]), dtype=np.uint8).reshape(len(fast), compact)  # type: ignore[misc]
        states = np.empty((len(fast), size), dtype=np.float64)
        states[:, :COARSE_HEAD] = buf[:, : 8 * COARSE_HEAD].copy().view("<f8")
        states[:, COARSE_HEAD:] = buf[:, 8 * COARSE_HEAD :].copy().view("<f4")
        usable = usable_coarse_many(states)
        for n, i in enumerate(fast):
            out[i] = states[n] if usable[n] else CorruptState("coarse state holds NaN or +infinite values")
    for i, raw in enumerate(raws):
        if raw is not None and len(raw) != compact:  # empty (no state), all float64 (older), or corrupt
            try:
                got = decode_coarse(raw, size)
                out[i] = None if got is None else got.copy()
            except CorruptState as exc:
                out[i] = exc
    return out


def encode_coarse_many(states: np.ndarray) -> list[bytes]:
    """``encode_coarse`` of each row of ``states`` (rows, size), in one pass."""
    if not len(states):
        return []
    head = np.ascontiguousarray(states[:, :COARSE_HEAD], dtype="<f8").view(np.uint8)
    rest = np.ascontiguousarray(states[:, COARSE_HEAD:], dtype="<f4").view(np.uint8)
    blob = np.concatenate([head, rest], axis=1).tobytes()
    n = len(blob) // len(states)
    return [blob[i : i + n] for i in range(0, len(blob), n)]


def decode_history(raw: bytes, code_bytes: int) -> np.ndarray:
    """History records (fields code, scenario, action, ts; ``state.history``) in the order applied;
    ``CorruptState`` when the bytes are not a history of this format."""
    try:
        return decode(raw, code_bytes)
    except ValueError as exc:
        raise CorruptState(str(exc)) from None
