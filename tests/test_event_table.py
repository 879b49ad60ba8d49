"""The columnar event reader (``models.event_table``, the backfill's fast path) against the row reader
(``models.files.read_events``, the reference): the same events and the same rejects, line for line, on
files mixing good rows with every kind of bad or unusual one.  No services."""

from __future__ import annotations

import math

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models.event_table import plain_rows, read_event_tables
from models.files import Rejects, read_events

SCENARIOS, ACTIONS = ("feed", "search", "ads"), ("click", "like", "skip")


def good(i: int) -> dict:
    return {
        "event_id": f"e{i}",
        "user_id": f"u{i % 7}",
        "item_id": f"i{i % 11}",
        "scenario": SCENARIOS[i % 3],
        "action": ACTIONS[i % 2],
        "ts": 1.7e9 + i,
        "query": "shoes" if i % 3 == 1 else None,
    }


ODD = [
    {"user_id": "ü-ser"},  # non-ASCII: valid, only the reference can say so
    {"item_id": "x{1}"},  # braces: rejected
    {"user_id": "bad\u202eid"},  # bidi override: rejected
    {"user_id": "tab\tid"},  # control character: rejected
    {"user_id": "u" * 129},  # too long: rejected
    {"user_id": "u" * 128},  # longest allowed
    {"user_id": ""},  # empty: missing
    {"user_id": None},  # null: missing
    {"scenario": "mail"},  # unknown scenario
    {"action": None},
    {"ts": float("nan")},
    {"ts": float("inf")},
    {"ts": -5.0},
    {"ts": 0.0},
    {"ts": None},
    {"event_id": None},  # derived id
    {"event_id": ""},  # derived id
    {"event_id": "é-1"},  # non-ASCII id: valid
    {"event_id": "{x}"},  # braces: rejected
    {"query": None},
    {"user_id": " "},  # a space is printable
]


def rows() -> list[dict]:
    out = [good(i) for i in range(60)]
    for k, change in enumerate(ODD):
        out.insert(3 * k + 1, {**good(100 + k), **change})
    return out


def reference(paths: list[str], rejects: Rejects) -> list[tuple]:
    out = []
    for f, path in enumerate(paths):
        for chunk in read_events(path, rejects, SCENARIOS, ACTIONS, chunk_rows=16):
            for line, e in chunk:
                s, a = SCENARIOS.index(e.scenario), ACTIONS.index(e.action)
                out.append((f, line, e.event_id, e.user_id, e.item_id, s, a, e.ts, e.query))
    return out


def fast(paths: list[str], rejects: Rejects) -> list[tuple]:
    out = []
    for table in read_event_tables(paths, rejects, SCENARIOS, ACTIONS, chunk_rows=16):
        cols = [table.column(n).to_pylist() for n in table.schema.names]
        out += list(zip(*cols, strict=True))
    return out


def logged(path) -> list[tuple]:
    return sorted((e["file"], e["line"], e["reason"]) for e in map(orjson.loads, path.read_bytes().splitlines()))


def same(a: list[tuple], b: list[tuple]) -> None:
    key = lambda r: (r[0], r[1])  # noqa: E731
    a, b = sorted(a, key=key), sorted(b, key=key)
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x[:7] == y[:7] and x[8] == y[8], (x, y)
        assert x[7] == y[7] or (math.isnan(x[7]) and math.isnan(y[7]))


@pytest.mark.parametrize("ts_type", [pa.float64(), pa.int64(), pa.string()])
def test_parquet_columns_give_the_rows_and_rejects_of_the_reference(tmp_path, ts_type):
    data = rows()
    if ts_type == pa.int64():  # an integer column cannot hold NaN/inf: those rows become null
        data = [{**r, "ts": int(r["ts"]) if r["ts"] is not None and math.isfinite(r["ts"]) else None} for r in data]
    if ts_type == pa.string():  # times as text: every row through the reference
        data = [{**r, "ts": None if r["ts"] is None else repr(r["ts"])} for r in data]
    schema = pa.schema([(k, ts_type if k == "ts" else pa.string()) for k in data[0]])
    path = tmp_path / "events.parquet"
    pq.write_table(pa.Table.from_pylist(data, schema=schema), path, row_group_size=10)
    with Rejects(tmp_path / "ref.jsonl") as r1, Rejects(tmp_path / "fast.jsonl") as r2:
        want, got = reference([str(path)], r1), fast([str(path)], r2)
    same(got, want)
    assert r1.counts == r2.counts and r1.total > 5
    assert logged(tmp_path / "ref.jsonl") == logged(tmp_path / "fast.jsonl")
    derived = [r for r in got if r[2].startswith("d")]
    assert len(derived) >= 2  # null and empty event ids got derived ids
    vouched = [plain_rows(b, SCENARIOS, ACTIONS) for b in pq.ParquetFile(path).iter_batches(batch_size=16)]
    if ts_type == pa.string():
        assert all(v is None for v in vouched)
    else:  # the fast path took the plain rows, the reference the rest
        assert 60 <= sum(pc.sum(v).as_py() for v in vouched) < len(data)


def test_integer_ids_and_jsonl_go_through_the_reference(tmp_path):
    data = [{**good(i), "user_id": i % 5, "item_id": i % 9} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "ints.parquet")
    (tmp_path / "rows.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows()))
    paths = [str(tmp_path / "ints.parquet"), str(tmp_path / "rows.jsonl")]
    with Rejects() as r1, Rejects() as r2:
        want, got = reference(paths, r1), fast(paths, r2)
    same(got, want)
    assert r1.counts == r2.counts
    assert {r[3] for r in got if r[0] == 0} == {str(u) for u in range(5)}
