"""The streaming pipeline against real Kafka + Redis: end to end, parity with the offline models,
redelivery, crash/restart and bad input."""

from __future__ import annotations

import re
import time
import urllib.request

import numpy as np
import orjson
import pytest
import redis
from conftest import free_port
from kafka import KafkaProducer, TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec
from pipeline_checks import (
    COARSE_TOL,
    STORED_RTOL,
    VECTOR_TOL,
    assert_matches_offline,
    lagging,
    offline,
    read_deadletters,
    replay,
    snapshot,
)

from models.data import load
from models.user_model import Checkpoint
from state.keys import Keys
from state.store import InterestReader
from state.users import decode_coarse
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.topics import all_topics, ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
USERS = 12  # ~1,300 events over three scenarios


@pytest.fixture(scope="module")
def ds():
    return load("sim")


def test_replay_parity_lookup_and_group_reset(pipeline_settings, ds, tmp_path):
    # Micro-batches of 3 of the 12 users: the refiner always has a backlog, and users get events while
    # their batch refines (``Refresher._tick``: vectors carry the seq they reflect, a user stays dirty).
    settings = pipeline_settings.with_(refine_batch=3)
    ckpt = Checkpoint.load(settings.checkpoint)
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        expected = replay(settings, ds, USERS)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
        page = orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/users/0/interests").read())
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics").read().decode()
    assert page["seq"] == expected["0"] and set(page["vectors"]) == {"feed", "search", "ads"}
    assert 'mirstream_events_total{scenario="feed"}' in metrics_text

    reader = InterestReader(settings.redis_url, settings.prefix)
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    k, d = ckpt.model.cfg.interests, ckpt.model.cfg.retrieval_dim
    for user, n in expected.items():
        vecs, meta = reader.get_user_interests(user, "ads")
        assert vecs.shape == (k, d) and meta.seq == n
        np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=STORED_RTOL)
        assert reader.get_user_interests(user)[0].shape == (3 * k, d)
        # Parity with the models run offline over the same history.
        state = decode_coarse(r.get(keys.user_coarse(user)), ckpt.model.coarse.state_size)
        coarse_off, vectors_off = offline(ckpt, ds, user, settings.history_cap)
        np.testing.assert_allclose(ckpt.model.coarse.read(state), coarse_off, atol=COARSE_TOL)
        for i, s in enumerate(ds.scenarios):
            np.testing.assert_allclose(meta.vectors[s], vectors_off[i], atol=VECTOR_TOL, rtol=STORED_RTOL)

    # Redelivery: reset the consumer group to the earliest offsets and process everything again.
    before = snapshot(settings.redis_url, settings.prefix, list(expected))
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    tps = [TopicPartition(t, p) for t in all_topics(settings) for p in range(settings.partitions)]
    admin.reset_group_offsets(settings.app_id, {tp: OffsetSpec.EARLIEST for tp in tps})
    admin.close()
    with WorkerProcess(settings, log=tmp_path / "worker2.log") as w:
        assert lagging(settings) == {}  # every event re-read and acked again
        log = w.log_text()
    assert snapshot(settings.redis_url, settings.prefix, list(expected)) == before
    assert "Traceback" not in log


def test_sigkill_mid_stream_then_restart(pipeline_settings, ds, tmp_path):
    # Parked events must outlive the downtime: the parking clock keeps running while no worker is up.
    settings = pipeline_settings.with_(park_timeout_s=120.0)
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
    p = plan(ds, max_users=USERS)
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    half = len(p.events) // 2
    send_events(settings, ds, p.events[:half], progress=False)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not r.exists(keys.user_state("0")):
        time.sleep(0.1)
    worker.kill()  # mid-stream: no clean shutdown, offsets of the last batches not committed
    send_events(settings, ds, p.events[half:], progress=False)
    expected = expected_seq(ds, p.events)
    with WorkerProcess(settings, log=tmp_path / "worker2.log"):
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
    assert_matches_offline(settings, ds, expected)


