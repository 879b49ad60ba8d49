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
