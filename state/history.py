"""A user's recent history as compact binary records: about 8 bytes an event.

Layout of the ``:h`` string: one format byte (``FORMAT``), then *units* of ``code_bytes + 2`` bytes
(8 with 3 layers of 256 codewords: 3 codes + 3 α).  An event is one unit::

    byte 0   tag: scenario (bits 0-1) | action (bits 2-3) | high 4 bits of the time delta (bits 4-7)
    byte 1   low 8 bits of the time delta (12 bits in all, two's complement: -2,048..2,047 minutes)
    byte 2.. the item's codes and α (``code_bytes``)

The time is kept at a 1-minute resolution, as the delta in whole minutes (``floor(ts / 60)``) from the
record of the same scenario before it in the string (from minute 0 for a scenario's first record, so that
one carries the absolute time, and a history trimmed at the front is re-encoded whole).  Per scenario,
because each scenario's events come from a topic of their own, in time order, while the topics interleave
freely: a replayed log applies one scenario's events days ahead of another's, and deltas across
scenarios (±30 days on ``bench memory``) would escape every few records.
A decoded time is ``minutes × 60`` seconds.  A record whose values do not fit the tag (scenario or
action ≥ 4, a delta outside ±34 hours, as the absolute time of a history's first record, or the one tag
value 0xFF that is reserved) is written as an *escape*: ``ceil(7 / (unit - 1))``
units that start with 0xFF and carry, in their remaining bytes, scenario (u8), action (u8) and the delta
as a signed 40-bit integer of minutes; then the event's unit with tag and delta bytes 0.  Nothing is
dropped: a value that does not fit even the escape (scenario or action > 255, a time that is not finite
or beyond ±2**39 minutes) raises ``ValueError``.

Why: Redis allocates a string in size classes (a value of 8,186 B costs 8,264 B, one of 8,187 B costs
10,312 B), so a 1,000-event history stays in the 8 KB class only at ≤ 8.1 B an event.  The previous
16-byte records (float64 seconds, a byte each for scenario and action) cost 16,456 B.  Seconds would need
about 9 B an event on the simulator's log; minutes keep almost every delta in the tag's 12 bits.  The
delta is signed because events can still come back in time (parked events are applied late).  With a
delta from the previous record of any scenario, 1,000 streamed events took 8.3-8.6 KB.
Readers see ``ts`` floored to the minute (ties in time are broken by the readers as before: scenario,
then the order applied); the live event's own time (watermarks, ``last_ts``, the coarse fold, trend
counts) is untouched.

A string of the previous format (a whole number of 16-byte records, no format byte) does not decode: it
fails with ``ValueError`` naming the format, never as misread records.

``encode`` / ``decode`` are the vectorised codecs (``tail``: the record count and each scenario's last
minute, all an append needs; the ``_many`` forms do many histories in one pass); ``encode_reference`` /
``decode_reference`` do the same record by record in plain Python (``tests/test_history.py`` holds them
equal).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FORMAT = 2  # the string's first byte
ESCAPE = 0xFF  # first byte of an escape unit
MINUTE = 60.0
DELTA_MIN, DELTA_MAX = -2048, 2047  # the deltas (minutes) a tag holds
_ESCAPE_PAYLOAD = 7  # scenario, action, 5-byte signed delta
_TIME_LIMIT = 2**39  # |minutes| and |delta| an escape holds
TIME_LIMIT_S = _TIME_LIMIT * MINUTE / 2  # event times (seconds) whose records always fit, deltas included


def record_dtype(code_bytes: int) -> np.dtype:
    """A decoded record: codes + α, scenario, action, time (seconds, a whole number of minutes)."""
    return np.dtype([("code", np.uint8, (code_bytes,)), ("scenario", np.uint8), ("action", np.uint8), ("ts", "<f8")])


def unit_size(code_bytes: int) -> int:
    return code_bytes + 2


def escape_units(code_bytes: int) -> int:
    """Units an escape takes (one with 6 code bytes)."""
    return -(-_ESCAPE_PAYLOAD // (unit_size(code_bytes) - 1))


def minutes(ts: np.ndarray) -> np.ndarray:
    """Event times (seconds) → whole minutes, floored; ``ValueError`` for a time no record can hold."""
    ts = np.asarray(ts, dtype=np.float64)
    if not np.isfinite(ts).all():
        raise ValueError("a history record's time must be finite")
    m = np.floor(ts / MINUTE)
    if len(m) and np.abs(m).max() >= _TIME_LIMIT:
        raise ValueError(f"a history record's time is beyond ±2**39 minutes: {float(np.abs(ts).max())!r} s")
    return m.astype(np.int64)


def records(code_rows: np.ndarray, scenario: np.ndarray, action: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Events as the records a history stores: ``code_rows`` (n, code_bytes) uint8, the time floored to the
    minute; ``ValueError`` for a scenario or action outside 0..255."""
    scenario, action = np.asarray(scenario), np.asarray(action)
    for name, v in (("scenario", scenario), ("action", action)):
        if len(v) and (v.min() < 0 or v.max() > 255):
            raise ValueError(f"a history record's {name} must be in 0..255")
    code_rows = np.asarray(code_rows, dtype=np.uint8)
    code_rows = code_rows.reshape(len(scenario), code_rows.shape[-1])
    out = np.empty(len(scenario), dtype=record_dtype(code_rows.shape[1]))
    out["code"], out["scenario"], out["action"] = code_rows, scenario, action
    out["ts"] = minutes(ts) * MINUTE
    return out


