"""The streaming pipeline as a Faust app, built by ``build_app(settings)``: ``mirstream worker`` runs it.

    <prefix>.events.<scenario>  → scenario agents (streams.ingest)  → Redis: history + coarse state
    <prefix>.items              → item agent (streams.items)         → Redis: item codes + retrieval vectors
    dirty users (Redis)         → refinement task (streams.refinement) → Redis vectors + <prefix>.interests
    rejected messages           → <prefix>.deadletter
Web: ``GET /users/{id}/interests[?version=v]`` (JSON), ``GET /metrics`` (Prometheus), ``GET /health``
(200 or 503 with the reasons), ``GET /quarantine`` (users whose refinement failed, with the reason), and
the read-only pages ``/ui`` and ``/ui/users/{id}`` (``streams.web``).

Every batch runs through ``streams.retry`` (``BatchGate.run`` → ``run_batch``): it returns only once
the batch is applied, and ``guard_commits`` keeps every offset commit at or below what was applied.
"""

from __future__ import annotations

import asyncio
import logging
import time

import faust
import orjson
from aiohttp import web as aioweb
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from models.user_model import Checkpoint
from state.store import StreamStore
from streams import metrics
from streams.batching import event_pace, item_pace, take_batches
from streams.events import Message
from streams.faust_app import make_faust_app
from streams.ingest import Ingestor, owner_partition, release_parked
from streams.items import ItemHandler
from streams.refinement import Refresher
from streams.retry import BatchGate, is_transient, run_batch
from streams.security import async_interest_reader, auth_failure, redis_async
from streams.settings import Settings
from streams.switch import Codebooks, recode_items
from streams.web import pages

log = logging.getLogger("mirstream")


def check_scenarios(settings: Settings, ckpt: Checkpoint) -> None:
    """The checkpoint's scenario list is the source of truth: ids in stored history are its indices."""
    unknown = [s for s in settings.scenarios if s not in ckpt.model.cfg.scenarios]
    if unknown:
        raise SystemExit(
            f"scenarios {unknown} are not in the checkpoint {settings.checkpoint} "
            f"(it knows {list(ckpt.model.cfg.scenarios)}); set MIRSTREAM_SCENARIOS to a subset of those"
        )


class Progress:
    """Per input partition: the last offset applied and when it last moved, for the lag gauge, /health and
    the commit guard."""

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, int], int] = {}
        self.moved_at: dict[tuple[str, int], float] = {}

    def note(self, topic: str, partition: int, offset: int) -> None:
        self.offsets[(topic, partition)] = offset
        self.moved_at[(topic, partition)] = time.monotonic()

    def stalled(self, app: faust.App, after_s: float) -> list[str]:
        """Partitions with lag that made no progress for ``after_s`` seconds."""
        out, now = [], time.monotonic()
        for tp in app.consumer.assignment():
            key = (tp.topic, tp.partition)
            hw = app.consumer.highwater(tp)
            self.moved_at.setdefault(key, now)  # newly assigned: the clock starts now
            lag = 0 if hw is None else hw - self.offsets.get(key, -1) - 1
            metrics.LAG.labels(tp.topic, str(tp.partition)).set(max(0, lag))
            if lag > 0 and now - self.moved_at[key] > after_s:
                out.append(f"{tp.topic}[{tp.partition}] lag {lag}, no progress for {now - self.moved_at[key]:.0f}s")
        return out


def guard_commits(consumer, progress: Progress) -> None:
    """Bounds every offset commit by what the pipeline applied.

    Faust acks (and so commits) messages it *skips*: those fetched before a rebalance (a stale
    generation) and those that reach a stream while flow control is suspended (a rebalance, a stop).
    A skipped message was never given to an agent, so committing past it loses it (seen: the old worker
    of a roll-out, stopped mid-stream, committed events its streams skipped and the new owner started
    after them).  The guard lets a partition's commit go no further than one past the last offset an
    agent applied (``Progress.note``, called after the batch's effects are in Redis)."""
    if getattr(consumer, "_mirstream_guard", False):
        return
    faust_offsets = consumer._filter_committable_offsets

    def bounded(tps):
        out = {}
        for tp, offset in faust_offsets(tps).items():
            applied = progress.offsets.get((tp.topic, tp.partition))
            if applied is None:  # nothing of this partition applied here yet
                continue
            safe, committed = min(offset, applied + 1), consumer._committed_offset.get(tp)
            if committed is None or safe > committed:
                out[tp] = safe
        return out

    consumer._filter_committable_offsets = bounded
    consumer._mirstream_guard = True