BAD = [
    (b"{not json", "malformed JSON"),
    (b"[1, 2]", "JSON object"),
    (orjson.dumps({"user_id": "u1", "item_id": "n1"}), "missing fields"),
    (
        orjson.dumps(
            {"event_id": "e", "user_id": "u1", "item_id": "n1", "scenario": "radio", "action": "click", "ts": 1e9}
        ),
        "unknown scenario",
    ),
    (
        orjson.dumps(
            {"event_id": "e", "user_id": "u1", "item_id": "n1", "scenario": "feed", "action": "click", "ts": "x"}
        ),
        "'ts'",
    ),
    (
        orjson.dumps(
            {"event_id": "e", "user_id": "u1", "item_id": "n1", "scenario": "feed", "action": "purr", "ts": 1e9}
        ),
        "unknown action",
    ),
    (
        orjson.dumps(
            {
                "event_id": "e",
                "user_id": "u1",
                "item_id": "n1",
                "scenario": "feed",
                "action": "click",
                "ts": 1e9,
                "pad": "x" * 70000,
            }
        ),
        "over the",
    ),
    (
        orjson.dumps(
            {"event_id": "e", "user_id": "u1", "item_id": "n1", "scenario": "feed", "action": "click", "ts": 1e300}
        ),
        "ahead of the worker's clock",
    ),
    (
        orjson.dumps(
            {
                "event_id": "e",
                "user_id": "u1",
                "item_id": "n1",
                "scenario": "feed",
                "action": "click",
                "ts": 1.7e9,
                "_origin": "mir.events.feed:0:1",
            }
        ),
        "only by the parking path",
    ),
]
BAD_ITEMS = [
    (orjson.dumps({"item_id": "bad-dim", "vector": [0.1, 0.2]}), "dimensions"),
    # JSON has no NaN: Python's json.dumps writes a bare NaN, which no JSON parser accepts ...
    (b'{"item_id": "bad-nan", "vector": [' + b",".join([b"NaN"] * 64) + b"]}", "malformed JSON"),
    # ... and numbers past float32 become infinite in the model's dtype.
    (orjson.dumps({"item_id": "bad-inf", "vector": [1e300] * 64}), "beyond"),
    (orjson.dumps({"item_id": "no-content"}), "needs 'text' or 'vector'"),
]


def test_bad_input_goes_to_deadletter_and_good_events_still_apply(pipeline_settings, ds, tmp_path):
    settings = pipeline_settings.with_(park_timeout_s=3.0, metrics_port=free_port())
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.bootstrap_servers, max_request_size=200_000)
    good = {"event_id": "g1", "user_id": "u1", "item_id": "n1", "scenario": "feed", "action": "click", "ts": 1.7e9}
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        send_items(settings, ds, np.array([1]), progress=False)
        for raw, _ in BAD:
            producer.send(settings.events_topic("feed"), key=b"u1", value=raw)
        producer.send(settings.events_topic("feed"), key=b"u1", value=orjson.dumps(good))
        producer.send(settings.events_topic("feed"), key=None, value=orjson.dumps(dict(good, event_id="g3")))
        for raw, _ in BAD_ITEMS:
            producer.send(settings.items_topic, key=b"x", value=raw)
        # An event whose item never arrives: parked, then dead-lettered after the timeout.
        orphan = dict(good, event_id="g2", item_id="never-sent", ts=1.7e9 + 1)
        producer.send(settings.events_topic("feed"), key=b"u1", value=orjson.dumps(orphan))
        producer.flush()
        producer.close()
        letters = read_deadletters(settings, len(BAD) + len(BAD_ITEMS) + 2)
        assert wait_for_vectors(settings, {"u1": 1}, timeout=30, progress=False) == {}
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics").read().decode()
        assert w.proc.poll() is None, "the worker must keep running"
        # The same figures on the operations port of their own (metrics_port).
        ops = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics").read().decode()
        assert "mirstream_deadletter_total" in ops
        health = orjson.loads(urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/health").read())
        assert "problems" in health and "ok" in health
    reasons = [d["reason"] for d in letters]
    for _, expected_reason in BAD + BAD_ITEMS:
        assert any(expected_reason in reason for reason in reasons), (expected_reason, reasons)
    assert any("never-sent" in reason for reason in reasons)
    assert any("has no key" in reason for reason in reasons)
    assert f'mirstream_deadletter_total{{source="event"}} {len(BAD) + 2}.0' in metrics_text
    assert f'mirstream_deadletter_total{{source="item"}} {len(BAD_ITEMS)}.0' in metrics_text


def test_backlog_through_a_tiny_stream_buffer(pipeline_settings, ds, tmp_path):
    # A stream buffer of 8 events and unbounded fetches: most hand-offs of the backlog wait for room, so
    # streams.consumer's waiting path (resume, raced against the rebalance flag) runs inside Faust's own
    # fetch loop thousands of times; every event must still apply exactly once, with offline parity.
    settings = pipeline_settings.with_(stream_buffer=8, max_poll_records=0, batch_size=16)
    expected = replay(settings, ds, USERS)  # the whole stream is there before the worker starts
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}
        metrics_text = urllib.request.urlopen(f"http://127.0.0.1:{settings.web_port}/metrics").read().decode()
        assert lagging(settings) == {}
        log = w.log_text()
    handoffs = {
        path: float(n) for path, n in re.findall(r'mirstream_handoffs_total\{path="(\w+)"\} (\S+)', metrics_text)
    }
    assert handoffs["waited"] > 100, handoffs
    assert handoffs["at_once"] + handoffs["waited"] >= sum(expected.values())
    assert_matches_offline(settings, ds, expected, scenarios=tuple(ds.scenarios))
    assert "Traceback" not in log
