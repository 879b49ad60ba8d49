"""Compact history records: the vectorised codec equals the record-by-record reference, and decodes to the
same records it was given (times floored to the minute), escapes, gaps, disorder and trims included."""

from __future__ import annotations

import numpy as np
import pytest

from state.history import (
    FORMAT,
    decode,
    decode_reference,
    encode,
    encode_many,
    encode_reference,
    escape_units,
    last_minutes,
    records,
    tail,
    tail_many,
    unit_size,
)


def _random(rng: np.random.Generator, n: int, code_bytes: int, wide: bool) -> np.ndarray:
    codes = rng.integers(0, 256, (n, code_bytes), dtype=np.uint8)
    hi = 256 if wide else 4
    scenario, action = rng.integers(0, hi, n), rng.integers(0, hi, n)
    gaps = rng.choice([0.0, 20.0, 3600.0, 2047 * 60.0, 2048 * 60.0, 86400.0 * 400, -7200.0, -30.0, -2049 * 60.0], n)
    gaps *= rng.uniform(0.5, 1.5, n)
    ts = 1.7e9 + np.cumsum(gaps) + rng.uniform(0, 60, n)
    if wide and n:
        ts[rng.integers(0, n)] = -3.0e9  # before 1970, far from its neighbours
    return records(codes, scenario, action, ts)


@pytest.mark.parametrize("code_bytes", [6, 8, 2])
@pytest.mark.parametrize("wide", [False, True])
def test_fast_codec_equals_reference_and_round_trips(code_bytes: int, wide: bool) -> None:
    rng = np.random.default_rng(code_bytes + 10 * wide)
    for n in (0, 1, 2, 7, 300):
        rec = _random(rng, n, code_bytes, wide)
        blob = encode(rec)
        assert blob == encode_reference(rec)
        assert blob[:1] == bytes([FORMAT])
        for got in (decode(blob, code_bytes), decode_reference(blob, code_bytes)):
            assert got.dtype == rec.dtype
            np.testing.assert_array_equal(got, rec)
        assert tail(blob, code_bytes) == ((n, last_minutes(rec)) if n else (0, {}))


def test_appends_and_trims_decode_to_the_same_records() -> None:
    """A history grown by appends (each encoded after the last stored minute) and one re-encoded from a
    trimmed tail decode to the records they were given."""
    rng = np.random.default_rng(3)
    rec = _random(rng, 500, 6, True)
    blob = encode(rec[:100])
    for start, end in ((100, 101), (101, 260), (260, 500)):
        part = encode(rec[start:end], after=last_minutes(rec[:start]))
        assert part == encode_reference(rec[start:end], after=last_minutes(rec[:start]))
        blob += part
        assert tail(blob, 6) == (end, last_minutes(rec[:end]))
    np.testing.assert_array_equal(decode(blob, 6), rec)
    for cut in (1, 17, 250, 499):
        np.testing.assert_array_equal(decode(encode(rec[cut:]), 6), rec[cut:])


def test_times_floor_to_the_minute_and_re_encode_unchanged() -> None:
    ts = np.array([1.7e9 + 59.9, 1.7e9 + 60.0, 1.7e9 - 0.5, -61.0, 0.0])
    rec = records(np.zeros((5, 6), np.uint8), np.zeros(5), np.zeros(5), ts)
    np.testing.assert_array_equal(rec["ts"], np.floor(ts / 60) * 60)
    again = decode(encode(rec), 6)
    assert encode(again) == encode(rec)


def test_simulated_log_costs_about_eight_bytes_an_event() -> None:
    """Hour-apart events (the simulator's gaps), 3 scenarios, 3 actions: 1,000 records stay in Redis's
    8 KB allocation class (≤ 8,186 B)."""
    rng = np.random.default_rng(0)
    ts = 1.7e9 + np.cumsum(rng.exponential(3600.0, 1000))
    codes = rng.integers(0, 256, (1000, 6), dtype=np.uint8)
    rec = records(codes, rng.integers(0, 3, 1000), rng.integers(0, 3, 1000), ts)
    assert len(encode(rec)) <= 8186
    # Applied out of time order (scenario topics interleave): steps back stay in the tag too.
    order = np.argsort(np.arange(1000) + rng.uniform(0, 6, 1000))
    assert (np.diff(rec["ts"][order]) < 0).sum() > 100 and len(encode(rec[order])) <= 8186


