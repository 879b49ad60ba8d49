"""``mirstream bench planner``: the apply step's planner alone (no services), and what it reads of each
stored history against the reference way of reading it, in the same run.

Users with histories of ``H`` records (built by planning and applying batches against
``state.memory.MemoryUsers``, the in-memory reference of the Lua scripts) each get one new event; the
timed call is ``streams.planner.plan`` over every user's row.  The baseline is what an append needs of a
stored history read the obvious way (``decode`` then ``last_minutes``, what the planner did before
``tail_many``), timed on the same histories.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch
from tqdm import tqdm

from models.bench import print_table, write_rows
from models.user_model import Checkpoint
from state.history import decode, last_minutes, tail_many
from state.memory import MemoryUsers
from streams.events import Event, Message
from streams.planner import Accepted, PlanContext, UserPlan, plan

TOPIC = "bench.events.feed"


def _event(user: str, item: int, offset: int) -> Accepted:
    ts = 1.7e9 + 60.0 * offset
    msg = Message(TOPIC, 0, offset, user.encode(), b"", ts)
    return Accepted(
        Event(f"e{offset}", user, str(item), offset % 3, 0, ts, "", None), msg, f"{TOPIC}:0:{offset}", False
    )


def _step(mem: MemoryUsers, events: dict[str, list[Accepted]], codes: dict, ctx: PlanContext) -> float:
    """Reads, plans (timed) and applies one batch; returns the planning seconds."""
    rows = {u: mem.read(u, sorted({a.mark for a in b}), [a.origin for a in b]) for u, b in events.items()}
    t = time.perf_counter()
    plans: dict[str, UserPlan] = plan(rows, events, codes, ctx)
    took = time.perf_counter() - t
    for user, p in plans.items():
        if p.update is None or mem.apply(user, p.update) is None:
            raise RuntimeError(f"user {user}: the benchmark's batch did not apply")
    return took


def bench_planner(
    ckpt: Checkpoint, users: int = 250, lengths: tuple[int, ...] = (100, 1000), repeats: int = 15, out: str = "bench"
) -> list[dict]:
    """Planning time per user at each history length (multiples of 100 records), and the history read."""
    torch.set_num_threads(1)  # as the worker's agents run their model calls
    ctx = PlanContext(ckpt, {ckpt.codebook_id: ckpt.codebook}, 1000)
    items = 50
    recs = ckpt.codebook.encode(ckpt.item_vectors[:items]).records()
    codes = {str(i): recs[i].tobytes() for i in range(items)}
    names = [f"u{i}" for i in range(users)]
    code_bytes = ckpt.codebook.cfg.bytes_per_item
    rows = []
    for length in lengths:
        mem, offset = MemoryUsers(), 0
        for _ in tqdm(range(0, length, 100), desc=f"histories of {length} records", unit="batch"):
            batch = {}
            for u in names:
                batch[u] = [_event(u, (offset + j) % items, offset + j) for j in range(100)]
                offset += 100
            _step(mem, batch, codes, ctx)
        times = []
        for _ in range(repeats):  # one event a user; the history crosses ``trim_at`` at most once in 15
            batch = {u: [_event(u, (offset + i) % items, offset + i)] for i, u in enumerate(names)}
            offset += users
            times.append(_step(mem, batch, codes, ctx))
        blobs = [mem.history[u] for u in names]
        t = time.perf_counter()
        tails = tail_many(blobs, code_bytes)
        fast = time.perf_counter() - t
        t = time.perf_counter()
        for b in blobs:
            last_minutes(decode(b, code_bytes))
        slow = time.perf_counter() - t
        plan_s = statistics.median(times)
        rows.append(
            {
                "records": int(np.median([count for count, _ in tails])),
                "users": users,
                "plan_ms": plan_s * 1e3,
                "plan_us_per_user": plan_s / users * 1e6,
                "tail_many_us_per_history": fast / users * 1e6,
                "decode_us_per_history": slow / users * 1e6,
            }
        )
    write_rows(out, "planner", rows)
    print(f"planner: {users} users, one new event each, median of {repeats} batches; one torch thread\n")
    print_table(
        ["history records", "plan (ms)", "µs a user", "tail_many µs a history", "decode + last_minutes µs", "ratio"],
        "rrrrrr",
        [
            [
                str(r["records"]),
                f"{r['plan_ms']:.1f}",
                f"{r['plan_us_per_user']:.0f}",
                f"{r['tail_many_us_per_history']:.1f}",
                f"{r['decode_us_per_history']:.1f}",
                f"{r['decode_us_per_history'] / r['tail_many_us_per_history']:.1f}x",
            ]
            for r in rows
        ],
    )
    return rows
