"""What a scenario agent does with one batch: parse → item codes → plan (``streams.planner``) → Redis.

Delivery from Kafka is at-least-once; the effect on each user is exactly-once:

- every user's state carries the highest offset applied per (topic, partition), its *watermark*, and a
  redelivered event at or below it is skipped;
- a batch reads each user as one consistent snapshot (state + history, one atomic call), plans its writes
  with a pure function, and writes them as compare-and-set steps on the user's *version*, which every
  write bumps: a concurrent writer (another agent of this worker, a stale worker during a rebalance, a
  worker of another checkpoint) makes the step fail, and the user is re-read and re-planned;
- an event whose item is not known yet is *parked* in Redis (marked in the user's state first, its offset
  still advances the watermark) and re-produced once the item arrives; whichever of its two copies comes
  second is skipped (``o:``/``p:`` marks, ``state.users``);
- a user whose stored data cannot be used (``UserPlan.poison``) has its events dead-lettered with the
  reason; the rest of the batch is applied.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable

import orjson

from models.user_model import Checkpoint
from state import trend
from state.store import StreamStore
from streams import metrics
from streams.events import Message, Rejected, origin_signature, parse_event
from streams.planner import Accepted, PlanContext, UserPlan, plan
from streams.settings import Settings
from streams.switch import Codebooks

log = logging.getLogger(__name__)
CONFLICT_WARN_EVERY = 20  # conflicts in a row on one batch before each warning


DeadLetter = Callable[[Message, str, str], Awaitable[None]]
Republish = Callable[[str, str, bytes], Awaitable[None]]  # scenario, user key, body


def owner_partition(parked: dict) -> int:
    """The partition whose owner expires a parked event: that of its origin (``topic:partition:offset``)."""
    return int(parked["_origin"].rsplit(":", 2)[1])


async def release_parked(store: StreamStore, republish: Republish, item_id: str) -> int:
    """Re-produces every event parked for ``item_id``, then removes those (by value) from the list.

    ``republish`` returns once Kafka acknowledged the message, so a crash in between leaves the events
    parked (the expiry timer releases them again); two releasers may both re-produce an event, and the
    ingest step applies it once.
    """
    bodies = await store.parked(item_id)
    for body in bodies:
        event = orjson.loads(body)
        await republish(event["scenario"], str(event["user_id"]), body)
        log.info(
            "released parked event %s of user %s (item %s arrived)", event.get("event_id"), event["user_id"], item_id
        )
    await store.unpark(item_id, bodies)
    return len(bodies)


class Ingestor:
    def __init__(
        self,
        settings: Settings,
        ckpt: Checkpoint,
        store: StreamStore,
        codebooks: Codebooks,
        deadletter: DeadLetter,
        republish: Republish,
    ) -> None:
        self.settings = settings
        self.republish = republish
        self.ckpt = ckpt
        self.store = store
        self.codebooks = codebooks
        self.deadletter = deadletter
        self.scenarios = tuple(ckpt.model.cfg.scenarios)  # the checkpoint's ids are the stored ones
        self.actions = ckpt.model.cfg.actions
        self.max_parked = 1000
        self.origin_key: bytes | None = None  # signs re-produced parked events (read from Redis on first use)
        self.trend_tau_s = ckpt.model.trend_tau_s  # 0: the model scores no trend, nothing is counted
        self.limits = settings.limits

    async def handle(self, scenario: str, batch: list[Message]) -> dict[int, dict[str, int]]:
        """Applies a batch; returns {partition: {user: seq}} of users whose vectors need refreshing.
        Raises only what the caller must not ack the batch over (transient or unattributable errors)."""
        t0 = time.perf_counter()
        await self.codebooks.publish()
        if self.origin_key is None:
            self.origin_key = await self.store.origin_key()
        by_user: dict[str, list[Accepted]] = defaultdict(list)
        for msg in batch:
            try:
                a = self._parse(scenario, msg)
            except Rejected as exc:
                await self.deadletter(msg, str(exc), "event")
                continue
            by_user[a.event.user_id].append(a)
        codes = await self.codebooks.item_codes(sorted({a.event.item_id for v in by_user.values() for a in v}))
        dirty: dict[int, dict[str, int]] = defaultdict(dict)
        handled: set[str] = set()  # origins parked or dead-lettered by this batch
        pending, attempt = dict(by_user), 0
        while pending:
            conflicts = await self._round(scenario, pending, codes, handled, dirty, attempt == 0)
            pending = {u: pending[u] for u in conflicts}
            if pending:
                attempt += 1
                metrics.CONFLICTS.inc(len(pending))
                if attempt % CONFLICT_WARN_EVERY == 0:
                    log.warning("%d compare-and-set conflicts in a row on users %s", attempt, sorted(pending)[:5])
                await asyncio.sleep(min(0.001 * 2**attempt, 0.5))  # another writer is mid-step: let it finish
        for partition, users in dirty.items() if self.settings.refine else ():  # nobody would drain them
            await self.store.mark_dirty(partition, users)
        metrics.BATCH.labels(f"events-{scenario}").observe(time.perf_counter() - t0)
        return dirty

    def _parse(self, scenario: str, msg: Message) -> Accepted:
        event = parse_event(msg.value, scenario, self.scenarios, self.actions, self.limits, self.origin_key)
        if msg.key is None:
            raise Rejected(f"message has no key (the key must be the user_id {event.user_id!r}: it partitions users)")
        if msg.key.decode(errors="replace") != event.user_id:
            raise Rejected(f"message key {msg.key!r} is not the user_id {event.user_id!r} (breaks partitioning)")
        own = f"{msg.topic}:{msg.partition}:{msg.offset}"
        origin, replayed = (own, False) if event.origin is None else (event.origin, True)
        return Accepted(event, msg, origin, replayed)

    async def _round(
        self,
        scenario: str,
        pending: dict[str, list[Accepted]],
        codes: dict[str, bytes | None],
        handled: set[str],
        dirty: dict[int, dict[str, int]],
        first: bool,
    ) -> set[str]:
        """Read → plan → write for every pending user; returns the users that conflicted (retry them)."""
        rows = await self.store.read_users(
            {u: (sorted({a.mark for a in batch}), [a.origin for a in batch]) for u, batch in pending.items()}
        )
        books = await self.codebooks.loadable({r.codebook for r in rows.values() if r.codebook})
        plans = plan(rows, pending, codes, PlanContext(self.ckpt, books, self.settings.history_cap), handled)
        conflicts: set[str] = set()
        if first:  # a re-plan sees the same duplicates again
            metrics.DUPLICATES.labels(scenario).inc(sum(p.duplicates for p in plans.values()))
        for p in plans.values():
            if p.remark_dirty:
                dirty[pending[p.user][-1].partition][p.user] = rows[p.user].seq
            if p.poison:
                await self._dead(p, handled)
        if first and self.trend_tau_s:
            await self._count_trend(plans)
        marking = {u: (rows[u], p.mark) for u, p in plans.items() if p.mark and p.update is not None}
        for user, ok in (await self.store.mark_parked(marking)).items() if marking else ():
            if not ok:
                conflicts.add(user)
        for p in plans.values():
            if p.update is not None and p.user not in conflicts:
                for a in p.park:
                    await self._park(a, handled)
        updates = {u: p.update for u, p in plans.items() if p.update is not None and u not in conflicts}
        applied = 0
        for user, result in (await self.store.apply_many(updates)).items() if updates else ():
            if result is None:
                conflicts.add(user)
                continue
            p = plans[user]
            applied += len(p.applied)
            if p.rebuilt:
                metrics.USERS_REBUILT.inc()
                log.info("rebuilt user %s for state %s from its stored events", user, self.ckpt.state_id)
            if result.seq > result.refined_seq:
                dirty[pending[user][-1].partition][user] = result.seq
        metrics.EVENTS.labels(scenario).inc(applied)
        return conflicts

    async def _count_trend(self, plans: dict[str, UserPlan]) -> None:
        """Counts the events the first plan applies in their items' trend, before any user write: a crash
        in between replays the batch, the same events are planned again and the count skips their offsets
        (``state.trend``); a re-plan after a conflict changes no item's events, so one call per batch does."""
        events: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for p in plans.values():
            if p.update is not None:
                for a in p.applied:
                    events[(a.event.item_id, trend.mark(a.topic, a.partition))].append((a.offset, a.event.ts))
        if events:
            await self.store.add_trend(events, self.trend_tau_s)

    async def _dead(self, p: UserPlan, handled: set[str]) -> None:
        metrics.AGENT_ERRORS.labels("ingest", "poison_user").inc()
        log.error("dead-lettering %d events: %s", len(p.dead), p.poison)
        for a in p.dead:
            await self.deadletter(a.msg, str(p.poison), "event")
            handled.add(a.origin)

    async def _park(self, a: Accepted, handled: set[str]) -> None:
        body = orjson.loads(a.msg.value)
        body["_origin"] = a.origin
        body["_sig"] = origin_signature(self.origin_key or b"", a.origin, a.event.event_id, a.event.user_id)
        body["_parked_at"] = time.time()
        if await self.store.park(a.event.item_id, orjson.dumps(body), self.max_parked):
            handled.add(a.origin)
            metrics.PARKED.inc()
            log.info(
                "parked event %s of user %s: item %s not known yet", a.event.event_id, a.event.user_id, a.event.item_id
            )
            # The item may have been stored between our look-up and the park, after the item agent had
            # already released its (then empty) parking list: look again and release it ourselves.
            if (await self.codebooks.item_codes([a.event.item_id]))[a.event.item_id] is not None:
                await release_parked(self.store, self.republish, a.event.item_id)
        else:
            await self.deadletter(a.msg, f"unknown item {a.event.item_id!r} and its parking list is full", "event")
            handled.add(a.origin)
