"""Failure isolation against a real worker, Kafka and Redis: a poison user in a batch with innocent users,
a poison dirty user, and an error the worker cannot pin on a user (it must stop without committing)."""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.error
import urllib.request

import numpy as np
import orjson
import pytest
import redis
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient
from pipeline_checks import lagging, read_deadletters

from models.data import load
from models.user_model import Checkpoint
from state.keys import Keys
from state.store import InterestReader, StreamStore
from streams.refinement import RETRY_LIMIT, Refresher, RowRefiner
from streams.replay import send_items, wait_for_vectors
from streams.security import redis_async
from streams.switch import Codebooks
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ds():
    return load("sim")


def _event(user: str, n: int, item: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"{user}-{n}",
            "user_id": user,
            "item_id": item,
            "scenario": "feed",
            "action": "click",
            "ts": 1.7e9 + n,
        }
    )


def _send(settings, events: list[tuple[str, int]], item: str) -> None:
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers)
    for user, n in events:
        producer.send(settings.events_topic("feed"), key=user.encode(), value=_event(user, n, item), partition=0)
    producer.flush()
    producer.close()


def _page(settings, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}{path}") as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _first_events(settings, ds, users: list[str]) -> str:
    """The item, then one event for each user, all applied and refined; returns the item id."""
    item = str(ds.item_ids[1])
    send_items(settings, ds, np.array([1]), progress=False)
    _send(settings, [(u, 1) for u in users], item)
    assert wait_for_vectors(settings, dict.fromkeys(users, 1), timeout=60, progress=False) == {}
    return item


def test_poison_user_in_a_batch_is_dead_lettered_and_the_others_applied_once(pipeline_settings, ds, tmp_path):
    settings = pipeline_settings
    ensure_topics(settings)
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        item = _first_events(settings, ds, ["a", "bad", "c"])
        r.set(keys.user_history("bad"), b"x" * 17)  # its stored history no longer decodes
        _send(settings, [("a", 2), ("bad", 2), ("c", 2)], item)  # one batch, one poison user in it
        letters = read_deadletters(settings, 1)
        assert wait_for_vectors(settings, {"a": 2, "c": 2}, timeout=60, progress=False) == {}
        assert lagging(settings) == {}
        metrics = _page(settings, "/metrics")[1].decode()
        assert w.proc.poll() is None, "the worker must keep running"
    assert len(letters) == 1 and letters[0]["key"] == "bad" and "history of 17 bytes" in letters[0]["reason"]
    assert 'mirstream_agent_errors_total{agent="ingest",reason="poison_user"} 1.0' in metrics
    reader = InterestReader(settings.redis_url, settings.prefix)
    assert reader.seqs(["a", "bad", "c"], applied=True) == [2, 1, 2]  # innocent ones once, the poison one not


