"""Redis access for the workers (async) and for downstream services (sync and async readers).

The workers' writes go through the Lua scripts in ``state.scripts``; this module holds no model code:
callers pass bytes and numbers in, and get bytes and numbers out.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass

import numpy as np
import orjson
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import RedisCluster

from state import scripts, trend, users, wire
from state.keys import Keys
from state.users import UserRow


@dataclass(frozen=True)
class RedisTLS:
    """Files for ``rediss://`` connections (PEM); empty strings: the system's trust store, no client cert."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""

    def kwargs(self) -> dict[str, str]:
        out = {"ssl_ca_certs": self.ca_file, "ssl_certfile": self.cert_file, "ssl_keyfile": self.key_file}
        return {k: v for k, v in out.items() if v}


def _split_url(url: str, tls: RedisTLS | None) -> tuple[bool, str, dict[str, str]]:
    """(cluster?, the URL redis-py parses, extra keyword arguments) for the URL schemes this project takes:
    ``redis://`` and ``rediss://`` (TLS) for one server, ``redis+cluster://`` and ``rediss+cluster://``
    for Redis Cluster; a password rides in the URL (``rediss://user:password@host:port/0``)."""
    cluster = False
    for scheme in ("redis", "rediss"):
        if url.startswith(f"{scheme}+cluster://"):
            cluster, url = True, f"{scheme}://" + url.removeprefix(f"{scheme}+cluster://")
    kwargs = tls.kwargs() if tls is not None and url.startswith("rediss://") else {}
    return cluster, url, kwargs


def connect_async(url: str, tls: RedisTLS | None = None) -> aioredis.Redis:
    """An asyncio client for ``url`` (see ``_split_url`` for the schemes); ``tls`` for ``rediss`` URLs."""
    cluster, url, kwargs = _split_url(url, tls)
    if cluster:  # its nodes' connection class is fixed by redis-py: packed in Python
        return AsyncRedisCluster.from_url(url, **kwargs)
    client = aioredis.from_url(url, **kwargs)
    pool = client.connection_pool
    pool.connection_class = wire.packed(pool.connection_class)  # plain or TLS, as the URL chose
    return client


def connect_sync(url: str, tls: RedisTLS | None = None) -> redis.Redis:
    """A blocking client for ``url`` (see ``_split_url`` for the schemes); ``tls`` for ``rediss`` URLs."""
    cluster, url, kwargs = _split_url(url, tls)
    if cluster:
        return RedisCluster.from_url(url, **kwargs)
    return redis.Redis.from_url(url, **kwargs)


#: Entities per bulk script call (``scripts.per_entity``): bounds how long one call holds the server.
BULK_MAX = 512
Call = tuple[list[str], list]  # one entity's (KEYS, ARGV) of a ``scripts.per_entity`` script


