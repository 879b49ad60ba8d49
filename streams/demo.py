"""The README's main job: a small model, a worker, a replayed multi-scenario stream, fresh vectors.

Runs against whatever ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` point at (``deploy/demo.sh`` starts a
local stack first).  Each run uses a fresh topic/key prefix, so runs never mix.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from models.data import load
from models.train import TrainConfig, run_train
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.search import ItemSearch
from streams.security import interest_reader
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess


def page_urls(settings: Settings, users: list[str]) -> list[str]:
    """The worker's pages for these users, then the stream page (a token, when set, goes as ``?token=``)."""
    base = f"http://{settings.web_host}:{settings.web_port}"
    tail = "?token=$MIRSTREAM_WEB_TOKEN" if settings.web_token else ""
    return [f"{base}/ui/users/{u}{tail}" for u in users] + [f"{base}/ui{tail}"]


def run_demo(settings: Settings, users: int = 40, show: int = 3, train_steps: int = 150, hold: float = 0) -> int:
    ckpt = Path(settings.checkpoint)
    if not (ckpt / "model.json").exists():
        print(f"== training a small model on the multi-scenario simulator → {ckpt}")
        run_train(TrainConfig(dataset="sim", steps=train_steps), ckpt)
    run = f"demo{int(time.time())}"
    settings = settings.with_(prefix=run, app_id=f"mirstream-{run}")
    ds = load("sim")
    p = plan(ds, max_users=users)
    expected = expected_seq(ds, p.events)
    print(f"== topics {settings.events_topic('*')} ({settings.partitions} partitions), Redis keys {run}:*")
    ensure_topics(settings)
    log = Path(settings.datadir) / f"{run}-worker.log"
    with WorkerProcess(settings, log=log):
        print(f"== worker up (log: {log})")
        if settings.web_port:
            print("== its pages, live while the demo runs: " + "  ".join(page_urls(settings, list(expected)[:show])))
        print(f"== replaying {len(p.items)} items and {len(p.events)} events of {users} users")
        send_items(settings, ds, p.items)
        t0 = time.perf_counter()
        rate = send_events(settings, ds, p.events)
        behind = wait_for_vectors(settings, expected, timeout=180)
        wall = time.perf_counter() - t0
        if behind:
            print(f"!! {len(behind)} users still behind after the wait: {sorted(behind)[:10]}")
            return 1
        show_users(settings, expected, rate, wall, len(p.events), show)
        first = next(iter(expected))
        print(f"\nTry: mirstream lookup {first} --prefix {run}    mirstream search {first} --prefix {run}")
        if settings.web_port:
            print("    or open (in a browser, on this machine):")
            for url in page_urls(settings, list(expected)[:show]):
                print(f"    {url}")
        if hold > 0:
            print(f"== the worker stays up {hold:.0f}s for the pages (Ctrl-C stops it)")
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(hold)
    return 0


def show_users(settings: Settings, expected: dict[str, int], rate: float, wall: float, events: int, show: int) -> None:
    reader = interest_reader(settings)
    fresh = [reader.interests(u) for u in expected]
    lag = np.array([f.updated_at - f.produced_at for f in fresh if f])
    print(
        f"\n== {events} events produced at {rate:.0f}/s; all {len(expected)} users fresh {wall:.1f}s after "
        f"the first event; last-update freshness p50 {np.median(lag):.2f}s, max {lag.max():.2f}s"
    )
    search = ItemSearch(settings)
    for user in list(expected)[:show]:
        found = reader.interests(user)
        assert found is not None
        lag_s = found.updated_at - found.produced_at
        print(f"\n-- user {user}: {found.seq} events, model {found.version}, vectors written {lag_s:.2f}s after its")
        print("   last event reached Kafka; top items per scenario (faiss over the item retrieval vectors):")
        for scenario, vecs in found.vectors.items():
            print(f"   {scenario}: {vecs.shape[0]} vectors x {vecs.shape[1]}-d")
            for hit in search.for_user(user, scenario=scenario, k=3):
                print(f"      interest {hit.interest}  {hit.score:.3f}  {hit.item_id:>5}  {hit.title}")