def last_minutes(rec: np.ndarray) -> dict[int, int]:
    """Per scenario, the minute of its last record: where appended records' deltas start from."""
    m = minutes(rec["ts"])
    return {int(sc): int(m[np.flatnonzero(rec["scenario"] == sc)[-1]]) for sc in np.unique(rec["scenario"])}


def _deltas(m: np.ndarray, key: np.ndarray, start: np.ndarray) -> np.ndarray:
    """Each record's minutes ``m`` minus those of the record before it with the same ``key``; a key's
    first record minus ``start`` (its base)."""
    order = np.argsort(key, kind="stable")
    km, kk = m[order], key[order]
    d = np.diff(km, prepend=np.int64(0))
    first = np.ones(len(kk), dtype=bool)
    first[1:] = kk[1:] != kk[:-1]
    d[first] = km[first] - start[order][first]
    out = np.empty_like(d)
    out[order] = d
    return out


def encode(rec: np.ndarray, after: dict[int, int] | None = None) -> bytes:
    """Records → bytes: a whole history (with the format byte) when ``after`` is None, else the units to
    append to a history whose last record of each scenario is at ``after[scenario]`` (``last_minutes``)."""
    return encode_many(rec, [len(rec)], [after])[0]


def encode_many(
    rec: np.ndarray, counts: Sequence[int] | np.ndarray, after: Sequence[dict[int, int] | None] | None = None
) -> list[bytes]:
    """Several histories at once: ``rec`` holds them one after another, ``counts[i]`` records each, and
    each is ``encode(slice, after[i])`` (whole histories when ``after`` is None), in one vectorised pass."""
    counts = np.asarray(counts, dtype=np.int64)
    after = list(after) if after is not None else [None] * len(counts)
    heads = [b"" if a is not None else bytes([FORMAT]) for a in after]
    if len(rec) == 0:
        return heads
    m = minutes(rec["ts"])
    group = np.repeat(np.arange(len(counts)), counts)
    key = group * 256 + rec["scenario"].astype(np.int64)  # (history, scenario): deltas run per key
    base = np.zeros(len(counts) * 256, np.int64)
    for i, last in enumerate(after):
        for sc, minute in (last or {}).items():
            base[i * 256 + sc] = minute
    units, size = _units(rec, m, _deltas(m, key, base[key]))
    bounds = np.concatenate([[0], np.cumsum(size)])[np.concatenate([[0], np.cumsum(counts)])] * units.shape[1]
    flat = units.tobytes()
    return [h + flat[a:b] for h, a, b in zip(heads, bounds[:-1].tolist(), bounds[1:].tolist(), strict=True)]