class StreamStore:
    """The workers' async view of Redis."""

    def __init__(self, client: aioredis.Redis, prefix: str, user_ttl_s: float = 0) -> None:
        self.r = client
        self.keys = Keys(prefix)
        #: Idle users' keys expire this long after their last write (0: never).  Set it longer than the
        #: topics' retention, so no redelivered event can outlive the watermarks that would skip it.
        self.user_ttl_s = int(user_ttl_s)
        self._mark = client.register_script(scripts.MARK_DIRTY)
        self._dirty = client.register_script(scripts.DIRTY_USERS)
        self._park = client.register_script(scripts.PARK)
        self._unpark = client.register_script(scripts.UNPARK)
        self._slot = client.keyslot if isinstance(client, AsyncRedisCluster) else None

    def _bulk(self, pipe: aioredis.client.Pipeline, script: str, calls: list[Call]) -> list[list[int]]:
        """Queues ``script`` (a ``scripts.per_entity`` script) for every call: one script call per cluster
        slot (one for all on a single server), at most ``BULK_MAX`` entities each; returns, per queued
        command, the indices of its calls (``_unbulk`` puts the replies back in the calls' order)."""
        groups: dict[int, list[int]] = {}
        for i, (keys, _) in enumerate(calls):
            groups.setdefault(self._slot(keys[0]) if self._slot else 0, []).append(i)
        order: list[list[int]] = []
        for members in groups.values():
            for at in range(0, len(members), BULK_MAX):
                chunk = members[at : at + BULK_MAX]
                flat_keys: list[str] = []
                flat_args: list = []
                for i in chunk:
                    keys, args = calls[i]
                    flat_keys += keys
                    flat_args.append(len(args))
                    flat_args += args
                # EVAL, not EVALSHA: a cluster pipeline does not load scripts on the nodes it reaches.
                pipe.eval(script, len(flat_keys), *flat_keys, *flat_args)
                order.append(chunk)
        return order

    @staticmethod
    def _unbulk(order: list[list[int]], replies: list) -> list:
        out: list = [None] * sum(len(chunk) for chunk in order)
        for chunk, reply in zip(order, replies, strict=True):
            for i, one in zip(chunk, reply, strict=True):
                out[i] = one
        return out

    async def _run_bulk(self, script: str, calls: list[Call]) -> list:
        """Runs ``script`` for every call in one round trip; each call's reply, in order."""
        if not calls:
            return []
        pipe = self.r.pipeline(transaction=False)
        order = self._bulk(pipe, script, calls)
        return self._unbulk(order, await pipe.execute())

    # ---------------------------------------------------------------- items
    async def item_codes(self, items: list[str], codebook: str) -> dict[str, bytes | None]:
        """Each item's codes in one codebook (None: unknown item, or only coded in another codebook)."""
        field = Keys.item_code(codebook)
        got = await self._run_bulk(scripts.ITEM_CODES, [([self.keys.item(it)], [field]) for it in items])
        return dict(zip(items, got, strict=True))

    async def item_codes_any(self, items: list[str]) -> dict[str, dict[str, bytes]]:
        """Each item's codes in every codebook that has them: {item: {codebook id: codes}}."""
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hgetall(self.keys.item(it))
        out = {}
        for it, raw in zip(items, await pipe.execute(), strict=True):
            out[it] = {f.decode()[5:]: v for f, v in raw.items() if f.startswith(b"code:")}
        return out

    async def add_item_codes(self, codes: dict[str, bytes], codebook: str) -> dict[str, bytes]:
        """Adds codes in ``codebook`` to items that have none in it yet (a re-encode never overwrites
        codes the item agent made from the item's own vector); returns the codes stored afterwards."""
        pipe = self.r.pipeline(transaction=False)
        for it, code in codes.items():
            pipe.hsetnx(self.keys.item(it), Keys.item_code(codebook), code)
            pipe.hget(self.keys.item(it), Keys.item_code(codebook))
        stored = (await pipe.execute())[1::2]
        return {it: got if got is not None else code for (it, code), got in zip(codes.items(), stored, strict=True)}

    async def put_items(self, items: list[tuple[str, bytes, bytes, str, str]], codebook: str) -> None:
        """Stores (item id, code, retrieval vector, version, title) rows, one round trip for all; codes of
        other codebooks are dropped (they encoded the item's previous content)."""
        pipe = self.r.pipeline(transaction=False)
        now = repr(time.time())
        for item, code, retrieval, version, title in items:
            fields = [Keys.item_code(codebook), code, "ret", retrieval, "version", version, "updated_at", now]
            fields += ["title", title[:120]]
            pipe.eval(scripts.PUT_ITEM, 1, self.keys.item(item), *fields)
            pipe.sadd(self.keys.items, item)
        await pipe.execute()

    async def origin_key(self) -> bytes:
        """The deployment's key for signing re-produced parked events: made once (SET NX), shared by every
        worker through Redis; a producer without Redis access cannot forge a parked copy."""
        await self.r.set(self.keys.origin_key, secrets.token_bytes(32), nx=True)
        return await self.r.get(self.keys.origin_key)

    async def set_trend_tau(self, tau_s: float) -> None:
        """Records the trend counts' τ, so readers that build an index can read the counts."""
        await self.r.set(self.keys.trend, repr(float(tau_s)))

    async def add_trend(self, events: dict[tuple[str, str], list[tuple[int, float]]], tau_s: float) -> int:
        """Counts events in their items' trend (``state.trend``): {(item, mark field): [(offset, ts)...]}, one
        atomic step per item and (topic, partition), one round trip for all; returns how many were new."""
        calls: list[Call] = []
        for (item, field), offsets in events.items():
            args = [repr(float(tau_s)), field]
            for offset, ts in sorted(offsets):
                args += [offset, repr(float(ts))]
            calls.append(([self.keys.item(item)], args))
        return int(sum(await self._run_bulk(scripts.TREND_ADDS, calls)))

    async def scan_items(self, cursor: int, count: int) -> tuple[int, list[str]]:
        """One step of a scan over every known item id (0 starts and ends a scan)."""
        cursor, got = await self.r.sscan(self.keys.items, cursor, count=count)
        return int(cursor), [m.decode() for m in got]

    # ---------------------------------------------------------------- codebooks
    async def register_codebook(self, codebook: str, blob: bytes) -> bool:
        """Publishes a codebook so any worker can decode codes made with it; True when it was new."""
        return bool(await self.r.set(self.keys.codebook(codebook), blob, nx=True))

    async def codebook_blob(self, codebook: str) -> bytes | None:
        return await self.r.get(self.keys.codebook(codebook))

    async def recoded(self, codebook: str) -> bool:
        return bool(await self.r.exists(self.keys.codebook_recoded(codebook)))

    async def mark_recoded(self, codebook: str, done: bool = True) -> None:
        """Notes that every item has a code of ``codebook`` (``done=False``: that it must be checked again)."""
        if done:
            await self.r.set(self.keys.codebook_recoded(codebook), 1)
        else:
            await self.r.delete(self.keys.codebook_recoded(codebook))

    async def item_count(self) -> int:
        return int(await self.r.scard(self.keys.items))

    async def parked_counts(self, items: list[str]) -> dict[str, int]:
        """How many events wait for each item, one round trip for all."""
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.llen(self.keys.parked(it))
        return dict(zip(items, (int(n) for n in await pipe.execute()), strict=True))

    async def park(self, item: str, raw: bytes, max_parked: int) -> bool:
        """Parks an event until its item arrives; False when the item's parking list is full (checked in
        the same atomic step as the push).  Indexed before the push (a crash in between leaves an index
        entry the expiry cleans up, never an unindexed list) and after it (a releaser that emptied the list
        meanwhile may have dropped the first entry)."""
        await self.r.zadd(self.keys.parked_index, {item: time.time()}, nx=True)
        if not await self._park(keys=[self.keys.parked(item)], args=[max_parked, raw]):
            await self.forget_if_empty(item)
            return False
        await self.r.zadd(self.keys.parked_index, {item: time.time()}, nx=True)
        return True

    async def parked(self, item: str) -> list[bytes]:
        return list(await self.r.lrange(self.keys.parked(item), 0, -1))

    async def unpark(self, item: str, bodies: list[bytes]) -> int:
        """Removes these parked events (by value: once re-produced or dead-lettered); how many were still
        there.  An item whose list is empty leaves the index."""
        removed = 0
        if bodies:
            removed, _ = await self._unpark(keys=[self.keys.parked(item)], args=bodies)
        await self.forget_if_empty(item)
        return int(removed)

    async def forget_if_empty(self, item: str) -> None:
        """Drops an item from the parking index when its list is empty (re-indexed if a parker pushed meanwhile)."""
        if await self.r.llen(self.keys.parked(item)) == 0:
            await self.r.zrem(self.keys.parked_index, item)
            if await self.r.llen(self.keys.parked(item)):
                await self.r.zadd(self.keys.parked_index, {item: time.time()}, nx=True)

    async def parked_items(self, limit: int) -> list[tuple[str, float]]:
        """Items with parked events, oldest first, with the time their first event was parked."""
        got = await self.r.zrange(self.keys.parked_index, 0, limit - 1, withscores=True)
        return [(m.decode(), float(s)) for m, s in got]

    # ---------------------------------------------------------------- users: ingest
    async def read_users(self, wanted: dict[str, tuple[list[str], list[str]]]) -> dict[str, UserRow]:
        """Per user (watermark fields, event origins) → one consistent snapshot of its state and history
        (one atomic step per user, one round trip and one script call per cluster slot for all)."""
        calls: list[Call] = [
            (self.keys.user_row(user), users.read_args(marks, origins)) for user, (marks, origins) in wanted.items()
        ]
        replies = await self._run_bulk(scripts.READ_USERS, calls)
        return {
            user: users.parse_row(user, raw, marks, origins)
            for (user, (marks, origins)), raw in zip(wanted.items(), replies, strict=True)
        }

    async def mark_parked(self, marks: dict[str, tuple[UserRow, tuple[str, ...]]]) -> dict[str, bool]:
        """Per user (the row its plan read, origins about to be parked): notes them as parked, a versioned
        write; False where the user changed since the read (re-read, re-plan)."""
        calls: list[Call] = [
            ([self.keys.user_state(user)], [row.version, row.state_id or "", *(users.parked_mark(o) for o in origins)])
            for user, (row, origins) in marks.items()
        ]
        return {
            user: int(v) >= 0 for user, v in zip(marks, await self._run_bulk(scripts.MARKS_PARKED, calls), strict=True)
        }

    async def apply_many(self, updates: dict[str, users.UserUpdate]) -> dict[str, users.Applied | None]:
        """Applies each user's planned update, each an atomic step of its own (one round trip, one script
        call per cluster slot for all); None where the user changed since the plan read it (re-read,
        re-plan)."""
        pipe = self.r.pipeline(transaction=False)
        calls: list[Call] = [(self.keys.user_row(user), update.args()) for user, update in updates.items()]
        order = self._bulk(pipe, scripts.APPLY_USERS, calls)
        if self.user_ttl_s:  # idempotent; a crash before it leaves the keys without TTL until the next write
            for keys, _ in calls:  # the vectors take the state's TTL when written (WRITE_VECTORS)
                for key in keys:
                    pipe.expire(key, self.user_ttl_s)
        out: dict[str, users.Applied | None] = {}
        replies = self._unbulk(order, (await pipe.execute())[: len(order)])
        for user, reply in zip(updates, replies, strict=True):
            out[user] = None if int(reply[0]) == -1 else users.Applied(int(reply[0]), int(reply[2]), int(reply[1]))
        return out

    def _dirty_keys(self, partition: int) -> list[str]:
        return [self.keys.dirty(partition), self.keys.dirty_seq(partition)]

    async def mark_dirty(self, partition: int, users: dict[str, int]) -> None:
        """Queues users for refinement up to ``seq``; a user already queued keeps its place."""
        if users:
            args: list = [int(time.time() * 1000)]
            for user, seq in users.items():
                args += [user, seq]
            await self._mark(keys=self._dirty_keys(partition), args=args)

    # ---------------------------------------------------------------- users: refinement
    async def dirty_users(self, partition: int, limit: int) -> list[tuple[str, int]]:
        """The partition's ``limit`` longest-waiting dirty users and the seq each awaits."""
        got = await self._dirty(keys=self._dirty_keys(partition), args=[limit])
        return [(got[i].decode(), int(got[i + 1])) for i in range(0, len(got), 2)]

    async def read_for_refine(self, user_ids: list[str]) -> dict[str, UserRow]:
        """Each user's state and history, one consistent snapshot per user."""
        return await self.read_users({u: ([], []) for u in user_ids})

    async def write_vectors(
        self,
        user: str,
        seq: int,
        version: str,
        event_ts: float,
        produced_at: float,
        vectors: dict[str, np.ndarray],
        version_ttl_s: float = 0,
    ) -> bool:
        """Latest vectors (unless newer are there) and this version's copy; True when the latest was written."""
        (written,) = await self.write_vectors_many(
            [(user, seq, event_ts, produced_at, vectors)], version, version_ttl_s
        )
        return written

    async def dirty_count(self, partitions: range) -> int:
        """Users waiting for refinement in these partitions (the refinement queue's depth)."""
        pipe = self.r.pipeline(transaction=False)
        for p in partitions:
            pipe.zcard(self.keys.dirty(p))
        return sum(int(n) for n in await pipe.execute())

    async def write_vectors_many(
        self,
        rows: list[tuple[str, int, float, float, dict[str, np.ndarray]]],
        version: str,
        version_ttl_s: float = 0,
    ) -> list[bool]:
        """``write_vectors`` for many (user, seq, event_ts, produced_at, vectors) in one round trip."""
        if not rows:
            return []
        now = repr(time.time())
        calls: list[Call] = []
        for user, seq, event_ts, produced_at, vectors in rows:
            k, d = next(iter(vectors.values())).shape
            args: list = [seq, version, now, repr(float(event_ts)), repr(float(produced_at)), k, d]
            args.append(int(version_ttl_s))
            for scenario, v in vectors.items():
                args += [f"vec:{scenario}", encode_vectors(v)]
            keys = [self.keys.user_vectors(user), self.keys.user_state(user), self.keys.user_vectors_at(user, version)]
            calls.append((keys, args))
        return [bool(x) for x in await self._run_bulk(scripts.WRITE_VECTORS_MANY, calls)]

    # ---------------------------------------------------------------- batch backfill
    async def backfill_done(self, run: str) -> set[int]:
        return {int(m) for m in await self.r.smembers(self.keys.backfill(run))}

    async def mark_backfill_done(self, run: str, bucket: int) -> None:
        await self.r.sadd(self.keys.backfill(run), bucket)
        await self.r.expire(self.keys.backfill(run), 7 * 86400)

    async def clear_dirty(self, partition: int, user: str, seq: int) -> None:
        await self.clear_dirty_many([(partition, user, seq)])

    async def clear_dirty_many(self, done: list[tuple[int, str, int]]) -> None:
        """``clear_dirty`` for many (partition, user, seq) in one round trip."""
        if not done:
            return
        await self._run_bulk(scripts.CLEAR_DIRTIES, [(self._dirty_keys(p), [user, seq]) for p, user, seq in done])

    # ---------------------------------------------------------------- users: quarantine
    async def quarantine(self, user: str, partition: int, seq: int, reason: str) -> None:
        """Sets a user aside whose refinement failed on its own data (listed with the reason)."""
        entry = orjson.dumps({"partition": partition, "seq": seq, "reason": reason[:500], "at": time.time()})
        await self.r.hset(self.keys.quarantine, user, entry)

    async def unquarantine(self, user_ids: list[str]) -> None:
        """Users refined fine again leave the quarantine."""
        if user_ids:
            await self.r.hdel(self.keys.quarantine, *user_ids)

    async def quarantined(self) -> dict[str, dict]:
        return {u.decode(): orjson.loads(v) for u, v in (await self.r.hgetall(self.keys.quarantine)).items()}

    async def quarantined_count(self) -> int:
        return int(await self.r.hlen(self.keys.quarantine))

    async def retry_quarantined(self) -> int:
        """Marks every quarantined user dirty again (after a fix); how many."""
        entries = await self.quarantined()
        for user, entry in entries.items():
            await self.mark_dirty(int(entry["partition"]), {user: int(entry["seq"])})
        return len(entries)

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def close(self) -> None:
        await self.r.aclose()


