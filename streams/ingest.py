"""What a scenario agent does with one batch: validate → item codes → coarse state → Redis, exactly once.

Delivery from Kafka is at-least-once.  Each user's state carries the highest offset applied per
(topic, partition) — the watermark — and the apply step is one compare-and-set Lua call that writes
the coarse state, the watermark and the history together.  A redelivered event is at or below the
watermark and is skipped, so replays and restarts change nothing.  Events whose item is not known yet
are parked in Redis (their offset still advances the watermark) and re-produced by the item agent once
the item arrives.  A parked event could reach the user twice (its re-produced copy, and the original
redelivered after a crash), so parking notes ``p:<origin>`` in the user's state and applying such an
event records ``o:<origin>``: whichever copy comes second is skipped.  A state built by another
checkpoint (another codebook or coarse model) is rebuilt in the same step (``streams.switch``).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
import orjson

from models.user_model import Checkpoint
from state.history import pack
from state.keys import Keys
from state.store import ApplyStep, StreamStore, UserRow
from streams import metrics
from streams.events import Event, Rejected, parse_event
from streams.settings import Settings
from streams.switch import Codebooks, built_elsewhere, rebuild_user

log = logging.getLogger(__name__)
MAX_CAS_RETRIES = 20
_CONFLICT = object()  # another writer changed the user between our read and our apply: re-read, retry


@dataclass(frozen=True)
class Message:
    """A raw Kafka message as the agents see it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float  # producer time, seconds


DeadLetter = Callable[[Message, str, str], Awaitable[None]]
Republish = Callable[[str, str, bytes], Awaitable[None]]  # scenario, user key, body


async def release_parked(store: StreamStore, republish: Republish, item_id: str) -> int:
    """Re-produces every event parked for ``item_id``, then drops them from the parking list.

    ``republish`` returns once Kafka acknowledged the message, so a crash in between leaves the events
    parked (the expiry timer releases them again); two releasers may both re-produce an event, and the
    ingest step applies it once (``o:<origin>``).
    """
    bodies = await store.parked(item_id)
    for body in bodies:
        event = orjson.loads(body)
        await republish(event["scenario"], str(event["user_id"]), body)
        log.info(
            "released parked event %s of user %s (item %s arrived)", event.get("event_id"), event["user_id"], item_id
        )
    if bodies:
        await store.drop_parked(item_id, len(bodies))
    return len(bodies)


