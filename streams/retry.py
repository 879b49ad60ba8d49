"""How an agent runs a batch so that Faust never acks one that was not applied.

The agents' batches (``streams.batching.take_batches``) are acked only when the agent asks for the next
one, so an exception or a cancel that leaves the loop acks nothing (Faust's own ``take_events`` acks
in a ``finally``).  A batch is still run by ``run_batch``, which returns only once the batch is applied,
so that no error reaches Faust, whose handling of a crashed agent this code does not rely on:

- a **transient** error (a connection or timeout of Redis or Kafka, a retriable Kafka error, a cluster
  fail-over) is retried with back-off, for as long as it lasts;
- any other error is one the batch's own code could not pin on a user (those are dead-lettered or
  quarantined inside the batch): the worker **exits at once** with ``EXIT_FATAL``, before the exception
  can reach Faust, so no offset of the batch is committed and the partitions move to a healthy worker;
- a stop request (``BatchGate.drain``, hooked to Faust's ``on_before_shutdown``, which runs after the
  fetcher stopped and before the agents do) waits for the running batches to finish, up to
  ``FINISH_ON_STOP_S``; a batch that reaches an agent after that point is not started: once the other
  agents' running batches are done, the process exits without committing it (the next owner re-reads
  it; re-reading applied events is a no-op).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.exceptions as rx
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError

from streams import metrics
from streams.security import auth_failure

log = logging.getLogger("mirstream")
T = TypeVar("T")

EXIT_FATAL = 70  # EX_SOFTWARE
FINISH_ON_STOP_S = 30.0

#: Errors that go away by themselves: retried without limit.
TRANSIENT: tuple[type[BaseException], ...] = (
    rx.ConnectionError,
    rx.TimeoutError,
    rx.ClusterDownError,
    rx.TryAgainError,
    rx.ReadOnlyError,  # a replica promoted mid-call
    rx.SlotNotCoveredError,
    rx.OutOfMemoryError,  # maxmemory reached: writes resume once memory is freed
    KafkaConnectionError,
    KafkaTimeoutError,
    ConnectionError,  # the builtin: refused, reset, aborted
    asyncio.TimeoutError,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors that go away by themselves; refused credentials, permissions or certificates never
    do (``streams.security.auth_failure``), even when a client wraps them in a connection error."""
    if auth_failure(exc) is not None:
        return False
    if isinstance(exc, TRANSIENT):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


def fatal(agent: str, exc: BaseException) -> None:
    """Stops the process now, without Faust's clean shutdown (which would commit the acked batch)."""
    metrics.AGENT_ERRORS.labels(agent, type(exc).__name__).inc()
    refused = auth_failure(exc)
    if refused is not None:  # a configuration problem, not a bug: one line, no traceback
        log.critical("%s: %s; stopping this worker (exit %d)", agent, refused, EXIT_FATAL)
        exit_now(EXIT_FATAL)
    log.critical(
        "%s: unexpected %s: %s; stopping this worker without committing the batch (its partitions move to "
        "another worker, which re-reads the batch)",
        agent,
        type(exc).__name__,
        exc,
        exc_info=exc,
    )
    exit_now(EXIT_FATAL)


def exit_now(code: int) -> None:
    """Flushes the logs and leaves the process at once: no Faust shutdown, so no offset commit."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class BatchGate:
    """Counts the batches in flight, so a stop can wait for them and refuse new ones."""

    def __init__(self) -> None:
        self.running = 0
        self.stopping = False

    async def run(self, agent: str, step: Callable[[], Awaitable[T]]) -> T:
        if self.stopping:  # the batch was handed over after the stop drained: do not start it
            await self._idle(FINISH_ON_STOP_S)  # other agents' batches finish first
            log.warning("%s: stop requested; exiting without starting (or committing) a new batch", agent)
            exit_now(0)
        self.running += 1
        try:
            return await run_batch(agent, step)
        finally:
            self.running -= 1

    async def drain(self, timeout: float = FINISH_ON_STOP_S) -> None:
        """Waits for the batches in flight; from now on no new batch starts."""
        self.stopping = True
        if not await self._idle(timeout):
            fatal("stop", TimeoutError(f"{self.running} batches not finished {timeout:.0f}s after the stop"))

    async def _idle(self, timeout: float) -> bool:
        """Waits up to ``timeout`` for no batch to be running; False: some still are."""
        deadline = time.monotonic() + timeout
        while self.running:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


async def run_batch(agent: str, step: Callable[[], Awaitable[T]]) -> T:
    """Runs ``step`` until it succeeds; see the module docstring.  ``step`` must be idempotent."""
    task = asyncio.ensure_future(_retrying(agent, step))
    try:
        result = await asyncio.shield(task)
    except asyncio.CancelledError:
        deadline = time.monotonic() + FINISH_ON_STOP_S
        while not task.done():  # the batch finishes (or the process exits) before the cancel goes on
            if time.monotonic() > deadline:
                fatal(agent, TimeoutError(f"batch not finished {FINISH_ON_STOP_S:.0f}s after a cancel"))
            try:
                await asyncio.wait([task], timeout=max(0.0, deadline - time.monotonic()))
            except asyncio.CancelledError:
                continue
        raise
    metrics.LAST_PROGRESS.labels(agent).set(time.time())
    return result


async def _retrying(agent: str, step: Callable[[], Awaitable[T]]) -> T:
    delay = 0.1
    while True:
        try:
            return await step()
        except Exception as exc:
            if not is_transient(exc):
                fatal(agent, exc)
            metrics.AGENT_ERRORS.labels(agent, "transient").inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", agent, type(exc).__name__, exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
