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


def test_pace_grows_a_step_at_a_time_while_events_keep_coming_fast():
    pace = Pace(max_events=100, wait_s=0.05, max_wait_s=0.5, grow_at=10)
    assert pace.more_wait(0.05, 9) == 0.0  # a steady stream: the batch closes at the short wait
    assert pace.more_wait(0.05, 10) == 0.05  # a backlog: one more step
    assert pace.more_wait(0.10, 3) == 0.0  # the hold-up is over: close, not wait to max_wait_s
    assert pace.more_wait(0.48, 50) == pytest.approx(0.02)  # never past max_wait_s
    assert pace.more_wait(0.50, 50) == 0.0
    fixed = Pace(max_events=100, wait_s=0.05, max_wait_s=0.05, grow_at=1)
    assert fixed.more_wait(0.05, 50) == 0.0


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
class Message:
    generation_id: int


@dataclass(frozen=True)
class Event:
    value: int
    message: Message


@dataclass
class App:
    consumer_generation_id: int = 1


class Stream(Service):
    """What ``take_batches`` uses of a Faust stream, as Faust's reader does it: per value a yield to the
    loop, ``current_event`` set, the processors run (an awaitable they return is awaited), and the event
    acked when ``enable_acks`` was on as it was read; acked values are recorded."""

    def __init__(self, source: asyncio.Queue) -> None:
        super().__init__()
        self.app = App()
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
        while True:
            do_ack = self.enable_acks
            await asyncio.sleep(0)
            value, generation = await channel.__anext__()
            event = Event(value, Message(generation))
            self.current_event = event
            self.read.append(value)
            for processor in list(self._processors):
                out = processor(value)
                if asyncio.iscoroutine(out):
                    await out
            self.current_event = None
            if do_ack:
                await self.ack(event)

    async def ack(self, event: Event) -> bool:
        self.acked.append(event.value)
        return True


class _Channel:
    def __init__(self, source: asyncio.Queue) -> None:
        self.source = source

    def __aiter__(self) -> _Channel:
        return self

    async def __anext__(self) -> tuple[int, int]:
        item = await self.source.get()
        return item if isinstance(item, tuple) else (item, 1)  # (value, consumer generation)


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
        assert stream.enable_acks is False and stream._processors == []  # nor does the stream after it
        await stream.stop()

    asyncio.run(run())


def test_a_batch_grows_while_events_come_fast_then_closes_and_a_full_one_closes_at_once():
    async def run() -> None:
        stream, source = await _started()
        batches = take_batches(stream, Pace(max_events=1000, wait_s=0.2, max_wait_s=5.0, grow_at=3))

        async def backlog() -> None:  # 5 events every 20 ms for 0.6 s: far more than 3 a 0.2 s step
            for burst in range(30):
                for v in range(5 * burst, 5 * burst + 5):
                    source.put_nowait(v)
                await asyncio.sleep(0.02)

        feeder = asyncio.ensure_future(backlog())
        t0 = time.monotonic()
        grown = await batches.__anext__()
        took = time.monotonic() - t0
        await feeder
        assert [e.value for e in grown] == list(range(150))  # it grew past its first step, to the last burst
        assert 0.6 <= took < 4.0  # and closed a step or so after the bursts stopped, not at max_wait_s

        for v in range(200, 210):  # a hold-up, then nothing: one more step, then it closes
            source.put_nowait(v)
        t0 = time.monotonic()
        short = await batches.__anext__()
        assert [e.value for e in short] == list(range(200, 210))
        assert time.monotonic() - t0 < 2.5

        for v in range(1000, 2500):  # more than a batch: it closes full, without waiting
            source.put_nowait(v)
        t0 = time.monotonic()
        full = await batches.__anext__()
        assert [e.value for e in full] == list(range(1000, 2000))
        assert time.monotonic() - t0 < 4.0  # at max_events, not max_wait_s
        assert stream.read[-1] == 1999  # reading paused at the full batch: none read past it yet
        rest = await batches.__anext__()
        assert [e.value for e in rest] == list(range(2000, 2500))
        assert stream.acked == list(range(150)) + list(range(200, 210)) + list(range(1000, 2000))
        await batches.aclose()
        await stream.stop()

    asyncio.run(run())


def test_an_error_in_the_agent_acks_nothing_it_was_handed_nor_what_is_read_after():
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
        assert stream._processors == []
        source.put_nowait(3)  # the stream's reader goes on after the agent's loop is gone
        for _ in range(5):
            await asyncio.sleep(0)
        assert stream.read == [1, 2, 3]
        assert stream.acked == []  # neither the batch handed over nor what was read after it
        await stream.stop()

    asyncio.run(run())


def test_events_read_before_a_rebalance_are_dropped_unacked():
    async def run() -> None:
        stream, source = await _started()
        batches = take_batches(stream, Pace(max_events=10, wait_s=0.05, max_wait_s=0.05, grow_at=10))
        for item in ((1, 1), (2, 1), (3, 2)):  # (value, consumer generation)
            source.put_nowait(item)
        for _ in range(10):
            await asyncio.sleep(0)
        stream.app.consumer_generation_id = 2  # a rebalance while they waited in the batch
        batch = await batches.__anext__()
        assert [e.value for e in batch] == [3]
        source.put_nowait((4, 2))
        await batches.__anext__()
        assert stream.acked == [3]  # 1 and 2: read again from the committed offset by their owner
        await batches.aclose()
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


def test_a_batch_handed_over_after_a_stop_waits_for_running_batches_then_exits(monkeypatch):
    """``BatchGate``: after ``drain`` a new batch is not started, and the process exits only once the
    other agents' running batches are done (the exit itself is recorded here instead of taken)."""
    from streams import retry

    exits: list[tuple[int, int]] = []

    class Exited(Exception):
        pass

    def exit_now(code: int) -> None:
        exits.append((code, gate.running))
        raise Exited

    monkeypatch.setattr(retry, "exit_now", exit_now)
    gate = retry.BatchGate()

    async def run() -> None:
        release = asyncio.Event()
        started: list[str] = []

        async def slow() -> str:
            started.append("slow")
            await release.wait()
            return "applied"

        async def late() -> str:
            started.append("late")
            return "applied"

        running = asyncio.ensure_future(gate.run("a", slow))
        await asyncio.sleep(0.01)
        drained = asyncio.ensure_future(gate.drain(timeout=5.0))
        await asyncio.sleep(0.01)
        handed = asyncio.ensure_future(gate.run("b", late))
        await asyncio.sleep(0.1)
        assert not drained.done() and not handed.done() and exits == []  # both wait for the running batch
        release.set()
        assert await running == "applied"
        await drained
        with pytest.raises(Exited):
            await handed
        assert exits == [(0, 0)] and started == ["slow"]  # exit 0, nothing running, the late batch not run

    asyncio.run(run())