@dataclass
class _Accepted:
    msg: Message
    event: Event
    origin: str  # "topic:partition:offset" of the first delivery
    replayed: bool  # re-produced from the parking list


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
        self.actions = ckpt.model.cfg.actions
        self.code_bytes = ckpt.codebook.cfg.bytes_per_item
        self.record_size = self.code_bytes + 10
        self.max_parked = 1000

    async def handle(self, scenario: str, batch: list[Message]) -> dict[int, dict[str, int]]:
        """Applies a batch; returns {partition: {user: seq}} of users whose vectors need refreshing."""
        t0 = time.perf_counter()
        await self.codebooks.publish()
        accepted = []
        for msg in batch:
            try:
                accepted.append(self._parse(scenario, msg))
            except Rejected as exc:
                await self.deadletter(msg, str(exc), "event")
        groups: dict[tuple[int, str], list[_Accepted]] = defaultdict(list)
        for a in accepted:
            groups[(a.msg.partition, a.event.user_id)].append(a)
        codes = await self.codebooks.item_codes(sorted({a.event.item_id for a in accepted})) if accepted else {}
        dirty: dict[int, dict[str, int]] = defaultdict(dict)
        parked_now: dict[str, set[str]] = defaultdict(set)
        pending = dict(groups)
        for _ in range(MAX_CAS_RETRIES):
            if not pending:
                break
            # One round trip reads every user, one model call folds them, one round trip applies them.
            # A user seen under two partitions (a producer that ignores the key) waits for the next round.
            this_round: dict[tuple[int, str], list[_Accepted]] = {}
            taken: set[str] = set()
            for key, items in pending.items():
                if key[1] not in taken:
                    this_round[key] = items
                    taken.add(key[1])
            results = await self._apply_round(scenario, this_round, codes, parked_now)
            for key, result in results.items():
                if result is not _CONFLICT:
                    del pending[key]
                    if result is not None:
                        dirty[key[0]][key[1]] = result
            metrics.CONFLICTS.inc(sum(r is _CONFLICT for r in results.values()))
        if pending:
            stuck = sorted(u for _, u in pending)[:5]
            raise RuntimeError(f"users {stuck}: {MAX_CAS_RETRIES} compare-and-set conflicts in a row")
        for partition, users in dirty.items():
            await self.store.mark_dirty(partition, users)
        metrics.BATCH.labels(f"events-{scenario}").observe(time.perf_counter() - t0)
        return dirty

    def _parse(self, scenario: str, msg: Message) -> _Accepted:
        event = parse_event(msg.value, scenario, self.settings.scenarios, self.actions, self.settings.max_message_bytes)
        if msg.key is not None and msg.key.decode(errors="replace") != event.user_id:
            raise Rejected(f"message key {msg.key!r} is not the user_id {event.user_id!r} (breaks partitioning)")
        if event.origin is None:
            return _Accepted(msg, event, f"{msg.topic}:{msg.partition}:{msg.offset}", replayed=False)
        return _Accepted(msg, event, event.origin, replayed=True)

    async def _apply_round(
        self,
        scenario: str,
        groups: dict[tuple[int, str], list[_Accepted]],
        codes: dict[str, bytes | None],
        parked_now: dict[str, set[str]],
    ) -> dict[tuple[int, str], object]:
        """Per (partition, user): the seq to refine, None (nothing to refine), or ``_CONFLICT`` (retry)."""
        marks = {key: Keys.watermark(items[0].msg.topic, key[0]) for key, items in groups.items()}
        wanted = {
            user: [marks[(p, user)], "refined_seq", *(f"{tag}:{a.origin}" for a in items for tag in ("o", "p"))]
            for (p, user), items in groups.items()
        }
        rows = await self.store.read_users(wanted)
        out: dict[tuple[int, str], object] = {}
        plans: dict[tuple[int, str], tuple[UserRow, list[_Accepted], dict[str, object]]] = {}
        for key, items in groups.items():
            user, row = key[1], rows[key[1]]
            seen = row.watermarks
            done = seen.get(marks[key], -1)
            fresh, origins = [], set()
            for a in items:  # a parked copy and its redelivered original can even share a batch
                if a.msg.offset > done and f"o:{a.origin}" not in seen and a.origin not in origins:
                    fresh.append(a)
                    origins.add(a.origin)
            metrics.DUPLICATES.labels(scenario).inc(len(items) - len(fresh))
            if not fresh:
                out[key] = row.seq if row.seq > seen.get("refined_seq", 0) else None  # re-mark after a crash
                continue
            applied = [a for a in fresh if codes.get(a.event.item_id) is not None]
            parked = [a for a in fresh if codes.get(a.event.item_id) is None and a.origin not in parked_now[user]]
            if parked:  # noted and parked before the watermark passes them: a crash re-parks, never loses
                await self.store.mark_parked(user, [a.origin for a in parked])
                for a in parked:
                    await self._park(a)
                    parked_now[user].add(a.origin)
            fields: dict[str, object] = {marks[key]: max(a.msg.offset for a in fresh)}
            for a in applied:  # an event that was ever parked may arrive twice: remember it was applied
                if a.replayed or f"p:{a.origin}" in seen or a.origin in parked_now[user]:
                    fields[f"o:{a.origin}"] = 1
                    fields[f"p:{a.origin}"] = ""
            if applied:
                fields["kts"] = max(a.msg.timestamp for a in applied)
            if row.state_id != self.ckpt.state_id:
                fields["gen"], fields["cb"] = self.ckpt.state_id, self.ckpt.codebook_id
            plans[key] = (row, applied, fields)
        if not plans:
            return out
        rebuilt = await self._rebuild({key[1]: row for key, (row, _, _) in plans.items()})
        folded = self._fold_many(
            [(rebuilt[u][0] if u in rebuilt else row.coarse, applied) for (_, u), (row, applied, _) in plans.items()],
            codes,
        )
        steps = {
            key[1]: ApplyStep(
                row.seq,
                len(applied),
                state,
                last_ts,
                records,
                self.record_size,
                self.settings.history_cap,
                fields,
                rebuilt[key[1]][1] if key[1] in rebuilt else b"",
            )
            for (key, (row, applied, fields)), (state, records, last_ts) in zip(plans.items(), folded, strict=True)
        }
        results = await self.store.apply_many(steps)
        for key, (_, applied, _) in plans.items():
            result = results[key[1]]
            if result is None:
                out[key] = _CONFLICT
                continue
            metrics.EVENTS.labels(scenario).inc(len(applied))
            new_seq, refined = result
            out[key] = new_seq if new_seq > refined else None
        return out

    async def _rebuild(self, rows: dict[str, UserRow]) -> dict[str, tuple[bytes, bytes]]:
        """Users whose state another checkpoint built → (coarse state, history) rebuilt for this one."""
        stale = [u for u, row in rows.items() if row.seq and built_elsewhere(self.ckpt, row.state_id)]
        if not stale:
            return {}
        out = {}
        for user, history in (await self.store.histories(stale)).items():
            source = await self.codebooks.get(rows[user].codebook or self.ckpt.codebook_id)
            state, records = rebuild_user(self.ckpt, source, history)
            out[user] = (state.tobytes(), records)
            n = len(records) // self.record_size
            log.info("rebuilt user %s for state %s from its %d stored events", user, self.ckpt.state_id, n)
        metrics.USERS_REBUILT.inc(len(out))
        return out

    def _fold_many(
        self, users: list[tuple[bytes | None, list[_Accepted]]], codes: dict[str, bytes | None]
    ) -> list[tuple[bytes, bytes, float]]:
        """Per user (coarse state, applied events) → (new state bytes, history records, newest ts)."""
        model = self.ckpt.model.coarse
        states = np.stack([np.frombuffer(c, dtype="<f8") if c else model.init_state() for c, _ in users])
        ordered = [sorted(applied, key=lambda a: (a.event.ts, a.msg.offset)) for _, applied in users]
        flat = [a for applied in ordered for a in applied]
        if flat:
            blob = b"".join(codes[a.event.item_id] for a in flat)  # type: ignore[misc]
            vecs = self.ckpt.codebook.from_bytes(blob, len(flat))
            scen = np.asarray([a.event.scenario for a in flat])
            act = np.asarray([a.event.action for a in flat])
            ts = np.asarray([a.event.ts for a in flat])
            owner = np.repeat(np.arange(len(users)), [len(applied) for applied in ordered])
            states = model.update_many(states, vecs, scen, act, ts, owner)
            raw_codes = np.frombuffer(blob, dtype=np.uint8).reshape(len(flat), self.code_bytes)
        out, start = [], 0
        for i, applied in enumerate(ordered):
            end = start + len(applied)
            if applied:
                records = pack(raw_codes[start:end], scen[start:end], act[start:end], ts[start:end])
                out.append((states[i].tobytes(), records, float(ts[start:end].max())))
            else:
                out.append((states[i].tobytes(), b"", 0.0))
            start = end
        return out

    async def _park(self, a: _Accepted) -> None:
        body = orjson.loads(a.msg.value)
        body["_origin"] = a.origin
        body["_parked_at"] = time.time()
        if await self.store.park(a.event.item_id, orjson.dumps(body), self.max_parked):
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
