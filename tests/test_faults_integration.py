"""Faults against real processes: SIGKILLs at random points, a Redis restart, a Kafka restart.

After each, the final Redis state must equal the models run offline over every event: nothing lost,
nothing applied twice.  Restarts act on the services this session started (deploy/stack.py); with
services given by the environment or testcontainers those two tests are skipped, with the reason.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest
import redis
from pipeline_checks import assert_matches_offline

from deploy.stack import _pid_alive
from models.data import load, simulate
from models.user_model import Checkpoint
from state.history import decode
from state.keys import Keys
from state.store import InterestReader, user_memory
from streams.planner import trim_slack
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_items, wait_for_vectors
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
USERS = 6  # ~650 events over three scenarios


@pytest.fixture(scope="module")
def ds():
    return load("sim")


def _applied(settings) -> int:
    reader = InterestReader(settings.redis_url, settings.prefix)
    return sum(seq or 0 for seq in reader.seqs([str(u) for u in range(USERS)], applied=True))


def _wait_applied(settings, at_least: int, timeout: float = 60, poll: float = 0.1) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _applied(settings) < at_least:
        time.sleep(poll)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_points_while_replaying(pipeline_settings, ds, tmp_path, seed):
    settings = pipeline_settings.with_(park_timeout_s=120.0)
    rng = random.Random(seed)
    p = plan(ds, max_users=USERS)
    n = len(p.events)
    # Two crashes at seeded random points of the stream, each once that many events are applied.  The
    # stream goes out in three segments and the next one only after a crash, so a restarted worker's
    # fast catch-up can never swallow the rest of the stream before the next crash lands.
    points = sorted([int(n * rng.uniform(0.05, 0.45)), int(n * rng.uniform(0.5, 0.9))])
    segments = np.split(p.events, [int(n * 0.5), int(n * 0.95)])
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
    killed_at = []
    try:
        for point, segment in zip(points, segments, strict=False):
            sender = threading.Thread(
                target=send_events, args=(settings, ds, segment), kwargs={"rate": 60, "progress": False}
            )
            sender.start()
            _wait_applied(settings, point, poll=0.02)
            worker.kill()
            killed_at.append(_applied(settings))
            sender.join()
            worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
        send_events(settings, ds, segments[-1], rate=60, progress=False)
        expected = expected_seq(ds, p.events)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
    finally:
        worker.stop()
    assert all(k < n for k in killed_at), f"crashes must land mid-stream: applied {killed_at} of {n}"
    assert_matches_offline(settings, ds, expected)


def test_refiner_process_killed_mid_stream(pipeline_settings, ds, tmp_path):
    """The refiner process dies (SIGKILL, as the OOM killer does it) while events stream: the worker counts
    and logs it, starts another, and every user ends with vectors of its whole history, equal to the
    offline model's: the batch that was refining was refined again (in halves, ``isolate_deaths``)."""
    settings = pipeline_settings
    p = plan(ds, max_users=USERS)
    half = len(p.events) // 2
    expected = expected_seq(ds, p.events)
    ensure_topics(settings)
    with WorkerProcess(settings, log=tmp_path / "worker.log") as worker:
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events[:half], progress=False)
        assert wait_for_vectors(settings, expected_seq(ds, p.events[:half]), timeout=120, progress=False) == {}
        first = worker.refiner_pid()
        assert first is not None, "the worker refines in a process of its own"
        sender = threading.Thread(
            target=send_events, args=(settings, ds, p.events[half:]), kwargs={"rate": 100, "progress": False}
        )
        sender.start()
        time.sleep(1.0)
        os.kill(first, signal.SIGKILL)
        sender.join()
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
        second = worker.refiner_pid()
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics").read().decode()
        log = worker.log_text()
    assert second is not None and second != first, "a new refiner process replaced the killed one"
    assert 'mirstream_agent_errors_total{agent="refine",reason="process_died"}' in metrics
    assert "the refiner process died" in log
    assert_matches_offline(settings, ds, expected)


