"""Ceilings for ``mirstream bench ingest``: how fast events can be *read* here, before any of our work.

Benchmark tooling only; no worker imports this module.  Two consumers read the same pre-produced
scenario topics as the pipeline:

- ``raw_consumer``: aiokafka ``getmany`` (500 records at most, kafka-python's default) + ``orjson.loads``
  of every value, in the bench process,
  without a consumer group (every partition from the beginning): what the client library and the
  broker give on this machine.
- ``build_noop_app``: a Faust app with the pipeline's shape (one agent per scenario topic, the same
  ``make_faust_app`` options, the same batches: ``streams.batching.take_batches``) whose agents only parse
  each value: what Faust's stream machinery costs, and so the most the pipeline can reach as written
  (``mirstream worker --app noop``).  It writes its figures to ``<datadir>/<app_id>.ceiling.json``
  once it has read ``MIRSTREAM_CEILING_EVENTS`` events.

Every reader is timed the same way (``Span``): from the end of the first batch it handled to the last
event, over the events after that first batch, so start-up (group join, metadata, the first fetch)
counts for none of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import faust
import orjson
from aiokafka import AIOKafkaConsumer

from streams.batching import event_pace, take_batches
from streams.faust_app import make_faust_app
from streams.security import kafka_python_config
from streams.settings import Settings

EVENTS_ENV = "MIRSTREAM_CEILING_EVENTS"


@dataclass
class Span:
    """Events handled and when: the first batch's end and count, the last event's time, and the reader's
    CPU time (all its threads) at both."""

    events: int = 0
    first_at: float = 0.0
    first_events: int = 0
    last_at: float = 0.0
    cpu_first: float = 0.0
    cpu_last: float = 0.0

    def note(self, n: int, now: float | None = None, cpu: float | None = None) -> None:
        """``cpu``: the reader's CPU seconds now (default: this process's, ``time.process_time``)."""
        now = time.perf_counter() if now is None else now
        cpu = time.process_time() if cpu is None else cpu
        self.events += n
        if not self.first_at:
            self.first_at, self.first_events, self.cpu_first = now, self.events, cpu
        self.last_at, self.cpu_last = now, cpu

    @property
    def per_s(self) -> float:
        """Events/s after the first batch (0 when everything came in one batch)."""
        span = self.last_at - self.first_at
        return (self.events - self.first_events) / span if span > 0 else 0.0

    @property
    def cpu_us_per_event(self) -> float:
        """The reader's CPU microseconds per event after the first batch (nan when none came after it)."""
        n = self.events - self.first_events
        return (self.cpu_last - self.cpu_first) / n * 1e6 if n > 0 else float("nan")

    def row(self, expected: int) -> dict:
        return {
            **asdict(self),
            "wall_s": self.last_at - self.first_at,
            "events_per_s": self.per_s,
            "cpu_us_per_event": self.cpu_us_per_event,
            "complete": self.events >= expected,
        }


def ceiling_file(settings: Settings) -> Path:
    return Path(settings.datadir) / f"{settings.app_id}.ceiling.json"


async def _raw(settings: Settings, expected: int, timeout: float) -> Span:
    consumer = AIOKafkaConsumer(
        *[settings.events_topic(s) for s in settings.scenarios],
        **kafka_python_config(settings),  # aiokafka takes the same names (security, SASL, TLS context)
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    span = Span()
    try:
        deadline = time.monotonic() + timeout
        while span.events < expected and time.monotonic() < deadline:
            n = 0
            for msgs in (await consumer.getmany(timeout_ms=200, max_records=500)).values():
                for m in msgs:
                    orjson.loads(m.value)
                n += len(msgs)
            if n:
                span.note(n)
    finally:
        await consumer.stop()
    return span


def raw_consumer(settings: Settings, expected: int, timeout: float = 300.0) -> dict:
    """aiokafka getmany + orjson over the scenario topics of ``settings.prefix``, from the beginning."""
    return asyncio.run(_raw(settings, expected, timeout)).row(expected)


def build_noop_app(settings: Settings) -> faust.App:
    """The pipeline's Faust shape with agents that only parse: the ceiling of the stream machinery."""
    app = make_faust_app(settings)
    expected = int(os.environ.get(EVENTS_ENV, "0"))
    span = Span()
    out = ceiling_file(settings)

    def agent_for(scenario: str):
        async def agent(stream):
            async for events in take_batches(stream, event_pace(settings)):
                for e in events:
                    orjson.loads(e.message.value or b"null")
                span.note(len(events))
                if expected and span.events >= expected and not out.exists():
                    tmp = out.with_suffix(".partial")
                    tmp.write_text(json.dumps(span.row(expected)))
                    tmp.rename(out)  # the bench never reads half a file

        agent.__name__ = f"noop_{scenario}"
        return agent

    for scenario in settings.scenarios:
        topic = app.topic(settings.events_topic(scenario), partitions=settings.partitions)
        app.agent(topic, name=f"noop-{scenario}")(agent_for(scenario))
    return app


def wait_ceiling(settings: Settings, timeout: float = 300.0) -> dict | None:
    """The no-op app's figures once it has read every event; None on timeout."""
    deadline = time.monotonic() + timeout
    out = ceiling_file(settings)
    while time.monotonic() < deadline:
        if out.exists():
            return json.loads(out.read_text())
        time.sleep(0.2)
    return None
