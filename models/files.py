"""Readers of user event and item files: JSONL, CSV and Parquet, gzip accepted, in chunks.

Why chunks: a team's event log can be larger than memory, so every reader yields bounded lists of rows
(``chunk_rows``) and keeps nothing else; callers that need everything (training) build compact numpy
columns from the chunks.  Why a rejects file: a bad row (missing field, unparsable ``ts``, unknown item
or scenario, NaN vector) must not stop a run over millions of good ones, and must not vanish either: it
is counted and written with its file, line number and reason (``Rejects``), and every valid row goes on.

Line numbers: JSONL and CSV give the physical line of the row (a CSV header is line 1), Parquet the row
number counted from 1.  The schema itself is ``models.schema``.
"""

from __future__ import annotations

import csv
import gzip
import io
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import orjson

from models.schema import EventRecord, ItemRecord, Rejected, check_event, check_item

CHUNK_ROWS = 65_536
FORMATS = ("jsonl", "csv", "parquet")


def file_format(path: str | Path) -> str:
    """jsonl / csv / parquet from the name (``.json``/``.ndjson`` are JSONL; ``.gz`` is looked through)."""
    name = Path(path).name.lower().removesuffix(".gz")
    suffix = name.rsplit(".", 1)[-1] if "." in name else ""
    fmt = {"jsonl": "jsonl", "ndjson": "jsonl", "json": "jsonl", "csv": "csv", "parquet": "parquet", "pq": "parquet"}
    if suffix not in fmt:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use .jsonl, .csv or .parquet (optionally .gz)")
    return fmt[suffix]


def _open_text(path: Path) -> IO[str]:
    raw = gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")  # noqa: SIM115
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


class Rejects:
    """Counts bad rows by reason and writes each as one JSON line {file, line, reason, row} (``path`` None:
    counted only).  The reason is the part before the first ';' or ':' detail, for the counts."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else None
        self._out = None
        self.counts: Counter[str] = Counter()

    def add(self, file: str | Path, line: int, reason: str, row: object = None) -> None:
        self.counts[_kind(reason)] += 1
        if self.path is not None:
            if self._out is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._out = open(self.path, "ab")  # noqa: SIM115
            entry = {"file": str(file), "line": line, "reason": reason, "row": row}
            self._out.write(orjson.dumps(entry, default=str, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.total:
            return "0 rejected rows"
        parts = ", ".join(f"{n} {k}" for k, n in self.counts.most_common())
        where = f" (written to {self.path})" if self.path else ""
        return f"{self.total} rejected rows: {parts}{where}"

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> Rejects:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kind(reason: str) -> str:
    for sep in (";", ":"):
        reason = reason.split(sep, 1)[0]
    return reason.strip()


def iter_rows(path: str | Path, chunk_rows: int = CHUNK_ROWS) -> Iterator[list[tuple[int, dict | Rejected]]]:
    """Chunks of (line number, row as a dict, or ``Rejected`` when the line itself cannot be parsed)."""
    path = Path(path)
    fmt = file_format(path)
    if fmt == "parquet":
        yield from _parquet(path, chunk_rows)
    elif fmt == "csv":
        yield from _csv(path, chunk_rows)
    else:
        yield from _jsonl(path, chunk_rows)


def _jsonl(path: Path, chunk_rows: int) -> Iterator[list[tuple[int, dict | Rejected]]]:
    chunk: list[tuple[int, dict | Rejected]] = []
    with _open_text(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                chunk.append((n, row if isinstance(row, dict) else Rejected("row must be a JSON object")))
            except orjson.JSONDecodeError as exc:
                chunk.append((n, Rejected(f"malformed JSON: {exc}")))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _csv(path: Path, chunk_rows: int) -> Iterator[list[tuple[int, dict | Rejected]]]:
    chunk: list[tuple[int, dict | Rejected]] = []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            if None in row:  # more cells than the header has
                width = len(reader.fieldnames or [])
                chunk.append((reader.line_num, Rejected(f"more cells than the header's {width}")))
            else:
                chunk.append((reader.line_num, {k: v for k, v in row.items() if v is not None}))
            if len(chunk) >= chunk_rows:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _parquet(path: Path, chunk_rows: int) -> Iterator[list[tuple[int, dict | Rejected]]]:
    import pyarrow.parquet as pq

    n = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_rows):
        rows = batch.to_pylist()
        yield [(n + i + 1, row) for i, row in enumerate(rows)]
        n += len(rows)


def read_events(
    paths: str | Path | list,
    rejects: Rejects,
    scenarios: tuple[str, ...] | None = None,
    actions: tuple[str, ...] | None = None,
    items: set[str] | dict | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Iterator[list[tuple[int, EventRecord]]]:
    """Valid events in chunks, with their line numbers; bad rows go to ``rejects``.  ``items``: the known
    item ids (an event of another item is rejected as 'unknown item'); None: any."""
    for path in paths if isinstance(paths, list) else [paths]:
        for chunk in iter_rows(path, chunk_rows):
            good = []
            for line, row in chunk:
                try:
                    if isinstance(row, Rejected):
                        raise row
                    rec = check_event(row, scenarios, actions, lenient=True)  # string cells, ISO times
                    if items is not None and rec.item_id not in items:
                        raise Rejected(f"unknown item: {rec.item_id!r} is not in the item file")
                    good.append((line, rec))
                except Rejected as exc:
                    rejects.add(path, line, str(exc), None if isinstance(row, Rejected) else row)
            if good:
                yield good


def read_items(
    paths: str | Path | list, rejects: Rejects, dim: int | None = None, chunk_rows: int = CHUNK_ROWS
) -> Iterator[list[tuple[int, ItemRecord]]]:
    """Valid items in chunks, with their line numbers; bad rows go to ``rejects``.  ``dim``: the vector
    dimension expected (None: the first vector's)."""
    for path in paths if isinstance(paths, list) else [paths]:
        for chunk in iter_rows(path, chunk_rows):
            good = []
            for line, row in chunk:
                try:
                    if isinstance(row, Rejected):
                        raise row
                    rec = check_item(row, dim, lenient=True)
                    if dim is None and rec.vector is not None:
                        dim = len(rec.vector)
                    good.append((line, rec))
                except Rejected as exc:
                    rejects.add(path, line, str(exc), None if isinstance(row, Rejected) else row)
            if good:
                yield good
