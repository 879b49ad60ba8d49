"""The Lua scripts in a real Redis and their plain-Python reference (``state.memory``) give the same bytes
for the same calls, conflicts included: the planner's unit tests run on the reference, the workers on Lua."""

from __future__ import annotations

import pytest
import redis

from state.keys import Keys
from state.memory import MemoryUsers
from state.store import StreamStore, connect_async
from state.users import UserUpdate

pytestmark = pytest.mark.integration
W = "w:t:0"


def _update(ver: int, gen: str | None, n: int, records: bytes, **kw) -> UserUpdate:
    return UserUpdate(ver, gen, n, kw.pop("coarse", b"c" * 16), records, **kw)


STEPS = [
    (
        "apply",
        "u",
        _update(0, None, 2, b"aaaabbbb", last_ts=5.0, kts=9.0, watermarks={W: 7}, state_id="g1", codebook="b1"),
    ),
    ("apply", "u", _update(0, None, 1, b"cccc", coarse=b"x" * 16)),  # stale version: conflict, nothing written
    ("mark", "u", (1, "g1", ("t:0:8", "t:0:9"))),
    ("mark", "u", (1, "g1", ("t:0:10",))),  # stale version: conflict
    (
        "apply",
        "u",
        _update(2, "g1", 2, b"ddddeeee", watermarks={W: 3}, last_ts=1.0, applied=("t:0:8",), coarse=b"d" * 16),
    ),
    ("apply", "u", _update(3, "g2", 1, b"ffff", coarse=b"y" * 16)),  # wrong gen: conflict
    ("apply", "u", _update(3, "g1", 0, b"", coarse=None, history=b"zzzz", state_id="g2", codebook="b2")),
    ("apply", "u", _update(4, "g2", 1, b"gggg", kts=10.0, watermarks={W: 12, "w:t:1": 0}, coarse=b"g" * 16)),
    ("apply", "v", _update(0, None, 1, b"hhhh", history=b"", state_id="g2", codebook="b2")),
    ("park", "i", (b"e1", 2)),
    ("park", "i", (b"e2", 2)),
    ("park", "i", (b"e3", 2)),  # full
    ("unpark", "i", [b"e1", b"e9"]),
    ("park", "i", (b"e3", 2)),
    ("unpark", "i", [b"e2", b"e3"]),
]


async def test_lua_scripts_equal_their_reference(redis_url, prefix):
    store = StreamStore(connect_async(redis_url), prefix)
    mem = MemoryUsers()
    got_redis, got_mem = [], []
    for kind, key, arg in STEPS:
        if kind == "apply":
            got_redis.append((await store.apply_many({key: arg}))[key])
            got_mem.append(mem.apply(key, arg))
        elif kind == "mark":
            ver, gen, origins = arg
            row = (await store.read_users({key: ([], [])}))[key]
            row_mem = mem.read(key, [], [])
            assert (row.version, row.state_id) == (row_mem.version, row_mem.state_id)
            stale = type(row)(key, ver, state_id=gen)
            got_redis.append((await store.mark_parked({key: (stale, origins)}))[key])
            got_mem.append(mem.mark_parked(stale, origins))
        elif kind == "park":
            got_redis.append(await store.park(key, *arg))
            got_mem.append(mem.park(key, *arg))
        else:
            got_redis.append(await store.unpark(key, arg))
            got_mem.append(mem.unpark(key, arg))
    assert got_redis == got_mem
    assert [r is None or r is False for r in got_redis] == [
        False,
        True,
        False,
        True,
        False,
        True,
        False,
        False,
        False,
        False,
        False,
        True,
        False,
        False,
        False,
    ]
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    for user in ("u", "v"):
        stored = {k.decode(): v for k, v in r.hgetall(keys.user_state(user)).items()}
        assert stored == {k: v if isinstance(v, bytes) else str(v).encode() for k, v in mem.state[user].items()}
        assert r.get(keys.user_history(user)) == mem.history.get(user)
        assert r.get(keys.user_coarse(user)) == mem.coarse.get(user)
    assert mem.coarse["u"] == b"g" * 16  # the last applied coarse state; the conflicting ones never landed
    assert r.lrange(keys.parked("i"), 0, -1) == mem.parked_lists.get("i", [])
    origins = ["t:0:8", "t:0:9"]
    row, row_mem = (await store.read_users({"u": ([W], origins)}))["u"], mem.read("u", [W], origins)
    assert row == row_mem and row.watermarks[W] == 12 and row.applied == {"t:0:8"} and row.parked == {"t:0:9"}
    assert row.history == b"zzzzgggg" and row.version == 5 and row.seq == 5 and row.coarse == b"g" * 16
    await store.r.aclose()


