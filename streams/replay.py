"""Produces a dataset's items and events into the topics, in time order, with kafka-python.

Used by ``mirstream replay``, the demo and the integration tests.  ``rate`` paces events per second;
None sends as fast as the producer goes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import orjson
from kafka import KafkaProducer
from tqdm import tqdm

from models.data import Dataset
from streams.security import interest_reader, kafka_python_config
from streams.settings import Settings


@dataclass(frozen=True)
class ReplayPlan:
    """The events to send (indices into the dataset's columns, time order) and the items they use."""

    events: np.ndarray
    items: np.ndarray


def plan(ds: Dataset, max_users: int | None = None, max_events: int | None = None) -> ReplayPlan:
    stop = int(ds.offsets[min(max_users or ds.n_users, ds.n_users)])
    order = np.lexsort((np.arange(stop), ds.ts[:stop]))  # global time order, stable
    if max_events is not None:
        order = order[:max_events]
    return ReplayPlan(order, np.unique(ds.item[order]))


def event_body(ds: Dataset, i: int) -> dict:
    body = {
        "event_id": ds.event_ids[i] if ds.event_ids is not None else f"{ds.name}-{i}",
        "user_id": str(ds.user_ids[ds.user[i]]),
        "item_id": str(ds.item_ids[ds.item[i]]),
        "scenario": ds.scenarios[ds.scenario[i]],
        "action": ds.actions[ds.action[i]],
        "ts": float(ds.ts[i]),
    }
    if ds.query and ds.query[i]:
        body["query"] = ds.query[i]
    return body


def item_body(ds: Dataset, j: int) -> dict:
    body: dict = {"item_id": str(ds.item_ids[j])}
    if ds.item_text[j]:  # a catalogue of vectors only has no text
        body["text"] = ds.item_text[j]
    if ds.item_vectors is not None:
        body["vector"] = ds.item_vectors[j].tolist()
    return body


def producer(settings: Settings) -> KafkaProducer:
    return KafkaProducer(
        **kafka_python_config(settings),
        linger_ms=5,
        acks="all",
        max_request_size=settings.max_message_bytes * 4,
    )


def send_items(settings: Settings, ds: Dataset, items: np.ndarray, progress: bool = True) -> int:
    p = producer(settings)
    for j in tqdm(items.tolist(), desc="replay items", unit="item", disable=not progress):
        p.send(settings.items_topic, key=str(ds.item_ids[j]).encode(), value=orjson.dumps(item_body(ds, j)))
    p.flush()
    p.close()
    return len(items)


def send_events(
    settings: Settings,
    ds: Dataset,
    events: np.ndarray,
    rate: float | None = None,
    progress: bool = True,
    speedup: float | None = None,
    sent_at: list[float] | None = None,
) -> float:
    """Sends events in order; returns the achieved events/s.  ``rate``: at most this many events/s;
    ``speedup``: the events' own timing, ``speedup`` times faster than real time (both: the slower);
    ``sent_at``: each event's send time (epoch seconds, the clock Kafka's producer timestamps) is appended."""
    p = producer(settings)
    t0 = time.perf_counter()
    ts0 = float(ds.ts[events[0]]) if len(events) else 0.0
    for n, i in enumerate(tqdm(events.tolist(), desc="replay events", unit="ev", disable=not progress)):
        due = max(n / rate if rate else 0.0, (float(ds.ts[i]) - ts0) / speedup if speedup else 0.0)
        if due:
            ahead = t0 + due - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        body = event_body(ds, i)
        if sent_at is not None:
            sent_at.append(time.time())
        p.send(settings.events_topic(body["scenario"]), key=body["user_id"].encode(), value=orjson.dumps(body))
    p.flush()
    p.close()
    return len(events) / max(time.perf_counter() - t0, 1e-9)


def expected_seq(ds: Dataset, events: np.ndarray) -> dict[str, int]:
    """Per user, how many events the replay sends: the ``seq`` its vectors reach once all are applied."""
    users, counts = np.unique(ds.user[events], return_counts=True)
    return {str(ds.user_ids[u]): int(c) for u, c in zip(users, counts, strict=True)}


def wait_for_items(settings: Settings, n: int, timeout: float = 120.0) -> bool:
    """Polls Redis until ``n`` items are stored (a replay's catalogue is in); False on timeout."""
    reader = interest_reader(settings)
    deadline = time.monotonic() + timeout
    while reader.item_count() < n:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def wait_for_vectors(
    settings: Settings,
    expected: dict[str, int],
    timeout: float = 120.0,
    progress: bool = True,
    applied_only: bool = False,
) -> dict[str, int]:
    """Polls Redis until every user's vectors reflect ``expected[user]`` events (with ``applied_only``: until
    its state has applied them, for runs without refinement); returns the users still behind."""
    reader = interest_reader(settings)
    users = list(expected)
    deadline = time.monotonic() + timeout
    bar = tqdm(total=len(users), desc="waiting for fresh vectors", unit="user", disable=not progress)
    behind = dict(expected)
    while behind and time.monotonic() < deadline:
        names = list(behind)
        for u, seq in zip(names, reader.seqs(names, applied=applied_only), strict=True):
            if seq is not None and int(seq) >= behind[u]:
                del behind[u]
                bar.update(1)
        if behind:
            time.sleep(0.2)
    bar.close()
    return behind
