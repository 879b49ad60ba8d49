"""The eager hand-off (``streams.consumer``) against its reference, mode's ``Service.wait_first``.

Each case runs the same callback through both on a real mode ``Service`` with a ``suspend_flow`` event,
as Faust's fetch loop calls it (``wait_first(callback(message), suspend_flow.wait())``), and compares
what the caller and the callback see: the result, the exception, what reached the queue, whether the
callback saw a cancel.
"""

from __future__ import annotations

import asyncio

import pytest
from mode import Service

from streams.consumer import EagerHandoff, resume


class Reference(Service):
    """Faust's consumer as far as the hand-off goes: a service with a ``suspend_flow`` event."""

    def __init__(self) -> None:
        super().__init__()
        self.suspend_flow = asyncio.Event()


class Eager(EagerHandoff, Reference):
    pass


KINDS = (Reference, Eager)


class Boom(Exception):
    pass


async def handoff(kind: type[Reference], make_callback, after=None):
    """``wait_first(callback, suspend_flow.wait())`` on a fresh service of ``kind``; ``after(service,
    log)`` runs beside it (to unblock the callback or raise the flag).  Returns (outcome, log)."""
    svc = kind()
    log: list = []
    beside = asyncio.ensure_future(after(svc, log)) if after else None
    try:
        res = await svc.wait_first(make_callback(log), svc.suspend_flow.wait())
        outcome = ("ok", res.results if not res.stopped else "stopped")
    except Boom as exc:
        outcome = ("raised", str(exc))
    if beside:
        await beside
    await asyncio.sleep(0.01)  # let a cancelled callback finish unwinding
    return outcome, log


async def put_into_full(log: list, queue: asyncio.Queue, item: str) -> None:
    """A put that waits for room; logs whether it was made or cancelled."""
    try:
        await queue.put(item)
        log.append("put")
    except asyncio.CancelledError:
        log.append("cancelled")
        raise


def both(make_callback, after=None):
    async def run():
        return [await handoff(k, make_callback, after) for k in KINDS]

    ref, eager = asyncio.run(run())
    return ref, eager


def test_returns_at_once_runs_in_the_callers_task():
    def make(log):
        async def cb():
            log.append(("task", asyncio.current_task()))
            return 7

        return cb()

    async def run():
        outs = []
        for kind in KINDS:
            me = asyncio.current_task()
            (outcome, log) = await handoff(kind, make)
            outs.append((outcome, log[0][1] is me))
        return outs

    (ref, ref_inline), (eager, eager_inline) = asyncio.run(run())
    assert ref == eager
    assert ref[1][0] == 7  # the winner's result comes first
    assert (ref_inline, eager_inline) == (False, True)  # the eager path made no task


def test_raises_at_once():
    def make(log):
        async def cb():
            raise Boom("at once")

        return cb()

    ref, eager = both(make)
    assert ref == eager == (("raised", "at once"), [])


def test_blocks_on_a_full_queue_then_delivers():
    q: dict[str, asyncio.Queue] = {}

    def make(log):
        async def cb():
            q["q"] = queue = asyncio.Queue(maxsize=1)
            queue.put_nowait("old")
            await queue.put("new")  # blocks until the reader below takes "old"
            log.append("put")
            return "delivered"

        return cb()

    async def reader(svc, log):
        await asyncio.sleep(0.02)
        log.append(q["q"].get_nowait())
        await asyncio.sleep(0.02)
        log.append(q["q"].get_nowait())

    ref, eager = both(make, reader)
    assert ref == eager
    assert ref[1] == ["old", "put", "new"]


def test_blocks_then_raises():
    def make(log):
        async def cb():
            await asyncio.sleep(0.01)
            raise Boom("after a wait")

        return cb()

    ref, eager = both(make)
    assert ref == eager == (("raised", "after a wait"), [])


def test_bare_yields_then_returns():
    def make(log):
        async def cb():
            for i in range(3):
                await asyncio.sleep(0)  # a bare yield each
                log.append(i)
            return "done"

        return cb()

    ref, eager = both(make)
    assert ref == eager
    assert ref[1] == [0, 1, 2]


def test_flag_raised_while_blocked_cancels_the_callback():
    def make(log):
        async def cb():
            queue: asyncio.Queue = asyncio.Queue(maxsize=1)
            queue.put_nowait("full")
            await put_into_full(log, queue, "never")
            return "x"

        return cb()

    async def raise_flag(svc, log):
        await asyncio.sleep(0.02)
        svc.suspend_flow.set()  # a rebalance stops the flow

    ref, eager = both(make, raise_flag)
    assert ref == eager
    assert ref[1] == ["cancelled"]