@pytest.mark.parametrize("bulk_max", [512, 2])
async def test_one_bulk_call_equals_each_user_alone(redis_url, prefix, monkeypatch, bulk_max):
    """A batch's users go to Redis in one script call (``scripts.per_entity``; ``bulk_max`` 2 splits them
    over several calls of one round trip): replies and stored bytes equal those of each user alone, one
    user's conflict leaves the others applied, and a missing item reads as None between known ones."""
    import state.store

    monkeypatch.setattr(state.store, "BULK_MAX", bulk_max)
    bulk, alone = (StreamStore(connect_async(redis_url), f"{prefix}{s}", user_ttl_s=600) for s in ("b", "a"))
    users = {f"u{i}": _update(0, None, i + 1, bytes([65 + i]) * 4 * (i + 1), watermarks={W: i}) for i in range(5)}
    for store in (bulk, alone):  # u2 then moves on, so the second round's plan for it is stale
        await store.apply_many({"u2": users["u2"]})
    second = {u: _update(0 if u == "u0" else 1, None, 1, b"zzzz", watermarks={W: 9}) for u in users}  # u0 stale
    got_bulk = [await bulk.apply_many(users), await bulk.apply_many(second)]
    got_alone = [
        {u: (await alone.apply_many({u: upd}))[u] for u, upd in users.items()},
        {u: (await alone.apply_many({u: upd}))[u] for u, upd in second.items()},
    ]
    assert got_bulk == got_alone
    assert [u for u, got in got_bulk[0].items() if got is None] == ["u2"]
    assert [u for u, got in got_bulk[1].items() if got is None] == ["u0"]
    rows_bulk = await bulk.read_users({u: ([W], ["t:0:1"]) for u in users})
    rows_alone = {u: (await alone.read_users({u: ([W], ["t:0:1"])}))[u] for u in users}
    assert rows_bulk == rows_alone and rows_bulk["u3"].history == b"DDDD" * 4 + b"zzzz"
    r = redis.Redis.from_url(redis_url)
    for u in users:
        assert 500 < r.ttl(Keys(f"{prefix}b").user_history(u)) <= 600
    r.hset(Keys(f"{prefix}b").item("known"), "code:cb", b"\x01\x02")
    assert await bulk.item_codes(["nope", "known", "nope2"], "cb") == {
        "nope": None,
        "known": b"\x01\x02",
        "nope2": None,
    }
    assert await bulk.item_codes([], "cb") == {}
    for store in (bulk, alone):
        await store.r.aclose()


async def test_trend_script_equals_its_reference(redis_url, prefix):
    """``TREND_ADD`` in Redis == ``state.trend.fold``: out-of-order times, two partitions, a redelivered
    batch and an overlapping one (a second worker replaying part of the same offsets)."""
    import numpy as np

    from state import trend

    store = StreamStore(connect_async(redis_url), prefix)
    tau = 3 * 86400.0
    rng = np.random.default_rng(0)
    ts = rng.uniform(8.9e8, 8.9e8 + 30 * 86400.0, 40)
    batches = [
        {("x", trend.mark("t", 0)): [(i, float(ts[i])) for i in range(0, 10)]},
        {("x", trend.mark("t", 1)): [(i, float(ts[i])) for i in range(10, 20)]},
        {("x", trend.mark("t", 0)): [(i, float(ts[i])) for i in range(0, 10)]},  # redelivered: adds nothing
        {("x", trend.mark("t", 0)): [(i, float(ts[i])) for i in range(5, 30)]},  # overlap: 10..29 are new
        {("y", trend.mark("t", 0)): [(i, float(ts[i])) for i in range(30, 40)]},
    ]
    ref: dict[str, tuple[float, float | None, dict[str, int]]] = {}
    added_redis, added_ref = [], []
    for batch in batches:
        added_redis.append(await store.add_trend(batch, tau))
        n = 0
        for (item, field), events in batch.items():
            c, last, marks = ref.get(item, (0.0, None, {}))
            c, last, marks[field], k = trend.fold(c, last, marks.get(field, -1), sorted(events), tau)
            ref[item], n = (c, last, marks), n + k
        added_ref.append(n)
    assert added_redis == added_ref == [10, 10, 0, 20, 10]
    sync = redis.Redis.from_url(redis_url)
    for item, (c, last, marks) in ref.items():
        h = sync.hgetall(Keys(prefix).item(item))
        assert float(h[b"tc"]) == c and float(h[b"tt"]) == last  # %.17g round-trips a double exactly
        assert {k.decode(): int(v) for k, v in h.items() if k.startswith(b"tm:")} == marks


