"""Faults against real processes: SIGKILLs at random points, a Redis restart, a Kafka restart.

After each, the final Redis state must equal the models run offline over every event: nothing lost,
nothing applied twice.  Restarts act on the services this session started (deploy/stack.py); with
services given by the environment or testcontainers those two tests are skipped, with the reason.
"""

from __future__ import annotations

import random
import threading
import time

import pytest
import redis
from pipeline_checks import assert_matches_offline

from models.data import load
from state.keys import Keys
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
USERS = 6  # ~650 events over three scenarios


@pytest.fixture(scope="module")
def ds():
    return load("sim")


def _applied(settings) -> int:
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    return sum(int(r.hget(keys.user_state(str(u)), "seq") or 0) for u in range(USERS))


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
    # Two crashes at seeded random points of the stream: once that many events are applied.
    points = sorted([int(n * rng.uniform(0.05, 0.45)), int(n * rng.uniform(0.5, 0.9))])
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    sender = threading.Thread(target=send_events, args=(settings, ds, p.events), kwargs={"rate": 60, "progress": False})
    worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
    sender.start()
    killed_at = []
    try:
        for point in points:
            _wait_applied(settings, point, poll=0.02)
            worker.kill()
            killed_at.append(_applied(settings))
            worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
        sender.join()
        expected = expected_seq(ds, p.events)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
    finally:
        worker.stop()
    assert all(k < n for k in killed_at), f"crashes must land mid-stream: applied {killed_at} of {n}"
    assert_matches_offline(settings, ds, expected)


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


def test_redis_restart_mid_stream(pipeline_settings, ds, tmp_path, services):
    log = _replay_around(pipeline_settings, ds, tmp_path, services, "redis")
    assert "retrying" in log.lower(), "the worker should have logged its back-off while Redis was down"


def test_kafka_restart_mid_stream(pipeline_settings, ds, tmp_path, services):
    _replay_around(pipeline_settings, ds, tmp_path, services, "kafka")