def test_flag_already_raised_takes_the_reference_path():
    def make(log):
        async def cb():
            log.append(asyncio.current_task())
            return 1

        return cb()

    async def run():
        svc = Eager()
        svc.suspend_flow.set()
        log: list = []
        await svc.wait_first(make(log), svc.suspend_flow.wait())
        return log[0] is asyncio.current_task()

    assert asyncio.run(run()) is False  # the callback ran in a task of its own, as mode's does


def test_caller_cancelled_while_blocked_cancels_the_callback():
    def make(log):
        async def cb():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                log.append("cancelled")
                raise

        return cb()

    async def run(kind):
        svc = kind()
        log: list = []
        caller = asyncio.ensure_future(svc.wait_first(make(log), svc.suspend_flow.wait()))
        await asyncio.sleep(0.02)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.01)
        return log, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    for kind in KINDS:
        log, left = asyncio.run(run(kind))
        assert log == ["cancelled"], kind
        assert left == [], kind


def test_resume_passes_a_future_failure_and_a_cancel_through():
    async def waits_on(fut):
        try:
            return await fut
        except asyncio.CancelledError:
            return "saw cancel"

    async def run():
        loop = asyncio.get_running_loop()
        failed = loop.create_future()
        coro = waits_on(failed)
        yielded = coro.send(None)
        assert yielded is failed
        failed.set_exception(Boom("future failed"))
        with pytest.raises(Boom, match="future failed"):
            await resume(coro, yielded)

        pending = loop.create_future()
        coro = waits_on(pending)
        task = asyncio.ensure_future(resume(coro, coro.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        return await task  # the coroutine caught the cancel and returned

    assert asyncio.run(run()) == "saw cancel"


def test_flag_raised_after_the_wait_ended_still_cancels_the_callback():
    """The race a Task gets right: the putter is woken (its future done) and the flag wins before the
    callback's task runs again; the cancel must reach the callback, not the put."""
    q: dict[str, asyncio.Queue] = {}

    def make(log):
        async def cb():
            q["q"] = queue = asyncio.Queue(maxsize=1)
            queue.put_nowait("old")
            await put_into_full(log, queue, "new")

        return cb()

    async def flag_then_room(svc, log):
        await asyncio.sleep(0.02)
        svc.suspend_flow.set()  # the flag's task wins the race at the next turns of the loop...
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        log.append(q["q"].get_nowait())  # ...and only then is there room for the blocked put
        await asyncio.sleep(0.02)
        log.append(list(q["q"]._queue))

    ref, eager = both(make, flag_then_room)
    assert ref == eager
    assert "put" not in ref[1] and ref[1][-1] == []  # nothing was put after the flag


def test_a_task_cancelled_before_it_started_closes_the_callback():
    async def run():
        queue: asyncio.Queue = asyncio.Queue(maxsize=1)
        queue.put_nowait("full")
        log: list = []

        async def cb():
            try:
                await queue.put("never")
            finally:
                log.append("closed")

        coro = cb()
        yielded = coro.send(None)  # suspended in put: one putter registered
        from streams.consumer import _close_unstarted

        task = asyncio.get_running_loop().create_task(resume(coro, yielded))
        task.add_done_callback(_close_unstarted(coro))
        task.cancel()  # before its first step
        with pytest.raises(asyncio.CancelledError):
            await task
        return log, len(queue._putters)

    assert asyncio.run(run()) == (["closed"], 0)


def test_context_variables_set_by_the_callback_stay_its_own():
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="fetch loop")

    def make(log):
        async def cb():
            var.set("callback")
            await asyncio.sleep(0)  # and the value survives the suspension
            log.append(var.get())

        return cb()

    async def run():
        out = []
        for kind in KINDS:
            outcome, log = await handoff(kind, make)
            out.append((outcome, log, var.get()))
        return out

    ref, eager = asyncio.run(run())
    assert ref == eager
    assert ref[1:] == (["callback"], "fetch loop")


def test_the_apps_consumer_is_eager_unless_turned_off():
    from faust.transport.drivers.aiokafka import Consumer

    from streams.consumer import EagerConsumer
    from streams.faust_app import make_faust_app
    from streams.settings import Settings

    app = make_faust_app(Settings(max_poll_records=700, stream_buffer=9000))
    assert app.transport.Consumer is EagerConsumer
    assert (app.conf.broker_max_poll_records, app.conf.stream_buffer_maxsize) == (700, 9000)
    plain = make_faust_app(Settings(eager_handoff=False, max_poll_records=0))
    assert plain.transport.Consumer is Consumer
    assert plain.conf.broker_max_poll_records is None
