"""``streams.batching``: when a batch closes, and that its events are acked only once the agent asks for
the next batch.

``Stream`` below is the part of a Faust stream ``take_batches`` uses, on mode's real ``Service`` (so
``wait_for_stopped``, ``wait`` and ``should_stop`` are mode's own, timeouts included), fed from a queue
in place of a topic.  The pipeline runs the same function over real Kafka in every integration test.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import pytest
from mode import Service

from streams.batching import Pace, event_pace, item_pace, take_batches
from streams.settings import Settings


def test_pace_grows_only_for_a_batch_that_fills_fast():
    pace = Pace(max_events=100, wait_s=0.05, max_wait_s=0.5, grow_at=10)
    assert pace.close_after(0) == 0.05
    assert pace.close_after(9) == 0.05
    assert pace.close_after(10) == 0.5
    fixed = Pace(max_events=100, wait_s=0.05, max_wait_s=0.05, grow_at=1)
    assert fixed.close_after(50) == 0.05


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 0.05, 0.5, 10), "max_events"),
        ((10, 0.05, 0.5, 0), "grow_at"),
        ((10, 0.0, 0.5, 10), "wait_s"),
        ((10, 0.5, 0.05, 10), "max_wait_s"),
    ],
)
def test_pace_refuses_nonsense(args, message):
    with pytest.raises(ValueError, match=message):
        Pace(*args)


def test_paces_from_settings():
    s = Settings(batch_size=300, batch_wait_ms=40, batch_wait_max_ms=400, batch_grow_at=64, item_batch_size=16)
    assert event_pace(s) == Pace(300, 0.04, 0.4, 64)
    assert item_pace(s) == Pace(16, 0.04, 0.04, 16)  # items: a fixed wait
    with pytest.raises(ValueError, match="batch_wait_max_ms"):
        Settings.from_env({"MIRSTREAM_BATCH_WAIT_MS": "100", "MIRSTREAM_BATCH_WAIT_MAX_MS": "50"})


@dataclass(frozen=True)
class Event:
    value: int


class Stream(Service):
    """What ``take_batches`` uses of a Faust stream: processors run on each value read by a passive
    drainer, ``current_event``, ``enable_acks``, ``ack``; acked values are recorded."""

    def __init__(self, source: asyncio.Queue) -> None:
        super().__init__()
        self.channel = _Channel(source)
        self.enable_acks = True
        self.current_event: Event | None = None
        self._processors: list = []
        self.acked: list[int] = []
        self.read: list[int] = []

    def add_processor(self, processor: Any) -> None:
        self._processors.append(processor)

    def _enable_passive(self, channel: Any) -> None:
        self.add_future(self._drain(channel))

    async def _drain(self, channel: Any) -> None:
        async for value in channel:
            self.current_event = Event(value)
            self.read.append(value)
            for processor in self._processors:
                out = processor(value)
                if asyncio.iscoroutine(out):
                    await out

    async def ack(self, event: Event) -> bool:
        self.acked.append(event.value)
        return True


class _Channel:
    def __init__(self, source: asyncio.Queue) -> None:
        self.source = source

    def __aiter__(self) -> _Channel:
        return self

    async def __anext__(self) -> int:
        return await self.source.get()


async def _started() -> tuple[Stream, asyncio.Queue]:
    source: asyncio.Queue = asyncio.Queue()
    stream = Stream(source)
    await stream.start()
    return stream, source


def test_a_trickle_closes_at_the_short_wait_and_acks_after_the_next_ask():
    async def run() -> None:
        stream, source = await _started()
        batches = take_batches(stream, Pace(max_events=100, wait_s=0.05, max_wait_s=1.0, grow_at=5))
        for v in (1, 2, 3):
            source.put_nowait(v)
        t0 = time.monotonic()
        first = await batches.__anext__()
        took = time.monotonic() - t0
        assert [e.value for e in first] == [1, 2, 3]
        assert 0.04 <= took < 0.9  # the short wait, not the long one (3 < grow_at)
        assert stream.acked == []  # handed over, not yet done with
        assert stream.enable_acks is False
        source.put_nowait(4)
        second = await batches.__anext__()
        assert stream.acked == [1, 2, 3]  # acked when the agent asked for more, not before
        assert [e.value for e in second] == [4]
        await batches.aclose()
        assert stream.acked == [1, 2, 3]  # leaving the loop acks nothing it holds
        assert stream.enable_acks is True and stream._processors == []
        await stream.stop()

    asyncio.run(run())


def test_a_fast_filling_batch_waits_longer_and_a_full_one_closes_at_once():
    async def run() -> None:
        stream, source = await _started()
        batches = take_batches(stream, Pace(max_events=50, wait_s=0.05, max_wait_s=0.4, grow_at=5))
        for v in range(10):  # a backlog: grow_at events already there at the short wait
            source.put_nowait(v)

        async def trickle() -> None:
            await asyncio.sleep(0.2)  # after the short wait, before the long one
            source.put_nowait(10)

        feeder = asyncio.ensure_future(trickle())
        t0 = time.monotonic()
        grown = await batches.__anext__()
        took = time.monotonic() - t0
        await feeder
        assert [e.value for e in grown] == list(range(11))  # the event at 0.2 s made it in
        assert 0.35 <= took < 2.0
        for v in range(100, 200):  # more than a batch: it closes full, without waiting
            source.put_nowait(v)
        t0 = time.monotonic()
        full = await batches.__anext__()
        assert [e.value for e in full] == list(range(100, 150))
        assert time.monotonic() - t0 < 0.35  # at max_events, long before max_wait_s
        assert stream.read[-1] == 149  # reading paused at the full batch: none read past it yet
        rest = await batches.__anext__()
        assert [e.value for e in rest] == list(range(150, 200))
        assert stream.acked == list(range(11)) + list(range(100, 150))
        await batches.aclose()
        await stream.stop()

    asyncio.run(run())


def test_an_error_in_the_agent_acks_nothing_it_was_handed():
    async def run() -> None:
        stream, source = await _started()
        for v in (1, 2):
            source.put_nowait(v)

        async def agent() -> None:
            async for batch in take_batches(stream, Pace(max_events=10, wait_s=0.02, max_wait_s=0.02, grow_at=10)):
                assert batch
                raise RuntimeError("not applied")

        with pytest.raises(RuntimeError, match="not applied"):
            await agent()
        for _ in range(5):  # the abandoned generator is closed by the loop's finalizer
            await asyncio.sleep(0)
        assert stream.acked == []
        assert stream._processors == [] and stream.enable_acks is True
        await stream.stop()

    asyncio.run(run())


def test_a_stop_while_waiting_ends_the_batches_without_acking():
    async def run() -> None:
        stream, source = await _started()
        batches = take_batches(stream, Pace(max_events=10, wait_s=5.0, max_wait_s=5.0, grow_at=10))
        source.put_nowait(1)

        async def stop_soon() -> None:
            await asyncio.sleep(0.1)
            await stream.stop()

        stopper = asyncio.ensure_future(stop_soon())
        t0 = time.monotonic()
        with pytest.raises(StopAsyncIteration):
            await batches.__anext__()
        assert time.monotonic() - t0 < 4.0  # the stop, not the 5 s wait, ended it
        await stopper
        assert stream.acked == []

    asyncio.run(run())
