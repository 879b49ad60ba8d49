"""Batches of a Faust stream whose wait grows under a backlog, acked only once the agent asks for the next.

Faust's ``take_events(max, within)`` fixes its wait when the stream starts.  At a steady rate a short
wait keeps each event's delay small; under a backlog (a restart, a burst, a replay) the same wait closes
batches of a few hundred events, and most of a batch's cost is per *user* (read, plan, write), so
larger batches, which hold fewer users per event, go faster (README, Performance, ingest).
``take_batches`` picks the wait per batch from how fast its events arrive (``Pace.more_wait``, a pure
rule with unit tests): a batch that received ``grow_at`` events in its last ``wait_s`` is filling faster
than a steady stream does, so it waits another ``wait_s``, up to ``max_wait_s``, or until it is full.

How it differs from ``take_events``, on purpose:

- the wait runs from the batch's first event, not from when the agent came back (an event read while
  the agent works on the batch before waits for that work, then at most the rest of its own batch's
  wait);
- the stream keeps reading while the agent works on a batch (into the next one, up to ``max_events``,
  then reading pauses until that batch is taken);
- a batch's events are acked only when the agent asks for the next batch: an exception in the agent's
  loop, or a cancel, leaves the generator at its ``yield`` and acks nothing (``take_events`` acks in a
  ``finally``, see ``streams.retry``), and the stream's own acking stays off after the generator ends,
  so nothing it reads later is acked unapplied either;
- events read before a rebalance (an older consumer generation) are dropped from a batch unacked: the
  partition's owner reads them again from the committed offset.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from faust.types import EventT, StreamT

from streams.settings import Settings


@dataclass(frozen=True)
class Pace:
    """How a batch closes: at ``max_events``, or ``wait_s`` after its first event, unless it holds
    ``grow_at`` or more events by then (faster than a steady stream sends them: a backlog, or events
    read while the agent worked on the batch before), in which case it waits another ``wait_s``, and so
    on while ``grow_at`` more arrive in each step, up to ``max_wait_s`` after its first event.  A short
    hold-up makes a batch a step or two longer, not ``max_wait_s``; ``max_wait_s == wait_s`` is a fixed
    wait."""

    max_events: int
    wait_s: float
    max_wait_s: float
    grow_at: int

    def __post_init__(self) -> None:
        if self.max_events < 1 or self.grow_at < 1:
            raise ValueError(f"max_events and grow_at must be >= 1, got {self.max_events} and {self.grow_at}")
        if not 0 < self.wait_s <= self.max_wait_s:
            raise ValueError(f"need 0 < wait_s <= max_wait_s, got {self.wait_s} and {self.max_wait_s}")

    def more_wait(self, open_s: float, arrived: int) -> float:
        """Seconds more that a batch open for ``open_s`` (at the end of a step) waits, given the events
        that ``arrived`` in its last step; 0: it closes now."""
        if arrived < self.grow_at or open_s >= self.max_wait_s:
            return 0.0
        return min(self.wait_s, self.max_wait_s - open_s)


def event_pace(settings: Settings) -> Pace:
    """The scenario agents' batches (and the no-op ceiling's, which takes the same)."""
    return Pace(
        settings.batch_size, settings.batch_wait_ms / 1000, settings.batch_wait_max_ms / 1000, settings.batch_grow_at
    )


def item_pace(settings: Settings) -> Pace:
    """The item agent's batches: a fixed wait (an item costs milliseconds of the item tower; its batches
    stay small whatever the backlog)."""
    wait = settings.batch_wait_ms / 1000
    return Pace(settings.item_batch_size, wait, wait, settings.item_batch_size)


class _Pending:
    """The events read since the last batch was taken; the stream's processor adds to it."""

    def __init__(self, stream: StreamT, max_events: int) -> None:
        self.stream = stream
        self.max_events = max_events
        self.events: list[EventT] = []
        self.first_at = 0.0
        self.arrived = asyncio.Event()  # the batch has its first event
        self.full = asyncio.Event()
        self.room = asyncio.Event()  # the full batch was taken: reading goes on
        self.room.set()

    def add(self, value: Any) -> Any:
        """A stream processor: notes the current event; a full batch pauses reading until it is taken
        (a processor may return an awaitable, which the stream awaits)."""
        event = self.stream.current_event
        if event is None:
            raise RuntimeError("take_batches: the stream has no current event (a stream of a topic is needed)")
        if not self.events:
            self.first_at = time.monotonic()
            self.arrived.set()
        self.events.append(event)
        if len(self.events) >= self.max_events:
            self.full.set()
            self.room.clear()
            return self._until_taken(value)
        return value

    async def _until_taken(self, value: Any) -> Any:
        await self.stream.wait(self.room)
        return value

    def take(self) -> list[EventT]:
        """The batch, without events read before a rebalance (left unacked, read again by their owner)."""
        batch, self.events = self.events, []
        self.arrived.clear()
        self.full.clear()
        self.room.set()
        generation = self.stream.app.consumer_generation_id
        if any(e.message.generation_id != generation for e in batch):
            batch = [e for e in batch if e.message.generation_id == generation]
        return batch


async def take_batches(stream: StreamT, pace: Pace) -> AsyncIterator[list[EventT]]:
    """The stream's events in batches closed by ``pace``; each batch is acked when the next is asked for."""
    pending = _Pending(stream, pace.max_events)
    # Acked here, after the agent is done with a batch.  Left off when this generator ends: if the agent
    # left its loop without a stop (an error), the stream's reader goes on, and must not ack what it reads.
    stream.enable_acks = False
    stream.add_processor(pending.add)
    # the stream is read in the background, by Faust's own drainer (as ``take_events`` does)
    stream._enable_passive(aiter(stream.channel))
    try:
        # ``wait_for_stopped`` also returns on a timeout, saying "stopped": ``should_stop`` is what tells
        while not stream.should_stop:
            if not pending.events:
                await stream.wait_for_stopped(pending.arrived)
                continue
            await _fill_until(stream, pending, pending.first_at + pace.wait_s)
            held = 0  # events at the start of the last step
            while not pending.full.is_set() and not stream.should_stop:
                more = pace.more_wait(time.monotonic() - pending.first_at, len(pending.events) - held)
                if not more:
                    break
                held = len(pending.events)
                await _fill_until(stream, pending, time.monotonic() + more)
            if stream.should_stop:
                break
            batch = pending.take()
            if not batch:  # all of it from before a rebalance
                continue
            yield batch
            for event in batch:  # reached only when the agent asks for the next batch
                await stream.ack(event)
    finally:
        stream._processors.remove(pending.add)
        pending.room.set()  # a reader waiting for a full batch to be taken goes on


async def _fill_until(stream: StreamT, pending: _Pending, at: float) -> None:
    """Until the monotonic time ``at``, the batch is full, or the stream stops."""
    left = at - time.monotonic()
    if left > 0 and not pending.full.is_set():
        await stream.wait_for_stopped(pending.full, timeout=left)
