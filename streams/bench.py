"""``mirstream bench ingest``: measured ingest speed and freshness against real Kafka + Redis.

Each figure comes from one run of the real worker on a fresh prefix: events/s with refinement off and
on (events produced as fast as possible, clock stopped when Redis reflects every event), and freshness
at fixed offered rates (p50/p95/p99 of Kafka produce time → vectors written, from the worker's
Prometheus histogram, so bucket-resolution estimates).  Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

from models.data import load
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess


def histogram_quantiles(metrics_text: str, name: str, qs: tuple[float, ...]) -> dict[float, float]:
    """Quantiles from a Prometheus histogram's cumulative buckets (upper bound of the bucket reached)."""
    buckets = []
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    return {q: next((le for le, c in buckets if c >= q * total), float("nan")) if total else float("nan") for q in qs}


def _wait_items(settings: Settings, n: int, timeout: float = 120.0) -> None:
    from state.keys import Keys
    from state.store import connect_sync

    r, key = connect_sync(settings.redis_url), Keys(settings.prefix).items
    deadline = time.monotonic() + timeout
    while r.scard(key) < n and time.monotonic() < deadline:
        time.sleep(0.1)


def _run(settings: Settings, users: int, rate: float | None, refine: bool, tag: str, log_dir: Path) -> dict:
    run = f"bench{tag}{int(time.time() * 1000) % 10**8}"
    s = settings.with_(prefix=run, app_id=f"mirstream-{run}", refine=refine)
    ds = load("sim")
    p = plan(ds, max_users=users)
    expected = expected_seq(ds, p.events)
    ensure_topics(s)
    with WorkerProcess(s, log=log_dir / f"{run}.log"):
        send_items(s, ds, p.items, progress=False)
        _wait_items(s, len(p.items))  # time events only, not the catalogue
        t0 = time.perf_counter()
        offered = send_events(s, ds, p.events, rate=rate, progress=False)
        behind = wait_for_vectors(s, expected, timeout=600, progress=False, applied_only=not refine)
        wall = time.perf_counter() - t0
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{s.web_port}/metrics").read().decode()
    q = histogram_quantiles(metrics_text, "mirstream_freshness_seconds", (0.5, 0.95, 0.99))
    return {
        "events": len(p.events),
        "users": len(expected),
        "refine": refine,
        "offered_rate": rate,
        "achieved_offer": offered,
        "wall_s": wall,
        "events_per_s": len(p.events) / wall,
        "complete": not behind,
        "freshness_p50_s": q[0.5],
        "freshness_p95_s": q[0.95],
        "freshness_p99_s": q[0.99],
    }


def bench_ingest(
    settings: Settings, users: int = 100, rates: tuple[float, ...] = (200, 1000), out: str = "bench"
) -> dict:
    log_dir = Path(settings.datadir)
    rows = {
        "refine off, max rate": _run(settings, users, None, False, "off", log_dir),
        "refine on, max rate": _run(settings, users, None, True, "on", log_dir),
    }
    for r in rates:
        rows[f"refine on, {r:.0f} ev/s offered"] = _run(settings, users, r, True, f"r{r:.0f}", log_dir)
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "ingest.json").write_text(json.dumps(rows, indent=2))
    print("| run | events | events/s absorbed | freshness p50 / p95 / p99 (s) | complete |")
    print("|---|---:|---:|---|---|")
    for name, r in rows.items():
        fresh = (
            "—"
            if not r["refine"]
            else " / ".join(f"≤{r[k]:g}" for k in ("freshness_p50_s", "freshness_p95_s", "freshness_p99_s"))
        )
        print(f"| {name} | {r['events']} | {r['events_per_s']:.0f} | {fresh} | {r['complete']} |")
    ratio = rows["refine off, max rate"]["events_per_s"] / max(rows["refine on, max rate"]["events_per_s"], 1e-9)
    print(
        f"\nrefinement off / on throughput ratio: {ratio:.2f} (same events, same run, medians not taken: one pass each)"
    )
    return rows