def test_refiner_process_exits_with_its_worker(pipeline_settings, ds, tmp_path):
    """A worker killed alone (not its process group) leaves no refiner process behind holding a model."""
    settings = pipeline_settings
    p = plan(ds, max_users=2)
    ensure_topics(settings)
    with WorkerProcess(settings, log=tmp_path / "worker.log") as worker:
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events, progress=False)
        assert wait_for_vectors(settings, expected_seq(ds, p.events), timeout=120, progress=False) == {}
        child = worker.refiner_pid()
        assert child is not None and worker.proc is not None
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _pid_alive(child):
            time.sleep(0.2)
        assert not _pid_alive(child), f"refiner process {child} outlived its worker"


def _replay_around(settings, ds, tmp_path, services, service: str) -> str:
    """Half the events, ``service`` down for a while (a quarter sent meanwhile if Kafka is up), back, the rest."""
    p = plan(ds, max_users=USERS)
    ensure_topics(settings)
    expected = expected_seq(ds, p.events)
    half, three_q = len(p.events) // 2, 3 * len(p.events) // 4
    with WorkerProcess(settings, log=tmp_path / "worker.log") as worker:
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events[:half], progress=False)
        _wait_applied(settings, half // 3)
        services.stop(service)
        try:
            if service == "redis":  # the stream keeps coming while Redis is away
                send_events(settings, ds, p.events[half:three_q], progress=False)
            time.sleep(3)
            assert worker.proc is not None and worker.proc.poll() is None, "the worker died with its " + service
        finally:
            services.start(service)
        if service == "kafka":
            send_events(settings, ds, p.events[half:three_q], progress=False)
        send_events(settings, ds, p.events[three_q:], progress=False)
        assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}
        log = worker.log_text()
    assert_matches_offline(settings, ds, expected)
    return log


# An outage delays the item agent too: events parked for a late item must outlive it (the default is 60 s).
OUTAGE_PARK_S = 120.0


def test_redis_restart_mid_stream(pipeline_settings, ds, tmp_path, services):
    settings = pipeline_settings.with_(park_timeout_s=OUTAGE_PARK_S)
    log = _replay_around(settings, ds, tmp_path, services, "redis")
    assert "retrying" in log.lower(), "the worker should have logged its back-off while Redis was down"


def test_kafka_restart_mid_stream(pipeline_settings, ds, tmp_path, services):
    _replay_around(pipeline_settings.with_(park_timeout_s=OUTAGE_PARK_S), ds, tmp_path, services, "kafka")


def test_soak_100k_events_memory_stays_bounded(pipeline_settings, tmp_path):
    """100,000 events of 200 users through one worker with history capped at 200: every event applied
    once, each user's history at the cap, worker RSS flat from the first quarter of the stream on."""
    settings = pipeline_settings.with_(history_cap=200, park_timeout_s=120.0)
    soak = simulate(users=200, events_per_user=(500, 501))
    p = plan(soak)
    ensure_topics(settings)
    expected = expected_seq(soak, p.events)
    rss = []
    with WorkerProcess(settings, log=tmp_path / "worker.log") as worker:
        send_items(settings, soak, p.items, progress=False)
        wait_for_items(settings, len(p.items), timeout=60)  # the catalogue first: this is about memory, not parking
        sent = 0
        for chunk in np.array_split(p.events, 4):
            send_events(settings, soak, chunk, progress=False)
            sent += len(chunk)
            assert (
                wait_for_vectors(
                    settings, expected_seq(soak, p.events[:sent]), timeout=300, progress=False, applied_only=True
                )
                == {}
            )
            rss.append(worker.rss_bytes())
        assert wait_for_vectors(settings, expected, timeout=300, progress=False) == {}
    assert len(p.events) == 100_000
    r = redis.Redis.from_url(settings.redis_url)
    ckpt = Checkpoint.load(settings.checkpoint)
    for user in list(expected)[:20]:  # the cap, or up to the slack past it until the next trim
        held = decode(r.get(Keys(settings.prefix).user_history(user)), ckpt.codebook.cfg.bytes_per_item)
        assert 200 <= len(held) <= 200 + trim_slack(200), (user, len(held))
        assert sum(user_memory(r, settings.prefix, user, ckpt.version).values()) < 64 * 1024
    growth = (rss[-1] - rss[0]) / rss[0]
    assert growth < 0.10, f"worker RSS grew {growth:.1%} from the first to the last quarter: {rss}"
