"""``mirstream bench soak``: many distinct users through one worker, to show what grows with them.

Users arrive in slices (each slice = new users, every user's events in time order); after each slice the
run waits until every user so far has fresh vectors and records Redis ``used_memory`` per user, the
worker's RSS, and, sampled every half second while the slice drains, how long the longest-waiting dirty
user had waited (the refinement queue is served oldest-first, ``state.scripts.MARK_DIRTY``).  Flat
bytes/user and RSS after warm-up, and a bounded wait, are what the figures should show.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from models.bench import print_table, write_rows
from models.data import simulate
from streams.bench import _fresh_prefix, ensure_checkpoint
from streams.replay import expected_seq, send_events, send_items, wait_for_items, wait_for_vectors
from streams.security import interest_reader, redis_sync
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess


def bench_soak(
    settings: Settings, users: int = 100_000, events_per_user: int = 3, slices: int = 5, out: str = "bench"
) -> list[dict]:
    ensure_checkpoint(settings)
    ds = simulate(users=users, events_per_user=(events_per_user, events_per_user + 1))
    order = np.lexsort((np.arange(len(ds.ts)), ds.ts, ds.user))  # user-major: each slice brings new users
    s = _fresh_prefix(settings, "soak")
    ensure_topics(s)
    r, reader = redis_sync(s), interest_reader(s)
    rows: list[dict] = []
    with WorkerProcess(s, log=Path(settings.datadir) / f"{s.prefix}.log") as worker:
        send_items(s, ds, np.unique(ds.item), progress=False)
        wait_for_items(s, len(np.unique(ds.item)))
        base = int(r.info("memory")["used_memory"])
        sent = 0
        for chunk in np.array_split(order, slices):
            t0 = time.perf_counter()
            send_events(s, ds, chunk, progress=False)
            sent += len(chunk)
            expected = expected_seq(ds, order[:sent])
            done = threading.Event()
            behind: dict = {}

            def wait(expected=expected, done=done, behind=behind) -> None:
                behind.update(wait_for_vectors(s, expected, timeout=1800, progress=False))
                done.set()

            threading.Thread(target=wait, daemon=True).start()
            worst = 0.0
            while not done.wait(0.5):
                worst = max(worst, reader.oldest_dirty_wait_s(s.partitions))
            wall = time.perf_counter() - t0
            used = int(r.info("memory")["used_memory"]) - base
            rows.append(
                {
                    "users": len(expected),
                    "events": sent,
                    "complete": not behind,
                    "slice_s": round(wall, 1),
                    "redis_bytes_per_user": round(used / len(expected)),
                    "worker_rss_mb": round(worker.rss_bytes() / 2**20, 1),
                    "max_dirty_wait_s": round(worst, 2),
                }
            )
            print(f"slice {len(rows)}/{slices}: {rows[-1]}", flush=True)
    header = list(rows[0])
    print(f"\nsoak: {users:,} users × {events_per_user} events, refinement on, one worker\n")
    print_table(header, "r" * len(header), [[str(row[h]) for h in header] for row in rows])
    write_rows(out, "soak", rows)
    return rows
