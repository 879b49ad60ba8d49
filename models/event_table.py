"""Event files as Arrow tables: the columnar fast path of ``models.files.read_events``.

Why: the batch backfill reads billions of rows, and checking each one as a Python dict
(``models.schema.check_event``, a few microseconds a row) costs more than everything else it does per
event.  Here a Parquet chunk is checked column by column with Arrow compute, and only the rows that the
vectorised check cannot vouch for go through ``check_event`` one by one (the reference: it accepts them
or gives the reason).  The vectorised check is deliberately narrower than the schema (ASCII ids only,
numeric ``ts`` columns only), so a row it passes is one ``check_event`` passes with the same values;
``tests/test_event_table.py`` holds the two paths to the same rows and the same rejects.  JSONL and CSV
rows are dicts already: they go through the reference and come out as the same table.

A table holds: ``file`` (the index of the path in the list given), ``line``, ``event_id`` (the file's, or
``derived_event_id``), ``user_id``, ``item_id``, ``scenario`` / ``action`` (indexes into the known
names), ``ts`` (float64 seconds) and ``query``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from models.files import CHUNK_ROWS, Rejects, file_format, read_events
from models.schema import EVENT_FIELDS, Rejected, check_event, derived_event_id

SCHEMA = pa.schema(
    [
        ("file", pa.int32()),
        ("line", pa.int64()),
        ("event_id", pa.string()),
        ("user_id", pa.string()),
        ("item_id", pa.string()),
        ("scenario", pa.int8()),
        ("action", pa.int8()),
        ("ts", pa.float64()),
        ("query", pa.string()),
    ]
)
#: 1 to 128 printable ASCII characters without braces: ids ``models.schema.ident`` keeps as they are.
PLAIN_ID = r"^[ -z|~]{1,128}$"


def read_event_tables(
    paths: list[str | Path],
    rejects: Rejects,
    scenarios: tuple[str, ...],
    actions: tuple[str, ...],
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[pa.Table]:
    """Valid events of each file in chunks, as ``SCHEMA`` tables; bad rows go to ``rejects``."""
    for f, path in enumerate(paths):
        if file_format(path) == "parquet":
            yield from _parquet(f, Path(path), rejects, scenarios, actions, chunk_rows)
        else:
            for chunk in read_events(path, rejects, scenarios, actions, chunk_rows=chunk_rows):
                yield from_records(f, chunk, scenarios, actions)


def from_records(f: int, chunk: list, scenarios: tuple[str, ...], actions: tuple[str, ...]) -> pa.Table:
    """(line, ``EventRecord``) pairs → a ``SCHEMA`` table."""
    s_index, a_index = {s: i for i, s in enumerate(scenarios)}, {a: i for i, a in enumerate(actions)}
    return pa.table(
        {
            "file": pa.array([f] * len(chunk), pa.int32()),
            "line": pa.array([line for line, _ in chunk], pa.int64()),
            "event_id": pa.array([e.event_id for _, e in chunk], pa.string()),
            "user_id": pa.array([e.user_id for _, e in chunk], pa.string()),
            "item_id": pa.array([e.item_id for _, e in chunk], pa.string()),
            "scenario": pa.array([s_index[e.scenario] for _, e in chunk], pa.int8()),
            "action": pa.array([a_index[e.action] for _, e in chunk], pa.int8()),
            "ts": pa.array([e.ts for _, e in chunk], pa.float64()),
            "query": pa.array([e.query for _, e in chunk], pa.string()),
        },
        schema=SCHEMA,
    )


def _parquet(
    f: int, path: Path, rejects: Rejects, scenarios: tuple[str, ...], actions: tuple[str, ...], chunk_rows: int
) -> Iterator[pa.Table]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
        lines = pa.array(range(n + 1, n + 1 + batch.num_rows), pa.int64())
        n += batch.num_rows
        good = plain_rows(batch, scenarios, actions)
        parts = []
        if good is not None:
            parts.append(_fast(f, batch.filter(good), lines.filter(good), scenarios, actions))
            rest, rest_lines = batch.filter(pc.invert(good)), lines.filter(pc.invert(good))
        else:
            rest, rest_lines = batch, lines
        if rest.num_rows:
            checked = []
            for line, row in zip(rest_lines.to_pylist(), rest.to_pylist(), strict=True):
                try:
                    checked.append((line, check_event(row, scenarios, actions, lenient=True)))
                except Rejected as exc:
                    rejects.add(path, line, str(exc), row)
            if checked:
                parts.append(from_records(f, checked, scenarios, actions))
        if parts:
            yield pa.concat_tables(parts)


def plain_rows(batch: pa.RecordBatch, scenarios: tuple[str, ...], actions: tuple[str, ...]) -> pa.Array | None:
    """Rows the vectorised check vouches for (a boolean mask), or None when the batch's column types
    leave every row to the reference (an id column of integers, ``ts`` as text, a field missing...)."""
    names = set(batch.schema.names)
    if not set(EVENT_FIELDS) <= names:
        return None
    strings = (pa.types.is_string, pa.types.is_large_string)
    for col in ("user_id", "item_id", "scenario", "action", *({"event_id", "query"} & names)):
        if not any(check(batch.schema.field(col).type) for check in strings):
            return None
    ts_type = batch.schema.field("ts").type
    if not (pa.types.is_floating(ts_type) or pa.types.is_integer(ts_type)):
        return None
    ts = batch.column("ts")
    ok = pc.and_(
        pc.and_(
            pc.match_substring_regex(batch.column("user_id"), PLAIN_ID),
            pc.match_substring_regex(batch.column("item_id"), PLAIN_ID),
        ),
        pc.and_(
            pc.is_in(batch.column("scenario"), pa.array(scenarios)), pc.is_in(batch.column("action"), pa.array(actions))
        ),
    )
    positive = pc.greater(ts, 0)
    if pa.types.is_floating(ts_type):
        positive = pc.and_(positive, pc.is_finite(ts))
    ok = pc.and_(ok, positive)
    if "event_id" in names:
        eid = batch.column("event_id")
        given = pc.and_(pc.is_valid(eid), pc.not_equal(eid, ""))
        ok = pc.and_(ok, pc.or_(pc.invert(given), pc.match_substring_regex(eid, PLAIN_ID)))
    return pc.fill_null(ok, False)


def _fast(
    f: int, batch: pa.RecordBatch, lines: pa.Array, scenarios: tuple[str, ...], actions: tuple[str, ...]
) -> pa.Table:
    """Rows ``plain_rows`` passed → a ``SCHEMA`` table (derived ids where the file gives none)."""
    users, items = batch.column("user_id").cast(pa.string()), batch.column("item_id").cast(pa.string())
    scenario = pc.index_in(batch.column("scenario"), pa.array(scenarios)).cast(pa.int8())
    action = pc.index_in(batch.column("action"), pa.array(actions)).cast(pa.int8())
    ts = batch.column("ts").cast(pa.float64())
    names = set(batch.schema.names)
    query = pc.fill_null(batch.column("query").cast(pa.string()), "") if "query" in names else None
    ids = batch.column("event_id").cast(pa.string()) if "event_id" in names else None
    if ids is None or pc.any(pc.fill_null(pc.equal(ids, ""), True)).as_py():  # some rows need a derived id
        given = ids.to_pylist() if ids is not None else [None] * batch.num_rows
        u, it, s, a, t = users.to_pylist(), items.to_pylist(), scenario.to_pylist(), action.to_pylist(), ts.to_pylist()
        ids = pa.array(
            [
                i if i not in (None, "") else derived_event_id(u[k], it[k], scenarios[s[k]], actions[a[k]], t[k])
                for k, i in enumerate(given)
            ],
            pa.string(),
        )
    return pa.table(
        {
            "file": pa.array([f] * batch.num_rows, pa.int32()),
            "line": lines,
            "event_id": ids,
            "user_id": users,
            "item_id": items,
            "scenario": scenario,
            "action": action,
            "ts": ts,
            "query": query if query is not None else pa.array([""] * batch.num_rows, pa.string()),
        },
        schema=SCHEMA,
    )
