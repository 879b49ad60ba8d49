"""The streaming pipeline as a Faust app: ``mirstream worker`` runs it.

    <prefix>.events.<scenario>  → scenario agents (streams.ingest)  → Redis: history + coarse state
    <prefix>.items              → item agent (streams.items)         → Redis: item codes + retrieval vectors
    dirty users (Redis)         → refinement timer (streams.refinement) → Redis vectors + <prefix>.interests
    rejected messages           → <prefix>.deadletter
Web: ``GET /users/{id}/interests[?version=v]`` (JSON), ``GET /metrics`` (Prometheus).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiokafka.errors import KafkaError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError

from models.user_model import Checkpoint
from state.store import AsyncInterestReader, StreamStore, connect_async
from streams import metrics
from streams.faust_app import make_faust_app
from streams.ingest import Ingestor, Message, release_parked
from streams.items import ItemHandler
from streams.refinement import Refresher
from streams.settings import Settings
from streams.switch import Codebooks, recode_items

log = logging.getLogger("mirstream")
settings = Settings.from_env()
app = make_faust_app(settings)
ckpt = Checkpoint.load(settings.checkpoint)
store = StreamStore(connect_async(settings.redis_url), settings.prefix)
reader = AsyncInterestReader(settings.redis_url, settings.prefix)

event_topics = {s: app.topic(settings.events_topic(s), partitions=settings.partitions) for s in settings.scenarios}
items_topic = app.topic(settings.items_topic, partitions=settings.partitions)
interests_topic = app.topic(settings.interests_topic, partitions=settings.partitions)
deadletter_topic = app.topic(settings.deadletter_topic, partitions=settings.partitions)
processed: dict[tuple[str, int], int] = {}  # (topic, partition) → last offset handled, for the lag gauge


async def deadletter(msg: Message, reason: str, source: str) -> None:
    metrics.DEADLETTER.labels(source).inc()
    log.warning("dead-letter %s:%d:%d (%s): %s", msg.topic, msg.partition, msg.offset, source, reason)
    body = {
        "reason": reason,
        "source": source,
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "key": msg.key.decode(errors="replace") if msg.key else None,
        "value": msg.value[:4096].decode(errors="replace"),
        "at": time.time(),
    }
    # Await Kafka's acknowledgement: the source offset may be committed right after this returns.
    await (await deadletter_topic.send(key=msg.key, value=orjson.dumps(body)))


async def republish(scenario: str, user: str, body: bytes) -> None:
    await (await event_topics[scenario].send(key=user.encode(), value=body))


async def emit(user: str, body: dict) -> None:
    await interests_topic.send(key=user.encode(), value=orjson.dumps(body))


codebooks = Codebooks(store, ckpt.codebook)
ingestor = Ingestor(settings, ckpt, store, codebooks, deadletter, republish)
item_handler = ItemHandler(settings, ckpt, store, codebooks, deadletter, republish)
refresher = Refresher(settings, ckpt, store, codebooks, emit)


def _messages(events) -> list[Message]:
    out = []
    for e in events:
        m = e.message
        processed[(m.topic, m.partition)] = m.offset
        out.append(Message(m.topic, m.partition, m.offset, m.key, m.value or b"", float(m.timestamp or 0)))
    return out


async def retrying(what: str, step: Callable[[], Awaitable[object]]) -> None:
    """Runs ``step`` until it succeeds, backing off while Redis or Kafka is unreachable.

    Every step is idempotent, so re-running a half-done batch is safe; the batch is not acked (and the
    consumer does not move on) until it succeeded.
    """
    delay = 0.1
    while True:
        try:
            await step()
            return
        except (RedisError, OSError, KafkaError) as exc:
            log.warning("%s failed (%s: %s); retrying in %.1fs", what, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def _scenario_agent(scenario: str):
    async def agent(stream):
        async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_ms / 1000):
            batch = _messages(events)
            await retrying(f"events-{scenario} batch", lambda batch=batch: ingestor.handle(scenario, batch))

    agent.__name__ = f"events_{scenario}"
    return agent


for _scenario, _topic in event_topics.items():
    app.agent(_topic, name=f"events-{_scenario}")(_scenario_agent(_scenario))


@app.agent(items_topic, name="items")
async def items_agent(stream):
    async for events in stream.take_events(settings.batch_size, within=settings.batch_wait_ms / 1000):
        batch = _messages(events)
        await retrying("items batch", lambda batch=batch: item_handler.handle(batch))


def owned_partitions() -> list[int]:
    names = {t.get_topic_name() for t in event_topics.values()}
    return sorted({tp.partition for tp in app.consumer.assignment() if tp.topic in names})


@app.task
async def refine_loop() -> None:
    """Refinement micro-batches, back to back while there is work, every ``refine_wait_ms`` when idle."""
    while settings.refine and not app.should_stop:
        try:
            busy = await refresher.tick(owned_partitions()) >= settings.refine_batch
        except (RedisError, OSError, KafkaError) as exc:  # users stay dirty: the next tick retries them
            log.warning("refinement tick failed (%s: %s)", type(exc).__name__, exc)
            busy = False
        await asyncio.sleep(0 if busy else settings.refine_wait_ms / 1000)


@app.task
async def recode_loop() -> None:
    """After a codebook change: gives every stored item a code of this worker's codebook, in the
    background (events meanwhile re-encode the items they meet on their own, see ``streams.switch``)."""
    await retrying("item re-encoding", lambda: recode_items(store, codebooks, pause_s=0.01))


@app.timer(interval=5.0)
async def expire_parked() -> None:
    await retrying("parking expiry", _expire_parked)


async def _expire_parked() -> None:
    """Releases parked events whose item is known by now (a crash between storing an item and releasing
    its events leaves some behind); dead-letters the rest once they waited ``park_timeout_s``."""
    deadline = time.time() - settings.park_timeout_s
    for item, parked_at in await store.parked_items(limit=1000):
        if (await codebooks.item_codes([item]))[item] is not None:
            await release_parked(store, republish, item)
        elif parked_at < deadline:
            bodies = await store.parked(item)
            for body in bodies:
                event = orjson.loads(body)
                msg = Message(
                    settings.events_topic(event.get("scenario", "?")),
                    -1,
                    -1,
                    str(event.get("user_id")).encode(),
                    body,
                    0.0,
                )
                reason = f"unknown item {item!r}: not arrived within {settings.park_timeout_s:.0f}s"
                await deadletter(msg, reason, "event")
            await store.drop_parked(item, len(bodies))


@app.timer(interval=5.0)
async def lag_gauge() -> None:
    for tp in app.consumer.assignment():
        hw = app.consumer.highwater(tp)
        if hw is not None:
            metrics.LAG.labels(tp.topic, str(tp.partition)).set(
                max(0, hw - processed.get((tp.topic, tp.partition), -1) - 1)
            )


@app.page("/users/{user_id}/interests")
async def user_interests(web, request, user_id: str):
    version = request.query.get("version")  # ?version=<model version> pins one; default: the latest
    found = await reader.interests(user_id, version)
    if found is None:
        at = f" of model version {version!r}" if version else ""
        return web.json({"error": f"no interest vectors{at} for user {user_id!r} yet"}, status=404)
    return web.json(found.to_json())


@app.page("/metrics")
async def metrics_page(web, request):
    return web.bytes(generate_latest(metrics.REGISTRY), content_type=CONTENT_TYPE_LATEST.split(";")[0])
