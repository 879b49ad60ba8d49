"""Faust's aiokafka consumer with a cheaper hand-off of each fetched message to the streams.

Faust's fetch loop (``Consumer._drain_messages``) hands every message to the streams with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: the hand-off races a rebalance's
"stop the flow" flag, so a put that blocks on a full stream buffer cannot hold a rebalance up.  mode's
``Service.wait_first`` makes four tasks for that race (the callback, the flag, the service's stopped and
crashed events), waits on them and cancels three: ~30 µs a message here, about half of what a Faust
agent that does nothing costs per event (README, Performance, ingest).

Nearly every hand-off never blocks: the callback puts the event into a queue with room and returns.
``EagerConsumer.wait_first`` runs the callback's first step at once, in the fetch loop's task; when the
callback finishes there, that is the whole hand-off (no task, no race: nothing was waited on that a flag
could interrupt).  When it suspends (a full buffer, a held lock) the rest of it runs in one task
(``resume``), raced against the same flags by mode's own ``wait_first``, so a rebalance or a stop
cancels it exactly as before.  When a flag is already set, mode's ``wait_first`` runs unchanged.
Python 3.12's eager tasks do the same for any task; this is that, for the one call site on 3.10/3.11.

``resume`` finishes a coroutine that was stepped once by hand, the way an asyncio Task would have:
``tests/test_consumer.py`` holds both paths to the reference (``Service.wait_first`` on the fresh
coroutine) for a callback that returns, raises, blocks then returns, blocks then raises, and blocks
until a flag cancels it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitArgT, WaitResults
from mode.utils.times import Seconds


async def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Run ``coro`` to its end in the current task, from where its first ``send(None)`` left it:
    suspended on ``yielded`` (an asyncio future, or ``None`` for a bare yield).  A cancel of this task
    reaches ``coro`` where it waits, as it would in a task of its own."""
    while True:
        try:
            if yielded is None:  # a bare ``yield`` (asyncio.sleep(0)): give the loop one turn
                await asyncio.sleep(0)
            else:
                yielded._asyncio_future_blocking = False  # what Task.__step does before waiting on it
                await yielded
        except BaseException as exc:  # passed into coro, which decides
            if yielded is not None and yielded.done():
                step = coro.send  # its result() raises the future's exception or CancelledError itself
                arg: Any = None
            else:  # this task was cancelled while the future was not (or on a bare yield)
                step, arg = coro.throw, exc
        else:
            step, arg = coro.send, None
        try:
            yielded = step(arg)
        except StopIteration as stop:
            return stop.value


def _close(coros: tuple[WaitArgT, ...]) -> None:
    """Close the coroutines passed beside the callback (the flag's ``wait()``), never started."""
    for coro in coros:
        if asyncio.iscoroutine(coro):
            coro.close()


class EagerHandoff:
    """``wait_first`` that runs its first coroutine eagerly; mixed into a mode ``Service`` that has a
    ``suspend_flow`` event (Faust's consumers)."""

    suspend_flow: asyncio.Event
    _stopped: asyncio.Event
    _crashed: asyncio.Event

    async def wait_first(self, *coros: WaitArgT, timeout: Seconds | None = None) -> WaitResults:
        first = coros[0] if coros else None
        flags = (self.suspend_flow, self._stopped, self._crashed)
        if timeout is not None or not asyncio.iscoroutine(first) or any(f.is_set() for f in flags):
            return await super().wait_first(*coros, timeout=timeout)
        try:
            yielded = first.send(None)
        except StopIteration as stop:  # finished without waiting: nothing to race
            _close(coros[1:])
            return WaitResults([first], [stop.value], False)
        except BaseException:
            _close(coros[1:])
            raise
        # suspended: the rest in one task, raced as before (mode's wait_first cancels it when a flag wins,
        # or when this call itself is cancelled)
        return await super().wait_first(asyncio.ensure_future(resume(first, yielded)), *coros[1:])


class EagerConsumer(EagerHandoff, faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose per-message hand-off starts the callback eagerly."""


class EagerTransport(faust_aiokafka.Transport):
    """The aiokafka transport with ``EagerConsumer``."""

    Consumer = EagerConsumer