def test_poison_dirty_user_is_quarantined_and_retried_after_a_fix(pipeline_settings, ds, tmp_path):
    settings = pipeline_settings
    ensure_topics(settings)
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        item = _first_events(settings, ds, ["a", "bad"])
        # A dirty user whose history no longer decodes (written by hand, as a broken tool would).
        r.set(keys.user_history("bad"), b"x" * 17)
        r.hset(keys.user_state("bad"), "seq", 2)
        r.zadd(keys.dirty(0), {"bad": 0})
        r.hset(keys.dirty_seq(0), "bad", 2)
        _send(settings, [("a", 2)], item)
        assert wait_for_vectors(settings, {"a": 2}, timeout=60, progress=False) == {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not r.hexists(keys.quarantine, "bad"):
            time.sleep(0.2)
        listed = orjson.loads(_page(settings, "/quarantine")[1])
        status, health = _page(settings, "/health")
        time.sleep(5.5)  # the gauge is refreshed by the next tick
        metrics = _page(settings, "/metrics")[1].decode()
        assert w.proc.poll() is None, "the worker must keep running"
        assert "history of 17 bytes" in listed["bad"]["reason"] and listed["bad"]["seq"] == 2
        assert status == 200 and orjson.loads(health)["quarantined_users"] == 1
        assert "mirstream_quarantined_users 1.0" in metrics
        # The fix: the broken history is removed; a retry refines the user and clears the quarantine.
        r.delete(keys.user_history("bad"))
        _send(settings, [("bad", 3)], item)
        assert wait_for_vectors(settings, {"bad": 3}, timeout=60, progress=False) == {}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and r.hexists(keys.quarantine, "bad"):
            time.sleep(0.2)
        assert not r.hexists(keys.quarantine, "bad")


def test_unattributable_error_stops_the_worker_without_committing(pipeline_settings, ds, tmp_path):
    """A user key of the wrong type (another program wrote it) fails the batch's read for everyone: the
    worker exits non-zero at once, the batch's offsets stay uncommitted, and once the key is fixed a new
    worker applies every event exactly once."""
    settings = pipeline_settings
    ensure_topics(settings)
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
    try:
        item = _first_events(settings, ds, ["a"])
        assert lagging(settings, timeout=30) == {}
        r.set(keys.user_state("clobbered"), "not a hash")
        _send(settings, [("a", 2), ("clobbered", 1)], item)
        assert worker.proc.wait(timeout=60) == 70
        log = worker.log_text()
    finally:
        worker.stop()
    assert "stopping this worker without committing" in log
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    tp = TopicPartition(settings.events_topic("feed"), 0)
    committed = admin.list_group_offsets({settings.app_id: [tp]})[settings.app_id][tp].offset
    admin.close()
    assert committed == 1, f"committed {committed}: past the failed batch (events at offsets 1, 2)"
    r.delete(keys.user_state("clobbered"))
    with WorkerProcess(settings, log=tmp_path / "worker2.log"):
        assert wait_for_vectors(settings, {"a": 2, "clobbered": 1}, timeout=60, progress=False) == {}
    reader = InterestReader(settings.redis_url, settings.prefix)
    assert reader.seqs(["a", "clobbered"], applied=True) == [2, 1]


class _FailsOnOneUser(RowRefiner):
    """The refiner's code with a fault that follows one user and is not about its data (a RuntimeError)."""

    def vectors(self, rows, books):
        if any(r.user == "bad" for r in rows):
            raise RuntimeError("a fault that follows user bad")
        return super().vectors(rows, books)


def test_a_user_failing_alone_is_retried_with_a_log_line_then_quarantined(pipeline_settings, ds, tmp_path, caplog):
    """A user whose refinement fails alone while the rest of its batch refines, on an error that is not
    about its stored data, stays dirty and is retried (a warning each time); after ``RETRY_LIMIT`` ticks in
    a row it is quarantined with the error, so it can neither stall silently nor be retried forever."""
    settings = pipeline_settings.with_(refine=False)
    ensure_topics(settings)
    item = str(ds.item_ids[1])
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        send_items(settings, ds, np.array([1]), progress=False)
        _send(settings, [("a", 1), ("b", 1), ("bad", 1)], item)
        assert wait_for_vectors(settings, {"a": 1, "b": 1, "bad": 1}, 60, False, applied_only=True) == {}

    async def run() -> tuple[list[bool], dict[str, dict], list[str], tuple[dict, dict]]:
        store = StreamStore(redis_async(settings), settings.prefix)
        ckpt = Checkpoint.load(settings.checkpoint)
        refresher = Refresher(
            settings.with_(refine_debounce_ms=0),
            ckpt,
            store,
            Codebooks(store, ckpt.codebook),
            _no_emit,
            rows=_FailsOnOneUser(ckpt, settings.history_cap),
        )
        listed = []
        for _ in range(RETRY_LIMIT):
            # (a worker without refinement marks nobody dirty); a and b keep it company each tick
            await store.mark_dirty(0, {"a": 1, "b": 1, "bad": 1})
            assert await refresher.tick([0]) == 3
            listed.append("bad" in await store.quarantined())
        quarantined, dirty = await store.quarantined(), [u for u, _ in await store.dirty_users(0, 10)]
        # tried again (a new event): one failure counted; partition 0 moves away, and its count goes with it
        await store.mark_dirty(0, {"a": 1, "bad": 1})
        await refresher.tick([0])
        counted = dict(refresher.retries)
        await refresher.tick([1])
        return listed, quarantined, dirty, (counted, refresher.retries)

    with caplog.at_level(logging.WARNING, logger="streams.refinement"):
        listed, quarantined, dirty, (counted, moved) = asyncio.run(run())
    assert counted == {"bad": (0, 1)} and moved == {}
    assert listed == [False] * (RETRY_LIMIT - 1) + [True]
    assert "a fault that follows user bad" in quarantined["bad"]["reason"] and quarantined["bad"]["seq"] == 1
    assert dirty == []  # quarantined users leave their dirty set; a new event marks them again
    retries = [r.getMessage() for r in caplog.records if "refining user bad failed" in r.getMessage()]
    # RETRY_LIMIT - 1 before the quarantine, one for the try after it
    assert len(retries) == RETRY_LIMIT and "RuntimeError: a fault that follows user bad" in retries[0]
    reader = InterestReader(settings.redis_url, settings.prefix)
    assert reader.seqs(["a", "b", "bad"]) == [1, 1, None]


class _Recording(RowRefiner):
    """The refiner's code, slowed down so two ticks overlap, recording the users of each call."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.calls: list[set[str]] = []

    def vectors(self, rows, books):
        self.calls.append({r.user for r in rows})
        time.sleep(0.2)
        return super().vectors(rows, books)


def test_two_ticks_in_flight_share_no_user_and_an_empty_one_hides_no_failure(pipeline_settings, ds, tmp_path):
    """The worker runs two refinement ticks side by side (``Refresher._tick``).  They never refine the same
    user at once, and a tick that finds nothing because the other holds every dirty user does not clear
    the failure clock that ``/health`` reads while the other keeps failing."""
    settings = pipeline_settings.with_(refine=False)
    users = [f"u{i}" for i in range(6)]
    ensure_topics(settings)
    item = str(ds.item_ids[1])
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        send_items(settings, ds, np.array([1]), progress=False)
        _send(settings, [(u, 1) for u in users], item)
        assert wait_for_vectors(settings, dict.fromkeys(users, 1), 60, False, applied_only=True) == {}

    async def run():
        store = StreamStore(redis_async(settings), settings.prefix)
        ckpt = Checkpoint.load(settings.checkpoint)
        rows = _Recording(ckpt, settings.history_cap)
        refresher = Refresher(
            settings.with_(refine_debounce_ms=0, refine_batch=3),
            ckpt,
            store,
            Codebooks(store, ckpt.codebook),
            _no_emit,
            rows=rows,
        )
        await store.mark_dirty(0, dict.fromkeys(users, 1))
        counts = await asyncio.gather(refresher.tick([0]), refresher.tick([0]))
        overlap = rows.calls[0] & rows.calls[1]
        left = [u for u, _ in await store.dirty_users(0, 10)]

        async def failing_write(*args, **kwargs):
            await asyncio.sleep(0.3)
            raise RuntimeError("vectors could not be written")

        refresher.settings = refresher.settings.with_(refine_batch=len(users))
        store.write_vectors_many = failing_write
        await store.mark_dirty(0, dict.fromkeys(users, 2))
        assert await refresher.tick([0]) == 0  # failed: the users stay dirty
        first = refresher.failing_since
        again = await asyncio.gather(refresher.tick([0]), refresher.tick([0]))
        return counts, overlap, left, first, again, refresher.failing_since

    counts, overlap, left, first, again, failing_since = asyncio.run(run())
    assert counts == [3, 3] and overlap == set() and left == []
    assert first is not None and again == [0, 0]
    assert failing_since == first, "the empty tick beside the failing one cleared the failure clock"


async def _no_emit(user: str, body: dict) -> None:
    return None
