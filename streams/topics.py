"""Creates and checks the project's Kafka topics with kafka-python's admin client.

Topics are created up front (not by Faust on first use) so every scenario topic has the same
partition count: co-partitioning by user_id is what lets several workers split users cleanly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import TopicAlreadyExistsError

from streams.security import kafka_python_config
from streams.settings import Settings


class TopicMismatch(RuntimeError):
    """An existing topic has a different partition count than the settings ask for."""


def all_topics(settings: Settings) -> list[str]:
    return [
        *(settings.events_topic(s) for s in settings.scenarios),
        settings.items_topic,
        settings.interests_topic,
        settings.deadletter_topic,
    ]


@contextlib.contextmanager
def _admin(settings: Settings) -> Iterator[KafkaAdminClient]:
    """kafka-python's admin client with the settings' security, closed after use."""
    admin = KafkaAdminClient(**kafka_python_config(settings), client_id=f"{settings.app_id}-admin")
    try:
        yield admin
    finally:
        admin.close()


def partition_counts(admin: KafkaAdminClient, names: list[str]) -> dict[str, int]:
    described = admin.describe_topics(names)
    return {t.get("name", t.get("topic")): len(t["partitions"]) for t in described if not t.get("error_code")}


def ensure_topics(settings: Settings, names: list[str] | None = None, partitions: int | None = None) -> dict[str, int]:
    """Creates missing topics; raises TopicMismatch when an existing one has another partition count."""
    names = names or all_topics(settings)
    partitions = partitions or settings.partitions
    with _admin(settings) as admin:
        existing = set(admin.list_topics())
        missing = [n for n in names if n not in existing]
        if missing:
            new = [NewTopic(n, num_partitions=partitions, replication_factor=settings.replication) for n in missing]
            with contextlib.suppress(TopicAlreadyExistsError):  # another worker created it in between
                admin.create_topics(new, timeout_ms=30_000, wait_for_metadata=True)
        counts = partition_counts(admin, names)
    wrong = {n: c for n, c in counts.items() if c != partitions}
    if wrong:
        raise TopicMismatch(f"topics exist with another partition count than {partitions}: {wrong}")
    return counts


def delete_run_topics(settings: Settings, runs: list[Settings]) -> list[str]:
    """Deletes the topics of each run (``<prefix>.*``) and the ones Faust made for its app id
    (``<app_id>-*``, the assignor's); returns their names.  For benchmark runs on their own prefix."""
    starts = tuple(s for r in runs for s in (f"{r.prefix}.", f"{r.app_id}-"))
    with _admin(settings) as admin:
        names = sorted(n for n in admin.list_topics() if n.startswith(starts))
        if names:
            admin.delete_topics(names, timeout_ms=30_000)
    return names