async def test_dirty_queue_serves_the_longest_waiting_user_first(redis_url, prefix):
    """A busy user re-marked at every event keeps its place; it does not push quiet users back, and it
    leaves the queue only once refined up to its newest mark."""
    import asyncio

    store = StreamStore(connect_async(redis_url), prefix)
    await store.mark_dirty(0, {"quiet": 1, "busy": 5})
    await asyncio.sleep(0.01)
    await store.mark_dirty(0, {"late": 1})
    await store.mark_dirty(0, {"busy": 900})  # heavy user: a higher seq, same place in the queue
    await store.mark_dirty(0, {"busy": 7})  # seqs only rise
    got = await store.dirty_users(0, 10)
    assert got[2] == ("late", 1) and dict(got) == {"quiet": 1, "busy": 900, "late": 1}
    await store.clear_dirty(0, "busy", 5)  # refined up to an older seq: still owed the newer events
    assert ("busy", 900) in await store.dirty_users(0, 10)
    await store.clear_dirty(0, "busy", 900)
    await store.clear_dirty(0, "quiet", 1)
    assert await store.dirty_users(0, 10) == [("late", 1)]


async def test_origin_marks_stay_bounded_and_equal_their_reference(redis_url, prefix):
    """Parking marks and applied marks past ``MARKS_CAP``: the older half is dropped, in Redis as in the
    reference, byte for byte; the newest marks (what a late second copy would meet) are kept."""
    from state.users import MARKS_CAP, UserRow, applied_mark

    store = StreamStore(connect_async(redis_url), prefix)
    mem = MemoryUsers()
    ver, n = 0, 0
    while n < 2 * MARKS_CAP + 7:
        origins = tuple(f"t:0:{n + i}" for i in range(5))
        row = UserRow("m", ver, state_id="g1" if ver else None)
        assert (await store.mark_parked({"m": (row, origins)}))["m"] is mem.mark_parked(row, origins) is True
        ver += 1
        upd = _update(ver, "g1" if ver > 1 else None, 3, b"xxxx", applied=origins[:3], state_id="g1")
        assert (await store.apply_many({"m": upd}))["m"] == mem.apply("m", upd)
        ver, n = ver + 1, n + 5
    stored = {k.decode(): v for k, v in redis.Redis.from_url(redis_url).hgetall(Keys(prefix).user_state("m")).items()}
    assert stored == mem.state["m"]
    marks = [f for f in stored if f[:2] in ("o:", "p:")]
    assert len(marks) <= MARKS_CAP and int(stored["nm"]) == len(marks)
    assert applied_mark(f"t:0:{n - 5}") in stored  # the newest applied mark is kept


async def test_idle_user_keys_expire_together(redis_url, prefix):
    """With ``user_ttl_s`` an applied user's state, coarse state and history get the TTL, and its vectors
    take it when written; without it nothing expires."""
    import numpy as np

    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    for ttl, user in ((0, "forever"), (3600, "idle")):
        store = StreamStore(connect_async(redis_url), prefix, user_ttl_s=ttl)
        assert (await store.apply_many({user: _update(0, None, 1, b"aaaa", state_id="g")}))[user] is not None
        await store.write_vectors(user, 1, "m1", 1.0, 1.0, {"feed": np.ones((2, 3), np.float32)})
        own = (keys.user_state(user), keys.user_coarse(user), keys.user_history(user), keys.user_vectors(user))
        got = [r.ttl(k) for k in own]
        assert all(t == -1 for t in got) if not ttl else all(3500 < t <= 3600 for t in got), (user, got)


async def test_version_copies_exist_only_while_another_version_is_the_latest(redis_url, prefix):
    """One model version's vectors are kept once (the latest key); when another version takes the latest
    key, the replaced vectors move to their version's key, so a reader pinned to either version reads its
    newest vectors throughout a roll-out, and a stale write of one version never hides the other's."""
    import numpy as np

    from state.store import InterestReader

    store, keys = StreamStore(connect_async(redis_url), prefix), Keys(prefix)
    reader, r = InterestReader(redis_url, prefix), redis.Redis.from_url(redis_url)
    rng = np.random.default_rng(0)

    def vecs() -> dict[str, np.ndarray]:
        return {s: rng.normal(size=(3, 8)).astype(np.float32) for s in ("feed", "ads")}

    async def write(seq: int, version: str) -> tuple[bool, dict[str, np.ndarray]]:
        v = vecs()
        return await store.write_vectors("u", seq, version, 1.0, 1.0, v, version_ttl_s=600), v

    def pinned(version: str) -> tuple[int, dict[str, np.ndarray]] | None:
        got = reader.interests("u", version)
        return None if got is None else (got.seq, got.vectors)

    def exists(version: str) -> bool:
        return bool(r.exists(keys.user_vectors_at("u", version)))

    ok, _ = await write(1, "A")
    assert ok and not exists("A") and pinned("A")[0] == 1  # one version: no copy
    ok, _ = await write(2, "B")
    assert ok and exists("A") and not exists("B") and reader.interests("u").version == "B"
    assert pinned("A")[0] == 1 and pinned("B")[0] == 2 and 0 < r.ttl(keys.user_vectors_at("u", "A")) <= 600
    ok, _ = await write(1, "A")  # older than the latest: only A's own key, still seq 1
    assert not ok and pinned("A")[0] == 1 and pinned("B")[0] == 2
    ok, a3 = await write(3, "A")  # A is the latest again: B's vectors move aside, A's copy goes
    assert ok and exists("B") and not exists("A") and pinned("A")[0] == 3 and pinned("B")[0] == 2
    ok, b_late = await write(2, "B")  # B refines the same seq again, behind A: B's key only
    assert not ok and pinned("B")[0] == 2 and pinned("A")[0] == 3
    for s, want in a3.items():  # float16 as stored: within one float16 step of the float32 written
        np.testing.assert_allclose(pinned("A")[1][s], want, rtol=2.0**-10, atol=2.0**-24)
        np.testing.assert_allclose(pinned("B")[1][s], b_late[s], rtol=2.0**-10, atol=2.0**-24)
    await store.r.aclose()