# --------------------------------------------------------------------------- readers for services


@dataclass(frozen=True)
class Interests:
    """A user's refined vectors: (K, d) per scenario, and when/what produced them."""

    user: str
    vectors: dict[str, np.ndarray]
    version: str
    seq: int
    updated_at: float
    event_ts: float  # time of the newest event reflected
    produced_at: float  # when that event reached Kafka; updated_at - produced_at is the freshness

    def matrix(self, scenario: str | None = None) -> np.ndarray:
        """(K, d) for one scenario, or all scenarios stacked (S·K, d) when ``scenario`` is None."""
        if scenario is not None:
            if scenario not in self.vectors:
                raise KeyError(
                    f"user {self.user} has no vectors for scenario {scenario!r} (has {sorted(self.vectors)})"
                )
            return self.vectors[scenario]
        return np.concatenate([self.vectors[s] for s in sorted(self.vectors)])

    def to_json(self) -> dict:
        return {
            "user_id": self.user,
            "version": self.version,
            "seq": self.seq,
            "updated_at": self.updated_at,
            "event_ts": self.event_ts,
            "freshness_s": self.updated_at - self.produced_at,
            "vectors": {s: v.tolist() for s, v in self.vectors.items()},
        }


def encode_vectors(v: np.ndarray) -> bytes:
    """(K, d) vectors as stored: float16, half of float32's bytes (README: the retrieval loss measured)."""
    return np.ascontiguousarray(v, dtype="<f2").tobytes()