def build_app(settings: Settings) -> faust.App:
    """The worker's Faust app, its agents, timers and pages, from one settings object."""
    app = make_faust_app(settings)
    ckpt = Checkpoint.load(settings.checkpoint)
    check_scenarios(settings, ckpt)
    store = StreamStore(redis_async(settings), settings.prefix, settings.user_ttl_s)
    reader = async_interest_reader(settings)
    progress = Progress()
    gate = BatchGate()
    ui = pages.register(app, settings, ckpt, store, reader)

    @app.on_before_shutdown.connect
    async def finish_batches(app, **kwargs) -> None:  # the fetcher has stopped; the agents have not
        await gate.drain()

    @app.on_partitions_assigned.connect
    async def install_commit_guard(app, assigned, **kwargs) -> None:  # before any message of the assignment
        guard_commits(app.consumer, progress)

    event_topics = {s: app.topic(settings.events_topic(s), partitions=settings.partitions) for s in settings.scenarios}
    items_topic = app.topic(settings.items_topic, partitions=settings.partitions)
    interests_topic = app.topic(settings.interests_topic, partitions=settings.partitions)
    deadletter_topic = app.topic(settings.deadletter_topic, partitions=settings.partitions)

    async def deadletter(msg: Message, reason: str, source: str) -> None:
        metrics.DEADLETTER.labels(source).inc()
        ui.note_deadletter(reason, source, msg.topic)
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
        topic = event_topics.get(scenario) or app.topic(settings.events_topic(scenario))  # any scenario's
        await (await topic.send(key=user.encode(), value=body))

    async def emit(user: str, body: dict) -> None:
        await interests_topic.send(key=user.encode(), value=orjson.dumps(body))

    codebooks = Codebooks(store, ckpt.codebook)
    ingestor = Ingestor(settings, ckpt, store, codebooks, deadletter, republish)
    item_handler = ItemHandler(settings, ckpt, store, codebooks, deadletter, republish)
    refresher = Refresher(settings, ckpt, store, codebooks, emit, process=settings.refine and settings.refine_process)
    refresher.warm()

    @app.on_before_shutdown.connect
    async def stop_refiner(app, **kwargs) -> None:  # no new batches; the refiner process ends after its call
        refresher.close()

    def messages(events) -> list[Message]:
        out = []
        for e in events:
            m = e.message
            out.append(Message(m.topic, m.partition, m.offset, m.key, m.value or b"", float(m.timestamp or 0)))
        return out

    def done(batch: list[Message]) -> None:
        last = {(m.topic, m.partition): m.offset for m in batch}  # a partition's messages come in offset order
        for (topic, partition), offset in last.items():
            progress.note(topic, partition, offset)

    def scenario_agent(scenario: str):
        async def agent(stream):
            async for events in take_batches(stream, event_pace(settings)):
                batch = messages(events)
                await gate.run(f"events-{scenario}", lambda batch=batch: ingestor.handle(scenario, batch))
                done(batch)

        agent.__name__ = f"events_{scenario}"
        return agent

    for scenario, topic in event_topics.items():
        app.agent(topic, name=f"events-{scenario}")(scenario_agent(scenario))

    @app.agent(items_topic, name="items")
    async def items_agent(stream):
        async for events in take_batches(stream, item_pace(settings)):
            batch = messages(events)
            await gate.run("items", lambda batch=batch: item_handler.handle(batch))
            done(batch)

    def owned_partitions() -> list[int]:
        names = {t.get_topic_name() for t in event_topics.values()}
        return sorted({tp.partition for tp in app.consumer.assignment() if tp.topic in names})

    async def refine_loop() -> None:
        """Refinement micro-batches, back to back while there is work, every ``refine_wait_ms`` when idle.
        ``tick`` never raises: a failing user is quarantined, a failing tick is counted and shown by /health."""
        while settings.refine and not app.should_stop:
            busy = await refresher.tick(owned_partitions()) >= settings.refine_batch
            await asyncio.sleep(0 if busy else settings.refine_wait_ms / 1000)

    # Two loops: one writes its batch while the other reads and refines the next (``Refresher._tick``).
    for _ in range(2):
        app.task(refine_loop)

    @app.task
    async def publish_trend_tau() -> None:
        """A trend model's τ, for the readers that add the trend coordinate to their item index."""
        if ingestor.trend_tau_s:
            await run_batch("trend", lambda: store.set_trend_tau(ingestor.trend_tau_s))

    @app.task
    async def recode_loop() -> None:
        """After a codebook change: gives every stored item a code of this worker's codebook, in the
        background (events meanwhile re-encode the items they meet on their own, see ``streams.switch``)."""
        await run_batch("recode", lambda: recode_items(store, codebooks, pause_s=0.01))

    @app.timer(interval=5.0)
    async def expire_parked() -> None:
        await run_batch("parking", _expire_parked)

    async def _expire_parked() -> None:
        """Releases parked events whose item is known by now (a crash between storing an item and releasing
        its events leaves some behind); dead-letters, for the partitions this worker owns, the events that
        waited ``park_timeout_s`` (a partition has one owner, so one worker dead-letters each event)."""
        deadline = time.time() - settings.park_timeout_s
        owned = set(owned_partitions())
        for item, parked_at in await store.parked_items(limit=1000):
            if (await codebooks.item_codes([item]))[item] is not None:
                await release_parked(store, republish, item)
            elif parked_at < deadline:
                expired = []
                for body in await store.parked(item):
                    event = orjson.loads(body)
                    if owner_partition(event) not in owned or event.get("_parked_at", 0) >= deadline:
                        continue
                    topic = settings.events_topic(event.get("scenario", "?"))
                    msg = Message(topic, -1, -1, str(event["user_id"]).encode(), body, 0.0)
                    reason = f"unknown item {item!r}: not arrived within {settings.park_timeout_s:.0f}s"
                    await deadletter(msg, reason, "event")
                    expired.append(body)
                await store.unpark(item, expired)

    @app.timer(interval=5.0)
    async def lag_gauge() -> None:
        progress.stalled(app, settings.health_stall_s)

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

    @app.page("/health")
    async def health_page(web, request):
        body = await health()
        return web.json(body, status=200 if body["ok"] else 503)

    @app.task
    async def ops_server() -> None:
        """``/metrics`` and ``/health`` on a port of their own (``metrics_port``), e.g. for a Prometheus on
        another host while the user pages stay on loopback; they hold no user data, so no token."""
        if not settings.metrics_port:
            return

        async def metrics_route(request: aioweb.Request) -> aioweb.Response:
            return aioweb.Response(body=generate_latest(metrics.REGISTRY), content_type="text/plain")

        async def health_route(request: aioweb.Request) -> aioweb.Response:
            body = await health()
            return aioweb.json_response(body, status=200 if body["ok"] else 503)

        ops = aioweb.Application()
        ops.router.add_get("/metrics", metrics_route)
        ops.router.add_get("/health", health_route)
        runner = aioweb.AppRunner(ops)
        await runner.setup()
        await aioweb.TCPSite(runner, settings.metrics_bind, settings.metrics_port).start()
        log.info("metrics and health on http://%s:%d", settings.metrics_bind, settings.metrics_port)

    async def health() -> dict:
        problems = progress.stalled(app, settings.health_stall_s)
        try:
            await asyncio.wait_for(store.ping(), timeout=2.0)
        except Exception as exc:
            refused = auth_failure(exc)
            if refused is None and not is_transient(exc):
                raise
            problems.append(f"redis unreachable: {refused or f'{type(exc).__name__}: {exc}'}")
        failing = refresher.failing_since
        if failing is not None and time.monotonic() - failing > settings.health_stall_s:
            problems.append(f"refinement failing for {time.monotonic() - failing:.0f}s")
        quarantined = await store.quarantined_count() if not any("redis" in p for p in problems) else None
        return {"ok": not problems, "problems": problems, "quarantined_users": quarantined}

    @app.page("/quarantine")
    async def quarantine_page(web, request):
        return web.json(await store.quarantined())

    return app
