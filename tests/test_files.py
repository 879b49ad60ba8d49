"""The shared schema and the file readers: every format reads the same rows, bad rows are counted and written
with their line and reason, and nothing valid is lost."""

from __future__ import annotations

import csv
import gzip

import orjson
import pytest

from models.data import load_files
from models.files import Rejects, file_format, read_events, read_items
from models.schema import Rejected, check_event, check_item, derived_event_id

EVENTS = [
    {"user_id": "u1", "item_id": "a", "scenario": "feed", "action": "click", "ts": 1700000000.5},
    {"user_id": "u1", "item_id": "b", "scenario": "search", "action": "click", "ts": 1700000100, "query": "jazz"},
    {"user_id": "u2", "item_id": "a", "scenario": "feed", "action": "like", "ts": "2023-11-14T22:13:20Z"},
    {"user_id": "u2", "item_id": "zz", "scenario": "feed", "action": "like", "ts": 1700000300},  # unknown item
    {"user_id": "u3", "item_id": "b", "scenario": "feed", "action": "click"},  # missing ts
    {"user_id": "u3", "item_id": "b", "scenario": "feed", "action": "click", "ts": "yesterday"},  # bad ts
    {"user_id": "u3", "item_id": "b", "scenario": "feed", "action": "click", "ts": 1700000400, "event_id": "e9"},
]
ITEMS = [
    {"item_id": "a", "text": "jazz vinyl", "vector": [1.0, 0.0, 0.0]},
    {"item_id": "b", "text": "ramen", "vector": [0.0, 1.0, 0.5], "category": "food"},
    {"item_id": "c", "text": "nan item", "vector": [float("nan"), 1.0, 0.0]},
]


def _write(path, rows, fmt):
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        cols = sorted({k for r in rows for k in r})
        pq.write_table(pa.table({c: [None if r.get(c) is None else str(r[c]) for r in rows] for c in cols}), path)
        return
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", newline="") as f:
        if fmt == "csv":
            cols = sorted({k for r in rows for k in r})
            w = csv.DictWriter(f, cols)
            w.writeheader()
            for r in rows:
                w.writerow({k: (orjson.dumps(v).decode() if isinstance(v, list) else v) for k, v in r.items()})
        else:
            for r in rows:
                f.write(orjson.dumps(r, option=orjson.OPT_SERIALIZE_NUMPY).decode() + "\n")


@pytest.mark.parametrize("name", ["ev.jsonl", "ev.jsonl.gz", "ev.csv", "ev.csv.gz", "ev.parquet"])
def test_every_format_reads_the_same_valid_events_and_rejects_the_same_rows(tmp_path, name):
    fmt = file_format(name)
    path = tmp_path / name
    _write(path, EVENTS, fmt)
    out = tmp_path / "rejects.jsonl"
    with Rejects(out) as rejects:
        got = [e for chunk in read_events(path, rejects, items={"a", "b"}, chunk_rows=2) for e in chunk]
    assert [e.user_id for _, e in got] == ["u1", "u1", "u2", "u3"]
    assert got[2][1].ts == 1700000000.0  # ISO-8601 → seconds (UTC)
    assert got[1][1].query == "jazz" and got[3][1].event_id == "e9"
    assert got[0][1].event_id == derived_event_id("u1", "a", "feed", "click", 1700000000.5)
    assert rejects.counts == {"unknown item": 1, "missing fields": 1, "unparsable ts": 1}
    written = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    first_row = 2 if fmt == "csv" else 1  # a CSV header is line 1
    assert [w["line"] for w in written] == [first_row + 3, first_row + 4, first_row + 5]
    assert written[0]["row"]["item_id"] == "zz" and "unknown item" in written[0]["reason"]


def test_items_nan_vector_is_rejected_and_the_others_kept(tmp_path):
    path = tmp_path / "items.csv"
    _write(path, ITEMS, "csv")
    rejects = Rejects()
    got = [it for chunk in read_items(path, rejects) for _, it in chunk]
    assert [it.item_id for it in got] == ["a", "b"] and got[1].category == "food"
    assert rejects.counts == {"vector contains NaN or infinite values": 1}


def test_malformed_lines_are_rejected_with_their_line_number(tmp_path):
    path = tmp_path / "ev.jsonl"
    good = [orjson.dumps(e).decode() for e in EVENTS[:2]]
    path.write_text(f"{good[0]}\n{{not json\n[1, 2]\n\n{good[1]}\n")
    out = tmp_path / "bad.jsonl"
    with Rejects(out) as rejects:
        got = [e for chunk in read_events(path, rejects) for e in chunk]
    assert [line for line, _ in got] == [1, 5]
    assert [orjson.loads(x)["line"] for x in out.read_bytes().splitlines()] == [2, 3]
    assert rejects.total == 2 and "2 rejected rows" in rejects.summary()


def test_unknown_scenario_is_rejected_with_the_known_ones():
    with pytest.raises(Rejected, match="unknown scenario 'shop'; known: feed, ads"):
        check_event({**EVENTS[0], "scenario": "shop"}, scenarios=("feed", "ads"))
    with pytest.raises(Rejected, match="missing fields: event_id"):
        check_event(EVENTS[0], require_id=True)  # Kafka messages must carry one
    with pytest.raises(Rejected, match="field 'ts' must be"):
        check_event({**EVENTS[0], "ts": "1700000000"})  # strict (Kafka): a string is not a time
    with pytest.raises(Rejected, match="all zeros"):
        check_item({"item_id": "x", "vector": [0, 0]})


def test_load_files_builds_a_dataset_of_the_valid_rows(tmp_path):
    ev, it = tmp_path / "ev.jsonl", tmp_path / "items.jsonl"
    _write(ev, EVENTS, "jsonl")
    _write(it, ITEMS[:2], "jsonl")
    rejects = Rejects()
    ds = load_files(ev, it, rejects)
    assert ds.scenarios == ("feed", "search") and ds.actions == ("click", "like")
    assert list(ds.user_ids) == ["u1", "u2", "u3"] and list(ds.lengths()) == [2, 1, 1]
    assert ds.item_vectors.shape == (2, 3) and ds.event_ids[-1] == "e9"
    assert rejects.total == 3
    with pytest.raises(ValueError, match="no valid event"):
        load_files(ev, it, Rejects(), scenarios=("ads",))