def decode_vectors(raw: bytes, k: int, d: int) -> np.ndarray:
    """Stored (K, d) vectors → float32: float16 as written now, or float32 as written before."""
    if len(raw) == 2 * k * d:
        return np.frombuffer(raw, dtype="<f2").astype(np.float32).reshape(k, d)
    if len(raw) == 4 * k * d:
        return np.frombuffer(raw, dtype="<f4").reshape(k, d)
    raise ValueError(f"stored vectors of {len(raw)} bytes are neither float16 nor float32 of {k}×{d}")


def parse_interests(user: str, raw: dict[bytes, bytes] | list[bytes]) -> Interests | None:
    if not raw:
        return None
    if isinstance(raw, list):  # a script's HGETALL reply: field, value, field, value...
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    k, d = int(raw[b"k"]), int(raw[b"d"])
    vectors = {f.decode()[4:]: decode_vectors(v, k, d) for f, v in raw.items() if f.startswith(b"vec:")}
    return Interests(
        user,
        vectors,
        raw[b"version"].decode(),
        int(raw[b"seq"]),
        float(raw[b"updated_at"]),
        float(raw[b"event_ts"]),
        float(raw[b"produced_at"]),
    )


def user_memory(client: redis.Redis, prefix: str, user: str, version: str | None = None) -> dict[str, int]:
    """Redis ``MEMORY USAGE`` of each of one user's keys (with ``version``: that model version's copy of the
    vectors too), bytes, 0 for a missing key.  Exact (every field counted): Redis's default samples only
    five fields of a large hash and misses the big ones."""
    keys = Keys(prefix)
    named = {
        "state": keys.user_state(user),
        "coarse": keys.user_coarse(user),
        "history": keys.user_history(user),
        "vectors": keys.user_vectors(user),
    }
    if version is not None:
        named["vectors_of_version"] = keys.user_vectors_at(user, version)
    return {name: int(client.memory_usage(key, samples=0) or 0) for name, key in named.items()}


