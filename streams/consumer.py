"""Faust's aiokafka consumer with a cheaper hand-off of each fetched message to the streams.

Faust's fetch loop (``Consumer._drain_messages``) hands every message to the streams with
``await self.wait_first(callback(message), self.suspend_flow.wait())``: the hand-off races a rebalance's
"stop the flow" flag, so a put that blocks on a full stream buffer cannot hold a rebalance up.  mode's
``Service.wait_first`` makes four tasks for that race (the callback, the flag, the service's stopped and
crashed events), waits on them and cancels three: ~30 µs a message here, about half of what a Faust
agent that does nothing costs per event (README, Performance, ingest).

Nearly every hand-off never blocks: the callback puts the event into a queue with room and returns.
``EagerConsumer.wait_first`` runs the callback's first step at once, in the fetch loop's task (in a copy
of its context, so context variables the callback sets stay the callback's); when the callback finishes
there, that is the whole hand-off (no task, no race: nothing was waited on that a flag could interrupt).
When it suspends (a full buffer, a held lock) the rest of it runs in one task (``resume``, in the same
context), raced against the same flags by mode's own ``wait_first``, so a rebalance or a stop cancels
it as before.  When a flag is already set, mode's ``wait_first`` runs unchanged.

Unlike Python 3.12's eager tasks, the first step has no task of its own: ``asyncio.current_task()``
there is the fetch loop, so a callback must not use it, nor ``asyncio.timeout()``, before its first
suspension.  Faust's message callback (``faust.transport.conductor``: a lock, flow control, decode,
``put_nowait``, ``asyncio.wait`` over new tasks for a full queue) uses neither.

``resume`` finishes a coroutine that was stepped once by hand, the way an asyncio Task would have.
``tests/test_consumer.py`` holds both paths to the reference (``Service.wait_first`` on the fresh
coroutine): a callback that returns, raises, blocks then returns, blocks then raises, blocks until a
flag cancels it (also when the cancel lands after the future it waits on finished), a cancelled caller,
a task cancelled before it started, context variables.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka
from mode.services import WaitArgT, WaitResults
from mode.utils.times import Seconds

from streams.metrics import HANDOFFS

#: The suspended rest of a callback runs in a task with the first step's context (``create_task(context=)``,
#: Python 3.11); on 3.10 mode's ``wait_first`` runs unchanged.
EAGER_SUPPORTED = sys.version_info >= (3, 11)
AT_ONCE, WAITED = HANDOFFS.labels("at_once"), HANDOFFS.labels("waited")


async def resume(coro: Coroutine[Any, Any, Any], yielded: Any) -> Any:
    """Run ``coro`` to its end in the current task, from where its first ``send(None)`` left it:
    suspended on ``yielded`` (an asyncio future, or ``None`` for a bare yield).  Whatever ends this task's
    wait (the future's result, its exception, a cancel of this task, even one that lands after the future
    finished) reaches ``coro`` where it waits, as it would in a task of its own."""
    while True:
        try:
            if yielded is None:  # a bare ``yield`` (asyncio.sleep(0)): give the loop one turn
                await asyncio.sleep(0)
            else:
                # what Task.__step does with a future it is handed: the C Future refuses a second await
                # of a future still marked blocking ("await wasn't used with future")
                yielded._asyncio_future_blocking = False
                await yielded
        except BaseException as exc:  # the future's exception, or this task's cancel: coro decides
            step, arg = coro.throw, exc
        else:
            step, arg = coro.send, None
        try:
            yielded = step(arg)
        except StopIteration as stop:
            return stop.value


def _close_unstarted(coro: Coroutine[Any, Any, Any]) -> Callable[[asyncio.Future], None]:
    """A done-callback for ``resume``'s task: a task cancelled before its first step never resumed
    ``coro``, which would keep its waiter (a queue's putter) registered; close it instead."""

    def done(task: asyncio.Future) -> None:
        if inspect.getcoroutinestate(coro) == inspect.CORO_SUSPENDED:
            coro.close()

    return done


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
        if (  # once per message: plain tests, no tuple or generator
            not EAGER_SUPPORTED
            or timeout is not None
            or not asyncio.iscoroutine(first)
            or self.suspend_flow.is_set()
            or self._stopped.is_set()
            or self._crashed.is_set()
        ):
            return await super().wait_first(*coros, timeout=timeout)
        ctx = contextvars.copy_context()  # the callback's context variables stay its own, as in a task
        try:
            yielded = ctx.run(first.send, None)
        except StopIteration as stop:  # finished without waiting: nothing to race
            _close(coros[1:])
            AT_ONCE.inc()
            return WaitResults([first], [stop.value], False)
        except BaseException:
            _close(coros[1:])
            raise
        # suspended: the rest in one task, raced as before (mode's wait_first cancels it when a flag wins,
        # or when this call itself is cancelled)
        WAITED.inc()
        task = asyncio.get_running_loop().create_task(resume(first, yielded), context=ctx)
        task.add_done_callback(_close_unstarted(first))
        return await super().wait_first(task, *coros[1:])


class EagerConsumer(EagerHandoff, faust_aiokafka.Consumer):
    """Faust's aiokafka consumer whose per-message hand-off starts the callback eagerly."""


class EagerTransport(faust_aiokafka.Transport):
    """The aiokafka transport with ``EagerConsumer``."""

    Consumer = EagerConsumer
