"""Foundation smoke tests: the broker and Redis are real, and a real Faust agent joins them."""

from __future__ import annotations

import time

import orjson
import pytest
import redis
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from state.keys import Keys
from streams.settings import Settings
from streams.topics import TopicMismatch, all_topics, ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration


def _settings(kafka_bootstrap: str, redis_url: str, prefix: str, tmp_path, **kw) -> Settings:
    return Settings(
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        app_id=f"{prefix}-app",
        datadir=str(tmp_path / "faust"),
        web_port=0,
        **kw,
    )


def test_topics_created_with_partition_count(kafka_bootstrap, redis_url, prefix, tmp_path):
    settings = _settings(kafka_bootstrap, redis_url, prefix, tmp_path, partitions=6)
    counts = ensure_topics(settings)
    assert counts == {name: 6 for name in all_topics(settings)}
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        described = admin.describe_topics([settings.events_topic("feed")])
    finally:
        admin.close()
    assert sorted(p["partition_index"] for p in described[0]["partitions"]) == list(range(6))
    # Idempotent: a second call finds them; a different count is refused instead of silently ignored.
    assert ensure_topics(settings) == counts
    with pytest.raises(TopicMismatch):
        ensure_topics(settings.with_(partitions=3))


def test_kafka_python_to_faust_agent_to_redis(kafka_bootstrap, redis_url, prefix, tmp_path):
    settings = _settings(kafka_bootstrap, redis_url, prefix, tmp_path, partitions=3)
    topic = f"{prefix}.smoke"
    ensure_topics(settings, [topic])
    r, smoke = redis.Redis.from_url(redis_url), Keys(prefix).smoke
    sent = {f"user-{i}": {"n": i, "text": f"hello {i}"} for i in range(12)}
    with WorkerProcess(settings, app="smoke", log=tmp_path / "worker.log"):
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for key, value in sent.items():
            producer.send(topic, key=key.encode(), value=orjson.dumps(value))
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and r.exists(*(smoke(k) for k in sent)) < len(sent):
            time.sleep(0.1)
    records = {k: orjson.loads(r.get(smoke(k)) or b"null") for k in sent}
    assert {k: rec["value"] if rec else None for k, rec in records.items()} == sent
    partitions = {rec["partition"] for rec in records.values()}
    assert partitions <= {0, 1, 2} and len(partitions) > 1, "keys should spread over partitions"


def test_bench_runs_are_dropped_and_nothing_else(kafka_bootstrap, redis_url, prefix, tmp_path):
    from streams import bench

    base = _settings(kafka_bootstrap, redis_url, prefix, tmp_path, partitions=1)
    keep = base.with_(prefix=f"{prefix}keep", app_id=f"{prefix}keep-app")  # not a bench run: must stay
    run = bench._fresh_prefix(base, "drop")
    faust_topic = f"{run.app_id}-noop-__assignor-__leader"  # what Faust makes for the no-op app of the run
    ensure_topics(keep)
    ensure_topics(run)
    ensure_topics(run, [faust_topic])
    r = redis.Redis.from_url(redis_url)
    for s in (keep, run):
        keys = Keys(s.prefix)
        r.set(keys.user_state("7"), b"x")
        r.set(keys.item("a"), b"y")
    assert bench.drop_runs(base) == (len(all_topics(run)) + 1, 2)
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        deadline = time.monotonic() + 30
        while (left := {n for n in admin.list_topics() if n.startswith(run.prefix)}) and time.monotonic() < deadline:
            time.sleep(0.2)  # deletion is asynchronous on the broker
        names = set(admin.list_topics())
    finally:
        admin.close()
    assert not left and faust_topic not in names
    assert set(all_topics(keep)) <= names
    assert list(r.scan_iter(match=Keys(run.prefix).pattern())) == []
    assert len(list(r.scan_iter(match=Keys(keep.prefix).pattern()))) == 2
    assert bench.drop_runs(base) == (0, 0)  # each run is dropped once