def drop_prefix(client: redis.Redis, prefix: str, chunk: int = 1000) -> int:
    """Deletes every key of ``prefix`` (a benchmark run's, when it ends); returns how many.  One key per
    ``UNLINK`` in a pipeline, so it works on Redis Cluster, where a key's slot is its own."""
    dropped = 0
    pipe = client.pipeline(transaction=False)
    for key in client.scan_iter(match=Keys(prefix).pattern(), count=chunk):
        pipe.unlink(key)
        dropped += 1
        if dropped % chunk == 0:
            pipe.execute()
    pipe.execute()
    return dropped


class InterestReader:
    """Synchronous lookups for services: ``get_user_interests(user, scenario) -> (K, d)`` + metadata."""

    def __init__(self, redis_url: str, prefix: str = "mir", tls: RedisTLS | None = None) -> None:
        self.r = connect_sync(redis_url, tls)
        self.keys = Keys(prefix)

    def interests(self, user: str, version: str | None = None) -> Interests | None:
        """The latest vectors, or those of one model version (kept ``version_ttl_s`` after they stop being
        the latest)."""
        if version is None:
            return parse_interests(user, self.r.hgetall(self.keys.user_vectors(user)))
        keys = [self.keys.user_vectors(user), self.keys.user_vectors_at(user, version)]
        return parse_interests(user, self.r.eval(scripts.READ_VECTORS_OF, 2, *keys, version))

    def get_user_interests(
        self, user: str, scenario: str | None = None, version: str | None = None
    ) -> tuple[np.ndarray, Interests]:
        found = self.interests(user, version)
        if found is None:
            at = "" if version is None else f" of model version {version!r}"
            raise KeyError(f"no interest vectors{at} for user {user!r} yet")
        return found.matrix(scenario), found

    def item_vectors(self) -> tuple[list[str], np.ndarray]:
        """Every known item's retrieval vector, for building a faiss index."""
        ids = sorted(m.decode() for m in self.r.smembers(self.keys.items))
        pipe = self.r.pipeline(transaction=False)
        for it in ids:
            pipe.hget(self.keys.item(it), "ret")
        vecs = [np.frombuffer(v, dtype="<f4") for v in pipe.execute()]
        return ids, (np.stack(vecs) if vecs else np.zeros((0, 0), np.float32))

    def trend_tau(self) -> float | None:
        """τ (seconds) of the trend counts, or None when no worker with a trend model has run."""
        raw = self.r.get(self.keys.trend)
        return None if raw is None else float(raw)

    def item_trend(self, items: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each item's (decayed count, time of its newest counted event); (0, 0) for an uncounted item."""
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hmget(self.keys.item(it), trend.COUNT, trend.TIME)
        rows = [(float(c or 0.0), float(t or 0.0)) for c, t in pipe.execute()]
        arr = np.asarray(rows, np.float64).reshape(-1, 2)
        return arr[:, 0], arr[:, 1]

    def seqs(self, users: list[str], applied: bool = False) -> list[int | None]:
        """Each user's ``seq`` (events reflected) of its vectors, or with ``applied`` of its state (events
        folded in, refined or not); None for a user not seen yet."""
        pipe = self.r.pipeline(transaction=False)
        for u in users:
            pipe.hget(self.keys.user_state(u) if applied else self.keys.user_vectors(u), "seq")
        return [None if s is None else int(s) for s in pipe.execute()]

    def oldest_dirty_wait_s(self, partitions: int) -> float:
        """Seconds the longest-waiting dirty user of these partitions has waited (0: nobody waits)."""
        firsts = [self.r.zrange(self.keys.dirty(p), 0, 0, withscores=True) for p in range(partitions)]
        oldest = min((got[0][1] for got in firsts if got), default=None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest / 1000)

    def item_count(self) -> int:
        """How many items are known (a cheap check for a stale index)."""
        return int(self.r.scard(self.keys.items))

    def item_titles(self, items: list[str]) -> list[str]:
        """Each item's title ("" when it has none), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hget(self.keys.item(it), "title")
        return [(t or b"").decode() for t in pipe.execute()]


@dataclass(frozen=True)
class UserStatus:
    """What a user's state hash says about it (for the pages): events applied, newest times, its codebook."""

    seq: int
    last_ts: float  # newest event time applied
    kts: float  # newest Kafka timestamp applied
    codebook: str | None  # codebook of the stored history
    state_id: str | None  # checkpoint state that built the coarse state
    coarse: bytes | None


class AsyncInterestReader:
    """The same lookups for asyncio services, and what the worker's pages show (``streams.web``)."""

    def __init__(self, redis_url: str, prefix: str = "mir", tls: RedisTLS | None = None) -> None:
        self.r = connect_async(redis_url, tls)
        self.keys = Keys(prefix)

    async def interests(self, user: str, version: str | None = None) -> Interests | None:
        if version is None:
            return parse_interests(user, await self.r.hgetall(self.keys.user_vectors(user)))
        keys = [self.keys.user_vectors(user), self.keys.user_vectors_at(user, version)]
        return parse_interests(user, await self.r.eval(scripts.READ_VECTORS_OF, 2, *keys, version))

    async def get_user_interests(
        self, user: str, scenario: str | None = None, version: str | None = None
    ) -> tuple[np.ndarray, Interests]:
        found = await self.interests(user, version)
        if found is None:
            at = "" if version is None else f" of model version {version!r}"
            raise KeyError(f"no interest vectors{at} for user {user!r} yet")
        return found.matrix(scenario), found

    async def user_status(self, user: str) -> UserStatus | None:
        """The user's state fields and coarse state (one atomic read), or None when no event of it was ever
        applied."""
        keys = self.keys.user_row(user)
        row = users.parse_row(user, await self.r.eval(scripts.READ_USER, len(keys), *keys), [], [])
        if not row.seq:
            return None
        return UserStatus(row.seq, row.last_ts, row.kts, row.codebook, row.state_id, row.coarse)

    async def history(self, user: str, last_bytes: int = 0) -> bytes:
        """The stored history records (``last_bytes`` > 0: only that many bytes at its end)."""
        key = self.keys.user_history(user)
        return bytes(await (self.r.getrange(key, -last_bytes, -1) if last_bytes else self.r.get(key)) or b"")

    async def item_count(self) -> int:
        return int(await self.r.scard(self.keys.items))

    async def item_ids(self) -> list[str]:
        return sorted(m.decode() for m in await self.r.smembers(self.keys.items))

    async def item_fields(self, items: list[str], fields: list[str]) -> list[list[bytes | None]]:
        """Per item, these fields of its hash (``ret``, ``title``, ``Keys.item_code(codebook)``), one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for it in items:
            pipe.hmget(self.keys.item(it), fields)
        return list(await pipe.execute())

    async def close(self) -> None:
        await self.r.aclose()
