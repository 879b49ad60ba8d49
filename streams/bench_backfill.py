"""``mirstream bench backfill``: the batch backfill against streaming the same events, in one run.

Synthetic data at scale (``bulk_log``: the simulator's catalogue, users × events drawn vectorised with the
simulator's structure: two browse interests on the feed, one intent interest on search and ads) written
to a Parquet events file and a JSONL items file, as a user would bring them.  Then, on fresh prefixes of
the same Kafka + Redis:

- ``backfill``: ``mirstream backfill`` on the files (items, then every event), refinement on; the split
  between spill / encode / coarse / refine / redis from its report;
- ``stream``: the same users' events produced to Kafka and applied by one worker with refinement on,
  timed from the first applied event to the last user's vectors (``streams.bench.watch_pipeline``).

Streaming every event of 100k users takes hours on two cores, so the stream runs on the events of the
first ``stream_users`` users of the same log (``0``: all) and its events/s is the figure compared; the
table says how many events each side ran.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import orjson

from models.bench import print_table, write_rows
from models.data import Dataset, _finish, load
from models.files import Rejects
from streams.backfill import run_backfill
from streams.bench import _fresh_prefix, _prepared_run, ensure_checkpoint, watch_pipeline
from streams.replay import expected_seq, item_body, plan, send_events
from streams.settings import Settings
from streams.workerproc import WorkerProcess


def bulk_log(users: int, events_per_user: int, seed: int = 0, catalogue: Dataset | None = None) -> Dataset:
    """``users`` × ``events_per_user`` events over the simulator's catalogue, drawn vectorised."""
    cat = catalogue or load("sim")
    rng = np.random.default_rng(seed)
    clusters = int(cat.item_category.max()) + 1
    by_cluster = [np.flatnonzero(cat.item_category == c) for c in range(clusters)]
    n = users * events_per_user
    user = np.repeat(np.arange(users), events_per_user)
    browse = rng.integers(0, clusters, (users, 2))
    intent = rng.integers(0, clusters, users)
    r = rng.random(n)
    scenario = np.where(r < 0.6, 0, np.where(r < 0.8, 1, 2))
    pick = rng.integers(0, 2, n)
    cluster = np.where(scenario == 0, browse[user, pick], intent[user])
    noise = rng.random(n) < 0.15
    cluster[noise] = rng.integers(0, clusters, int(noise.sum()))
    action = np.where(scenario == 0, np.where(rng.random(n) < 0.1, 2, np.where(rng.random(n) < 0.2, 1, 0)), 0)
    sizes = np.asarray([len(b) for b in by_cluster])
    slot = (rng.random(n) * sizes[cluster]).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    flat = np.concatenate(by_cluster)
    item = flat[starts[cluster] + slot]
    gaps = rng.exponential(3600.0, (users, events_per_user)).cumsum(axis=1)
    ts = (1.7e9 + rng.uniform(0, 86400 * 30, (users, 1)) + gaps).ravel()
    return _finish(
        f"bulk-{users}x{events_per_user}",
        cat.scenarios,
        cat.actions,
        cat.item_ids,
        cat.item_text,
        cat.item_category,
        user,
        item,
        scenario,
        action,
        ts,
        item_vectors=cat.item_vectors,
        query=None,
    )


def write_files(ds: Dataset, folder: Path) -> tuple[Path, Path]:
    """The log as a user's files: events in Parquet (one row group per 1M events), items in JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    events, items = folder / "events.parquet", folder / "items.jsonl"
    table = pa.table(
        {
            "event_id": [f"{ds.name}-{i}" for i in range(len(ds.ts))],
            "user_id": ds.user_ids[ds.user].astype(str),
            "item_id": ds.item_ids[ds.item].astype(str),
            "scenario": np.asarray(ds.scenarios)[ds.scenario],
            "action": np.asarray(ds.actions)[ds.action],
            "ts": ds.ts,
        }
    )
    pq.write_table(table, events, row_group_size=1_000_000)
    items.write_bytes(b"".join(orjson.dumps(item_body(ds, j)) + b"\n" for j in range(ds.n_items)))
    return events, items


def bench_backfill(
    settings: Settings,
    users: int = 100_000,
    events_per_user: int = 50,
    stream_users: int = 2_000,
    out: str = "bench",
) -> list[dict]:
    """Backfill events/s and users/s against the stream's, refinement on for both; prints a table."""
    ensure_checkpoint(settings)
    ds = bulk_log(users, events_per_user)
    n = len(ds.ts)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="mirstream-bench-backfill-") as tmp:
        print(f"== {users:,} users × {events_per_user} events = {n:,} events → Parquet", flush=True)
        events, items = write_files(ds, Path(tmp))
        s = _fresh_prefix(settings, "bf", refine=True)
        with Rejects() as rejects:
            report = run_backfill(s, [str(events)], [str(items)], rejects=rejects, progress=True)
        print(report.line(), flush=True)
        split = {k: round(v, 2) for k, v in report.seconds.items()}
        rows.append(
            {
                "run": "backfill (files → Redis), refinement on",
                "key": "backfill",
                "events": report.events_applied,
                "users": report.users,
                "wall_s": report.wall,
                "events_per_s": report.events_applied / report.wall,
                "users_per_s": report.users / report.wall,
                "split_s": split,
                "complete": report.events_applied == n and report.rejected == 0,
            }
        )
    p = plan(ds, max_users=stream_users or None)
    expected = expected_seq(ds, p.events)
    print(f"== stream: {len(p.events):,} events of {len(expected):,} users through one worker", flush=True)
    s = _prepared_run(settings, ds, p, "bfstream", refine=True)
    send_events(s, ds, p.events, progress=False)
    with WorkerProcess(s, log=Path(settings.datadir) / f"{s.prefix}.log"):
        got = watch_pipeline(s, expected, refine=True, timeout=3600)
    rows.append(
        {
            "run": "stream (Kafka → worker → Redis), refinement on",
            "key": "stream",
            "events": len(p.events),
            "users": len(expected),
            "wall_s": got["wall_s"],
            "events_per_s": got["events_per_s"],
            "users_per_s": len(expected) * got["events_per_s"] / max(len(p.events), 1),
            "complete": got["complete"],
        }
    )
    write_rows(out, "backfill", rows)
    by = {r["key"]: r for r in rows}
    ratio = by["backfill"]["events_per_s"] / by["stream"]["events_per_s"]
    print(f"\nbackfill vs stream: simulator catalogue, {settings.partitions} partitions, refinement on\n")
    print_table(
        ["run", "events", "users", "events/s", "users/s", "complete"],
        "lrrrrl",
        [
            [
                r["run"],
                f"{r['events']:,}",
                f"{r['users']:,}",
                f"{r['events_per_s']:,.0f}",
                f"{r['users_per_s']:,.0f}",
                str(r["complete"]),
            ]
            for r in rows
        ],
    )
    wall = max(by["backfill"]["wall_s"], 1e-9)
    split = by["backfill"]["split_s"]
    parts = ", ".join(f"{k} {split[k]:.1f} s" for k in ("spill", "encode", "coarse", "refine", "redis") if k in split)
    print(
        f"\nbackfill / stream: {ratio:.1f}x events/s\nbackfill busy time per stage ({parts}; refinement runs in its "
        f"own thread beside the others, so they add up to more than the wall {wall:.1f} s)"
    )
    return rows