def _units(rec: np.ndarray, m: np.ndarray, delta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(units (count, unit) uint8, units per record) of records at minutes ``m`` with these deltas."""
    n = len(rec)
    code_bytes = rec.dtype["code"].shape[0]
    unit, k = unit_size(code_bytes), escape_units(code_bytes)
    if np.abs(delta).max() >= _TIME_LIMIT:
        raise ValueError("a history record's time is more than 2**39 minutes from the record before it")
    s, a = rec["scenario"].astype(np.int64), rec["action"].astype(np.int64)
    tag = s | (a << 2) | (((delta >> 8) & 0xF) << 4)
    direct = (s < 4) & (a < 4) & (delta >= DELTA_MIN) & (delta <= DELTA_MAX) & (tag != ESCAPE)
    esc = ~direct
    # Unit index of each event: its own escape units come right before it.
    pos = np.arange(n) + k * np.cumsum(esc)
    units = np.zeros((n + k * int(esc.sum()), unit), dtype=np.uint8)
    units[pos, 0] = np.where(direct, tag, 0)
    units[pos, 1] = np.where(direct, delta & 0xFF, 0)
    units[pos, 2:] = rec["code"]
    if esc.any():
        e = np.flatnonzero(esc)
        payload = np.zeros((len(e), k * (unit - 1)), dtype=np.uint8)
        payload[:, 0], payload[:, 1] = s[e], a[e]
        payload[:, 2:7] = (delta[e].astype("<i8").view(np.uint8).reshape(-1, 8))[:, :5]
        rows = pos[e][:, None] - np.arange(k, 0, -1)[None, :]  # (escapes, k) unit indices
        units[rows, 0] = ESCAPE
        units[rows, 1:] = payload.reshape(len(e), k, unit - 1)
    return units, 1 + k * esc


def _parse(blob: bytes, code_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bytes of a whole history (non-empty) → (units, and per record: its unit's index, scenario, action,
    delta); ``ValueError`` for bytes that are not one (the previous 16-byte format included)."""
    unit = unit_size(code_bytes)
    if blob[0] != FORMAT or (len(blob) - 1) % unit:
        old = " (16-byte records of the previous format: rebuild it)" if len(blob) % 16 == 0 else ""
        raise ValueError(f"history of {len(blob)} bytes is not format {FORMAT} with {unit}-byte units{old}")
    return _parse_units(np.frombuffer(blob, dtype=np.uint8, offset=1).reshape(-1, unit), code_bytes)


def _parse_units(units: np.ndarray, code_bytes: int) -> tuple[np.ndarray, ...]:
    """``_parse`` after the format byte: units (n, unit) of one history, or of several one after another
    (the caller checks that none ends in an escape)."""
    k = escape_units(code_bytes)
    if len(units) == 0:
        empty = np.empty(0, np.int64)
        return units, empty, empty, empty, empty
    esc = units[:, 0] == ESCAPE
    pos = np.flatnonzero(~esc)
    gaps = np.diff(pos, prepend=-1) - 1  # escape units right before each event
    if len(pos) == 0 or esc[pos[-1] + 1 :].any() or not ((gaps == 0) | (gaps == k)).all():
        raise ValueError("history has an escape that is not followed by its record")
    tag = units[pos, 0].astype(np.int64)
    low = units[pos, 1]
    scenario, action = tag & 3, (tag >> 2) & 3
    delta = ((tag >> 4) << 8) | low
    delta = np.where(delta > DELTA_MAX, delta - 4096, delta)
    e = np.flatnonzero(gaps == k)
    if len(e):
        if (tag[e] != 0).any() or (low[e] != 0).any():
            raise ValueError("history has an escaped record with a non-zero tag")
        rows = pos[e][:, None] - np.arange(k, 0, -1)[None, :]
        payload = units[rows, 1:].reshape(len(e), -1)
        scenario[e], action[e] = payload[:, 0], payload[:, 1]
        wide = np.zeros((len(e), 8), dtype=np.uint8)
        wide[:, :5] = payload[:, 2:7]
        wide[:, 5:] = np.where(payload[:, 6:7] >= 0x80, 0xFF, 0)  # sign extension
        delta[e] = wide.view("<i8")[:, 0]
    return units, pos, scenario, action, delta


def decode(blob: bytes, code_bytes: int) -> np.ndarray:
    """Bytes of a whole history → records (in the order applied); ``ValueError`` for bytes that are not
    one (the previous 16-byte format included)."""
    dt = record_dtype(code_bytes)
    if not blob:
        return np.empty(0, dtype=dt)
    units, pos, scenario, action, delta = _parse(blob, code_bytes)
    out = np.empty(len(pos), dtype=dt)
    if len(pos) == 0:
        return out
    out["code"] = units[pos, 2:]
    out["scenario"], out["action"] = scenario, action
    # Per scenario, a running sum of its deltas.
    order = np.argsort(scenario, kind="stable")
    total = np.cumsum(delta[order])
    sc = scenario[order]
    first = np.ones(len(sc), dtype=bool)
    first[1:] = sc[1:] != sc[:-1]
    before = np.maximum.accumulate(np.where(first, np.arange(len(sc)), 0))  # each one's first of its scenario
    m = np.empty_like(total)
    m[order] = total - total[before] + delta[order][before]
    out["ts"] = m * MINUTE
    return out


def tail(blob: bytes, code_bytes: int) -> tuple[int, dict[int, int]]:
    """(records, ``last_minutes`` of them) of a whole history without decoding its records: all an append
    needs.  ``ValueError`` as ``decode``."""
    got = tail_many([blob], code_bytes)[0]
    if isinstance(got, ValueError):
        raise got
    return got


def tail_many(blobs: Sequence[bytes], code_bytes: int) -> list[tuple[int, dict[int, int]] | ValueError]:
    """``tail`` of each history in one vectorised pass (``mirstream bench planner``: 4-18 µs a history of
    100-1,000 records where ``decode`` + ``last_minutes`` take 60-110 µs); a blob that is not a history gets
    its ``ValueError`` in its place."""
    unit = unit_size(code_bytes)
    out: list[tuple[int, dict[int, int]] | ValueError] = [(0, {})] * len(blobs)
    whole = []  # blobs with a format byte and whole units: parsed together
    for i, b in enumerate(blobs):
        if b and b[0] == FORMAT and (len(b) - 1) % unit == 0:
            whole.append(i)
        elif b:
            out[i] = _tail_alone(b, code_bytes)
    if not whole:
        return out
    n_units = np.array([(len(blobs[i]) - 1) // unit for i in whole], dtype=np.int64)
    units = np.frombuffer(b"".join(memoryview(blobs[i])[1:] for i in whole), dtype=np.uint8).reshape(-1, unit)
    ends = np.cumsum(n_units)[n_units > 0]
    try:
        if (units[ends - 1, 0] == ESCAPE).any():  # an escape must be followed by its record in its own history
            raise ValueError
        _, pos, scenario, _, delta = _parse_units(units, code_bytes)
    except ValueError:  # some history is malformed: each alone, for its own error
        for i in whole:
            out[i] = _tail_alone(blobs[i], code_bytes)
        return out
    group = np.repeat(np.arange(len(whole)), n_units)[pos]
    key = group * 256 + scenario
    # A scenario's last minute is the sum of its deltas (its first carries the absolute minute).  Exact in
    # float64: each partial sum is a record's minute, below 2**39.
    sums = np.bincount(key, weights=delta.astype(np.float64), minlength=len(whole) * 256)
    counts = np.bincount(group, minlength=len(whole)).tolist()
    present = np.flatnonzero(np.bincount(key))
    last: list[dict[int, int]] = [{} for _ in whole]
    for k, minute in zip(present.tolist(), sums[present].tolist(), strict=True):
        last[k // 256][k % 256] = int(minute)
    for j, i in enumerate(whole):
        out[i] = (counts[j], last[j])
    return out


def _tail_alone(blob: bytes, code_bytes: int) -> ValueError | tuple[int, dict[int, int]]:
    """One history's tail the slow way (``decode``), or the ``ValueError`` it raises."""
    try:
        rec = decode(blob, code_bytes)
    except ValueError as exc:
        return exc
    return len(rec), last_minutes(rec) if len(rec) else {}


# --------------------------------------------------------------------------- reference, record by record


def encode_reference(rec: np.ndarray, after: dict[int, int] | None = None) -> bytes:
    """``encode``, one record at a time in plain Python."""
    code_bytes = rec.dtype["code"].shape[0]
    unit, k = unit_size(code_bytes), escape_units(code_bytes)
    out = bytearray() if after is not None else bytearray([FORMAT])
    last = dict(after or {})
    for r in rec:
        ts = float(r["ts"])
        if not math.isfinite(ts):
            raise ValueError("a history record's time must be finite")
        m = math.floor(ts / MINUTE)
        s, a = int(r["scenario"]), int(r["action"])
        d = m - last.get(s, 0)
        if abs(m) >= _TIME_LIMIT or abs(d) >= _TIME_LIMIT:
            raise ValueError("a history record's time is beyond ±2**39 minutes")
        last[s] = m
        tag = s | (a << 2) | (((d >> 8) & 0xF) << 4) if DELTA_MIN <= d <= DELTA_MAX else None
        if s < 4 and a < 4 and tag is not None and tag != ESCAPE:
            out += bytes([tag, d & 0xFF])
        else:
            payload = bytes([s, a]) + (d % 2**40).to_bytes(5, "little")
            payload += bytes(k * (unit - 1) - len(payload))
            for i in range(k):
                out += bytes([ESCAPE]) + payload[i * (unit - 1) : (i + 1) * (unit - 1)]
            out += bytes(2)
        out += bytes(r["code"])
    return bytes(out)


def decode_reference(blob: bytes, code_bytes: int) -> np.ndarray:
    """``decode``, one unit at a time in plain Python."""
    unit, k = unit_size(code_bytes), escape_units(code_bytes)
    rows: list[tuple] = []
    if blob:
        if blob[0] != FORMAT or (len(blob) - 1) % unit:
            raise ValueError(f"history of {len(blob)} bytes is not format {FORMAT} with {unit}-byte units")
        at, last, pending = 1, {}, b""
        while at < len(blob):
            u = blob[at : at + unit]
            at += unit
            if u[0] == ESCAPE:
                pending += u[1:]
                continue
            if pending:
                if len(pending) != k * (unit - 1) or u[0] or u[1]:
                    raise ValueError("history has an escape that is not followed by its record")
                s, a = pending[0], pending[1]
                d = int.from_bytes(pending[2:7], "little", signed=True)
                pending = b""
            else:
                s, a, d = u[0] & 3, (u[0] >> 2) & 3, ((u[0] >> 4) << 8) | u[1]
                d = d - 4096 if d > DELTA_MAX else d
            last[s] = last.get(s, 0) + d
            rows.append((np.frombuffer(u[2:], np.uint8), s, a, last[s] * MINUTE))
        if pending:
            raise ValueError("history has an escape that is not followed by its record")
    out = np.empty(len(rows), dtype=record_dtype(code_bytes))
    for i, (c, s, a, t) in enumerate(rows):
        out[i] = (c, s, a, t)
    return out