def test_vectors_of_the_float32_format_still_read(redis_url, prefix):
    """Vectors written before the float16 format (float32 fields) decode as they were."""
    import numpy as np

    from state.store import InterestReader

    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    v = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
    fields = {"seq": 4, "version": "old", "updated_at": 1.0, "event_ts": 1.0, "produced_at": 1.0, "k": 2, "d": 3}
    r.hset(keys.user_vectors("u"), mapping={**fields, "vec:feed": v.tobytes()})
    got = InterestReader(redis_url, prefix).interests("u")
    assert got.seq == 4 and np.array_equal(got.vectors["feed"], v)


async def test_history_string_holds_no_append_slack(redis_url, prefix):
    """Appended in many small applies, the stored history takes about its own length in Redis (APPEND's
    buffer growth would leave up to as much again unused), in Redis as in the reference."""
    store, mem = StreamStore(connect_async(redis_url), prefix), MemoryUsers()
    for i in range(100):
        first = {"state_id": "g"} if i == 0 else {}
        update = UserUpdate(i, "g" if i else None, 10, b"c" * 16, bytes([i]) * 160, **first)
        assert (await store.apply_many({"u": update}))["u"] is not None and mem.apply("u", update) is not None
    r, key = redis.Redis.from_url(redis_url), Keys(prefix).user_history("u")
    assert r.get(key) == mem.history["u"] and len(mem.history["u"]) == 16_000
    assert r.memory_usage(key, samples=0) <= 16_000 + 1024  # one allocator size class above the bytes
    await store.r.aclose()


async def test_a_coarse_state_in_the_state_hash_reads_then_moves_to_its_key(redis_url, prefix):
    """A state written before the coarse state had a key of its own (the ``coarse`` field of ``:s``) reads
    as before; an update that keeps the coarse state leaves it there; the next write of a coarse state
    moves it to ``:c`` and rewrites the hash, which Redis then stores as a listpack again (the big field
    had made it a hashtable), its TTL kept.  In Redis as in the reference."""
    r, keys = redis.Redis.from_url(redis_url), Keys(prefix)
    store, mem = StreamStore(connect_async(redis_url), prefix), MemoryUsers()
    old = {"ver": b"3", "seq": b"7", "gen": b"g", "cb": b"b", "coarse": b"o" * 1300, W: b"5"}
    r.hset(keys.user_state("u"), mapping=old)
    r.expire(keys.user_state("u"), 3600)
    mem.state["u"] = dict(old)
    row = (await store.read_users({"u": ([W], [])}))["u"]
    assert row == mem.read("u", [W], []) and row.coarse == b"o" * 1300 and row.seq == 7
    assert r.object("encoding", keys.user_state("u")) == b"hashtable"
    keep = UserUpdate(3, "g", 0, None, b"", watermarks={W: 6})
    assert (await store.apply_many({"u": keep}))["u"] == mem.apply("u", keep) is not None
    assert (await store.read_users({"u": ([], [])}))["u"].coarse == b"o" * 1300 and not r.exists(keys.user_coarse("u"))
    move = UserUpdate(4, "g", 1, b"n" * 1300, b"rrrr")
    assert (await store.apply_many({"u": move}))["u"] == mem.apply("u", move) is not None
    stored = {k.decode(): v for k, v in r.hgetall(keys.user_state("u")).items()}
    assert stored == mem.state["u"] and "coarse" not in stored and stored["seq"] == b"8"
    assert r.get(keys.user_coarse("u")) == mem.coarse["u"] == b"n" * 1300
    assert (await store.read_users({"u": ([], [])}))["u"] == mem.read("u", [], [])
    assert r.object("encoding", keys.user_state("u")) in (b"listpack", b"ziplist")
    assert 3500 < r.ttl(keys.user_state("u")) <= 3600
    await store.r.aclose()