def test_values_that_fit_no_record_raise() -> None:
    codes = np.zeros((1, 6), np.uint8)
    with pytest.raises(ValueError, match=r"0\.\.255"):
        records(codes, [256], [0], [1.7e9])
    with pytest.raises(ValueError, match="finite"):
        records(codes, [0], [0], [float("nan")])
    with pytest.raises(ValueError, match="2\\*\\*39"):
        records(codes, [0], [0], [1e20])


def test_malformed_and_previous_format_blobs_fail_loudly() -> None:
    old = np.zeros(3, dtype=[("code", np.uint8, (6,)), ("scenario", np.uint8), ("action", np.uint8), ("ts", "<f8")])
    old["ts"] = 1.7e9
    with pytest.raises(ValueError, match="previous format"):
        decode(old.tobytes(), 6)
    rec = _random(np.random.default_rng(1), 5, 6, True)
    blob = encode(rec)
    for bad in (blob[:-1], blob + bytes([0xFF]) + bytes(unit_size(6) - 1), b"\x01" + blob[1:]):
        for dec in (decode, decode_reference, tail):
            with pytest.raises(ValueError):
                dec(bad, 6)
    assert escape_units(6) == 1 and escape_units(2) == 3


def test_many_histories_encode_at_once_as_each_alone() -> None:
    rng = np.random.default_rng(7)
    counts = np.array([3, 0, 1, 40, 0, 12])
    rec = _random(rng, int(counts.sum()), 6, True)
    ends = np.cumsum(counts)
    want = [encode(rec[e - c : e]) for c, e in zip(counts, ends, strict=True)]
    assert encode_many(rec, counts) == want
    assert encode_many(rec[:0], np.array([0, 0])) == [encode(rec[:0])] * 2


def test_tails_of_many_histories_at_once_equal_each_alone() -> None:
    """``tail_many`` over good, empty and malformed histories side by side: each good one's count and last
    minutes as decoded, each malformed one its own ``ValueError``, whatever its neighbours."""
    rng = np.random.default_rng(11)
    recs = [_random(rng, n, 6, wide) for n, wide in ((1, False), (40, True), (0, False), (300, False), (7, True))]
    good = [encode(r) for r in recs]
    bad = [good[1][:-1], good[3] + bytes([0xFF]) + bytes(unit_size(6) - 1), b"\x01" + good[4][1:]]
    blobs = [good[0], bad[0], b"", good[1], bad[1], good[2], good[3], bad[2], good[4]]
    got = tail_many(blobs, 6)
    for blob, g in zip(blobs, got, strict=True):
        if blob in bad:
            assert isinstance(g, ValueError)
            with pytest.raises(ValueError, match=str(g)[:20]):
                decode(blob, 6)
        else:
            rec = decode(blob, 6)
            assert g == (len(rec), last_minutes(rec) if len(rec) else {})
    assert tail_many(good, 6) == [tail(b, 6) for b in good]


def test_appends_of_many_histories_at_once_equal_each_alone() -> None:
    rng = np.random.default_rng(12)
    olds = [_random(rng, n, 6, True) for n in (5, 0, 30)]
    news = [_random(rng, n, 6, True) for n in (3, 4, 1)]
    after = [last_minutes(o) if len(o) else None for o in olds]
    got = encode_many(np.concatenate(news), [len(n) for n in news], after)
    assert got == [encode(n, a) for n, a in zip(news, after, strict=True)]
    for old, new, blob in zip(olds, news, got, strict=True):
        whole = encode(old) + blob if len(old) else blob
        np.testing.assert_array_equal(decode(whole, 6), np.concatenate([old, new]))
