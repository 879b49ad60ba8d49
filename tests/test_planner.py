"""The apply step's planner against the in-memory reference of the Lua scripts: races, stale writers,
parking and poison users, each ending in the state a serial order of the writes gives.  No services."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_checks import retrained

from models.user_model import Checkpoint
from state.history import decode, encode, records
from state.memory import MemoryUsers
from state.users import UserUpdate, decode_history, watermark
from streams.events import Event, Message
from streams.planner import Accepted, PlanContext, UserPlan, plan, plan_new, trim_slack

TOPIC = "t.events.feed"
CAP = 100


@pytest.fixture(scope="module")
def old(sim_checkpoint) -> Checkpoint:
    return Checkpoint.load(sim_checkpoint)


@pytest.fixture(scope="module")
def new(sim_checkpoint, tmp_path_factory) -> Checkpoint:
    return retrained(str(sim_checkpoint), tmp_path_factory.mktemp("cb2"), "cb-2")


def ev(
    user: str,
    item: int,
    offset: int,
    ts: float | None = None,
    origin: str | None = None,
    scenario: int = 0,
    topic: str = TOPIC,
) -> Accepted:
    e = Event(f"e{offset}", user, str(item), scenario, 0, ts if ts is not None else 1.7e9 + offset, "", origin)
    msg = Message(topic, 0, offset, user.encode(), b"", 1.7e9 + offset)
    return Accepted(e, msg, origin or f"{topic}:0:{offset}", origin is not None)


def codes_of(ckpt: Checkpoint, items: range | list[int]) -> dict[str, bytes]:
    recs = ckpt.codebook.encode(ckpt.item_vectors[list(items)]).records()
    return {str(i): recs[j].tobytes() for j, i in enumerate(items)}


def ctx(ckpt: Checkpoint, *others: Checkpoint) -> PlanContext:
    return PlanContext(ckpt, {c.codebook_id: c.codebook for c in (ckpt, *others)}, CAP)


def read(mem: MemoryUsers, events: dict[str, list[Accepted]]):
    return {u: mem.read(u, sorted({a.mark for a in b}), [a.origin for a in b]) for u, b in events.items()}


def write(mem: MemoryUsers, rows, plans: dict[str, UserPlan], handled: set[str] | None = None) -> set[str]:
    """The ingest shell's writes for each plan (mark → park → apply); the users that conflicted.
    ``handled`` collects the origins parked or dead-lettered, as ``streams.ingest`` does."""
    handled = set() if handled is None else handled
    conflicts = set()
    for u, p in plans.items():
        handled.update(a.origin for a in p.dead)
        if p.update is None:
            continue
        if p.mark and not mem.mark_parked(rows[u], p.mark):
            conflicts.add(u)
            continue
        for a in p.park:
            mem.park(a.event.item_id, a.origin.encode(), 1000)
            handled.add(a.origin)
        if mem.apply(u, p.update) is None:
            conflicts.add(u)
    return conflicts


def run(mem: MemoryUsers, events: dict[str, list[Accepted]], codes, c: PlanContext) -> dict[str, UserPlan]:
    """Read → plan → write until no conflict, as ``streams.ingest`` does."""
    handled: set[str] = set()
    while True:
        rows = read(mem, events)
        plans = plan(rows, events, codes, c, handled)
        left = write(mem, rows, plans, handled)
        if not left:
            return plans
        events = {u: events[u] for u in left}


def test_serial_apply_then_redelivery_changes_nothing(old):
    mem, codes = MemoryUsers(), codes_of(old, range(10))
    batch = {"u1": [ev("u1", i, i) for i in range(5)], "u2": [ev("u2", 7, 5)]}
    run(mem, batch, codes, ctx(old))
    before = (dict(mem.state["u1"]), mem.coarse["u1"], mem.history["u1"])
    plans = run(mem, batch, codes, ctx(old))
    assert all(p.update is None and p.duplicates == len(batch[u]) for u, p in plans.items())
    assert (mem.state["u1"], mem.coarse["u1"], mem.history["u1"]) == before
    assert mem.state["u1"]["seq"] == b"5"
    assert int(mem.state["u1"]["ver"]) == 1 and mem.state["u1"][watermark(TOPIC, 0)] == b"4"


def test_rebuild_race_ends_in_the_serial_state(old, new):
    """Two agents of a new checkpoint meet the same old-checkpoint user: A reads, B rebuilds and applies,
    then A writes: A's stale plan is refused, A re-reads and re-plans on B's state."""
    codes_old, codes_new = codes_of(old, range(20)), codes_of(new, range(20))
    mem = MemoryUsers()
    run(mem, {"u": [ev("u", i, i) for i in range(6)]}, codes_old, ctx(old))
    a_events = {"u": [ev("u", 10, 100)]}
    b_events = {"u": [ev("u", 11, 0, ts=1.7e9 + 50, scenario=1, topic="t.events.search")]}
    rows_a = read(mem, a_events)
    plan_a = plan(rows_a, a_events, codes_new, ctx(new, old))
    assert plan_a["u"].rebuilt
    run(mem, b_events, codes_new, ctx(new, old))  # B lands in between
    assert write(mem, rows_a, plan_a) == {"u"}  # A's plan was made on a state that no longer exists
    run(mem, a_events, codes_new, ctx(new, old))

    serial = MemoryUsers()
    run(serial, {"u": [ev("u", i, i) for i in range(6)]}, codes_old, ctx(old))
    run(serial, b_events, codes_new, ctx(new, old))
    run(serial, a_events, codes_new, ctx(new, old))
    assert mem.history == serial.history and mem.state == serial.state and mem.coarse == serial.coarse
    rec = decode_history(mem.history["u"], new.codebook.cfg.bytes_per_item)
    assert len(rec) == 8 and mem.state["u"]["gen"].decode() == new.state_id


def test_zero_event_rebuild_then_stale_writer(old, new):
    """The new worker parks every event of its batch (unknown item) and so rebuilds without applying
    anything; a stale writer of the old checkpoint that read the user before must not append old-size
    records to the re-encoded history."""
    mem = MemoryUsers()
    run(mem, {"u": [ev("u", i, i) for i in range(4)]}, codes_of(old, range(20)), ctx(old))
    stale_events = {"u": [ev("u", 5, 10, scenario=1, topic="t.events.search")]}
    stale_rows = read(mem, stale_events)
    stale_plan = plan(stale_rows, stale_events, codes_of(old, range(20)), ctx(old))
    seq_before = mem.state["u"]["seq"]
    plans = run(mem, {"u": [ev("u", 999, 11)]}, {}, ctx(new, old))  # item 999 unknown: parked
    assert plans["u"].rebuilt and plans["u"].update.n_events == 0 and plans["u"].park
    assert mem.state["u"]["seq"] == seq_before and mem.state["u"]["gen"].decode() == new.state_id
    assert write(mem, stale_rows, stale_plan) == {"u"}
    assert len(decode_history(mem.history["u"], new.codebook.cfg.bytes_per_item)) == 4
    # Re-planned, the old worker rebuilds back into its own codebook first (a legal hand-back).
    run(mem, stale_events, codes_of(old, range(20)), ctx(old, new))
    assert len(decode_history(mem.history["u"], old.codebook.cfg.bytes_per_item)) == 5


def test_watermarks_and_times_never_move_back(old):
    mem, codes = MemoryUsers(), codes_of(old, range(10))
    run(mem, {"u": [ev("u", 1, 10, ts=2e9)]}, codes, ctx(old))
    h = mem.state["u"]
    lower = UserUpdate(
        int(h["ver"]),
        h["gen"].decode(),
        0,
        None,
        b"",
        last_ts=1e9,
        kts=1.0,
        watermarks={watermark(TOPIC, 0): 3},
    )
    assert mem.apply("u", lower) is not None
    assert h[watermark(TOPIC, 0)] == b"10" and float(h["last_ts"]) == 2e9 and float(h["kts"]) == 1.7e9 + 10


def test_parked_event_is_applied_once_whichever_copy_comes_second(old):
    mem = MemoryUsers()
    first = {"u": [ev("u", 3, 7)]}
    plans = run(mem, first, {}, ctx(old))  # item 3 unknown: marked, parked, watermark passes it
    assert plans["u"].park and mem.state["u"][watermark(TOPIC, 0)] == b"7" and mem.state["u"]["seq"] == b"0"
    codes = codes_of(old, [3])
    copy = {"u": [ev("u", 3, 20, ts=1.7e9 + 7, origin=f"{TOPIC}:0:7")]}
    run(mem, copy, codes, ctx(old))
    assert mem.state["u"]["seq"] == b"1" and f"o:{TOPIC}:0:7" in mem.state["u"]
    assert f"p:{TOPIC}:0:7" not in mem.state["u"]
    assert run(mem, first, codes, ctx(old))["u"].update is None  # the original, redelivered
    assert run(mem, copy, codes, ctx(old))["u"].update is None  # the copy, released twice
    assert mem.state["u"]["seq"] == b"1"


def test_copy_and_original_in_one_batch_apply_once(old):
    mem = MemoryUsers()
    run(mem, {"u": [ev("u", 3, 7)]}, {}, ctx(old))
    mem.state["u"][watermark(TOPIC, 0)] = b"6"  # as if the watermark write was lost in a crash
    both = {"u": [ev("u", 3, 7), ev("u", 3, 20, ts=1.7e9 + 7, origin=f"{TOPIC}:0:7")]}
    plans = run(mem, both, codes_of(old, [3]), ctx(old))
    assert plans["u"].update.n_events == 1 and plans["u"].duplicates == 1 and mem.state["u"]["seq"] == b"1"


@pytest.mark.parametrize("poison", ["short history", "unknown codebook", "nan state", "scenario"])
def test_a_poison_user_is_isolated_and_the_rest_applied(old, poison):
    mem, codes = MemoryUsers(), codes_of(old, range(10))
    run(mem, {"bad": [ev("bad", 1, 1)], "good": [ev("good", 1, 2)]}, codes, ctx(old))
    bad_events = [ev("bad", 2, 3)]
    if poison == "short history":
        mem.history["bad"] = b"x" * 17
    elif poison == "unknown codebook":
        mem.state["bad"]["cb"] = b"never-published"
    elif poison == "nan state":
        mem.coarse["bad"] = np.full(len(mem.coarse["bad"]) // 8, np.nan).tobytes()
    else:
        bad_events = [ev("bad", 2, 3, scenario=99)]
    before = dict(mem.state["bad"]), mem.coarse["bad"], mem.history.get("bad")
    plans = run(mem, {"bad": bad_events, "good": [ev("good", 2, 4)]}, codes, ctx(old))
    assert plans["bad"].poison and "bad" in plans["bad"].poison and plans["bad"].dead == bad_events
    assert plans["bad"].update is None and (mem.state["bad"], mem.coarse["bad"], mem.history.get("bad")) == before
    assert plans["good"].update is not None and mem.state["good"]["seq"] == b"2"


def test_a_coarse_state_is_usable_unless_it_holds_nan_or_plus_infinity():
    from state.users import usable_coarse

    fresh = np.array([0.0, 1.7e9, -np.inf, -np.inf, 2.5])  # running maxima start at -inf: fine
    assert usable_coarse(fresh)
    for at in range(len(fresh)):
        for bad in (np.nan, np.inf):
            state = fresh.copy()
            state[at] = bad
            assert not usable_coarse(state), (at, bad)


def test_events_that_would_make_the_state_nan_are_dead_lettered(old):
    mem, codes = MemoryUsers(), codes_of(old, range(10))
    run(mem, {"u": [ev("u", 1, 1)]}, codes, ctx(old))
    before = dict(mem.state["u"]), mem.coarse["u"]
    plans = run(mem, {"u": [ev("u", 2, 2, ts=1e300)], "v": [ev("v", 1, 3)]}, codes, ctx(old))
    assert plans["u"].poison and "NaN" in plans["u"].poison and (mem.state["u"], mem.coarse["u"]) == before
    assert mem.state["v"]["seq"] == b"1"


def test_two_releases_of_one_item_lose_nothing():
    """Release 1 reads [a, b]; an event c is parked; release 2 reads [a, b, c]; both remove what they
    re-produced, by value: c is re-produced by release 2 and nothing is left behind or lost."""
    mem = MemoryUsers()
    for body in (b"a", b"b"):
        mem.park("i", body, 10)
    first = list(mem.parked_lists["i"])
    mem.park("i", b"c", 10)
    second = list(mem.parked_lists["i"])
    assert mem.unpark("i", first) == 2 and mem.parked_lists["i"] == [b"c"]
    assert mem.unpark("i", second) == 1 and "i" not in mem.parked_lists
    # Only release 1 ran: c stays parked for the next release.
    for body in (b"a", b"b"):
        mem.park("j", body, 10)
    first = list(mem.parked_lists["j"])
    mem.park("j", b"c", 10)
    mem.unpark("j", first)
    assert mem.parked_lists["j"] == [b"c"]
    assert not mem.park("j", b"d", 1)  # the bound holds in the same step as the push


def test_a_parking_mark_that_loses_a_race_parks_on_the_re_plan(old):
    """The mark is refused (another writer moved the version): nothing is parked, the watermark does not
    move, and the re-plan marks and parks the event."""
    mem = MemoryUsers()
    run(mem, {"u": [ev("u", 1, 1)]}, codes_of(old, [1]), ctx(old))
    events, handled = {"u": [ev("u", 3, 7)]}, set()
    rows = read(mem, events)
    plans = plan(rows, events, {}, ctx(old), handled)
    run(mem, {"u": [ev("u", 1, 2, scenario=1, topic="t.events.search")]}, codes_of(old, [1]), ctx(old))
    assert write(mem, rows, plans, handled) == {"u"} and not handled and "3" not in mem.parked_lists
    assert mem.state["u"][watermark(TOPIC, 0)] == b"1"
    run(mem, events, {}, ctx(old))
    assert mem.parked_lists["3"] == [f"{TOPIC}:0:7".encode()] and mem.state["u"][watermark(TOPIC, 0)] == b"7"


def test_transient_errors_are_told_apart_from_bugs():
    import redis.exceptions as rx
    from aiokafka.errors import KafkaConnectionError, NotLeaderForPartitionError, ProducerClosed

    from streams.retry import is_transient

    for exc in (rx.ConnectionError(), rx.TimeoutError(), KafkaConnectionError(), NotLeaderForPartitionError()):
        assert is_transient(exc), exc
    for exc in (rx.ResponseError("WRONGTYPE"), rx.AuthenticationError(), ValueError(), OSError(2, "no file")):
        assert not is_transient(exc), exc
    assert not is_transient(ProducerClosed())


def test_item_records_are_checked_before_decoding(old):
    good = old.codebook.encode(old.item_vectors[:1]).records()[0].tobytes()
    assert old.codebook.valid_record(good)
    assert not old.codebook.valid_record(good[:-1])
    bad = bytearray(good)
    bad[0] = 255  # a code past the codebook's 64 codewords
    assert old.codebook.cfg.codewords < 256 and not old.codebook.valid_record(bytes(bad))


def test_the_columnar_plan_of_new_users_equals_the_planner(old):
    """``plan_new`` (the batch backfill's fast path) writes what ``plan`` writes for users with nothing
    stored: same coarse bytes, history records, times and hand-over watermark, users in one fold."""
    rng = np.random.default_rng(3)
    items = list(range(40))
    codes = codes_of(old, items)
    users = [f"n{u}" for u in range(25)]
    pending: dict[str, list[Accepted]] = {}
    line = 0
    for u in users:
        n = int(rng.integers(1, 30)) if u != "n3" else 2 * CAP  # n3: past the trim, written whole
        ts = 1.7e9 + np.round(rng.uniform(0, 5e5, n), -5)  # rounded: equal times, ordered by line
        batch = []
        for t in ts.tolist():
            line += 1
            e = Event(f"id{line}", u, str(int(rng.integers(0, 40))), int(rng.integers(0, 3)), 0, t, "")
            batch.append(Accepted(e, Message("backfill", 0, line, None, b"", 0.0), f"file:0:{line}", False, True))
        pending[u] = batch
    c = ctx(old)
    mem = MemoryUsers()
    rows = read(mem, pending)
    assert all(rows[u].is_new for u in users)
    reference = plan(rows, pending, codes, c)
    ordered = {u: sorted(b, key=lambda a: (a.event.ts, a.offset)) for u, b in pending.items()}
    flat = [a for u in users for a in ordered[u]]
    fast = plan_new(
        users,
        np.asarray([len(ordered[u]) for u in users]),
        np.frombuffer(b"".join(codes[a.event.item_id] for a in flat), np.uint8).reshape(len(flat), -1),
        np.asarray([a.event.scenario for a in flat], np.int8),
        np.asarray([a.event.action for a in flat], np.int8),
        np.asarray([a.event.ts for a in flat]),
        [a.event.event_id for a in flat],
        c,
    )
    assert set(fast) == set(users)
    for u in users:
        assert fast[u] == reference[u].update, u
    assert fast["n3"].history is not None and len(decode(fast["n3"].history, 6)) == CAP
    tops = [fast[u].backfill for u in users]
    assert any(len(ids) > 1 for _, ids in tops)  # equal times at the top were exercised


def test_compact_coarse_state_folds_like_float64(old):
    """The stored coarse state (float64 head, float32 sums) read back and folded into one event at a time,
    300 times, reads within the stream's coarse tolerance of one float64 fold over all of them; a state
    stored in the former all-float64 layout still decodes."""
    from state.users import decode_coarse, encode_coarse

    model, rng = old.model.coarse, np.random.default_rng(3)
    n = 300
    items = old.item_vectors[rng.integers(0, len(old.item_vectors), n)]
    scen, act = rng.integers(0, 3, n), rng.integers(0, 3, n)
    ts = 1.7e9 + np.sort(rng.uniform(0, 90 * 86400, n))
    stored = encode_coarse(model.init_state())
    for i in range(n):
        state = decode_coarse(stored, model.state_size)
        stored = encode_coarse(model.update(state, items[i : i + 1], scen[i : i + 1], act[i : i + 1], ts[i : i + 1]))
    whole = model.update(model.init_state(), items, scen, act, ts)
    assert len(stored) == 8 * 2 + 4 * (model.state_size - 2) and len(stored) < 8 * model.state_size
    np.testing.assert_allclose(model.read(decode_coarse(stored, model.state_size)), model.read(whole), atol=1e-5)
    np.testing.assert_array_equal(decode_coarse(whole.astype("<f8").tobytes(), model.state_size), whole)


def test_batched_coarse_codecs_equal_the_per_state_ones(old):
    """``decode_coarse_many`` / ``encode_coarse_many`` (one pass for a batch) against ``decode_coarse`` /
    ``encode_coarse`` on every kind of stored value: compact, all float64 (older), none, empty, NaN, +inf,
    a wrong length; each decoded state is writable and shares no memory with another."""
    from state.users import CorruptState, decode_coarse, decode_coarse_many, encode_coarse, encode_coarse_many

    model, rng = old.model.coarse, np.random.default_rng(5)
    states = [
        model.update(
            model.init_state(), old.item_vectors[i : i + 3], [0, 1, 2], [0, 0, 1], 1.7e9 + rng.uniform(0, 1e6, 3)
        )
        for i in range(4)
    ]
    nan, inf = states[0].copy(), states[1].copy()
    nan[7], inf[9] = np.nan, np.inf
    raws = [
        encode_coarse(states[0]),
        states[1].astype("<f8").tobytes(),
        None,
        b"",
        encode_coarse(nan),
        encode_coarse(inf),
        b"x" * 10,
        encode_coarse(states[2]),
        encode_coarse(model.init_state()),
    ]
    got = decode_coarse_many(raws, model.state_size)
    for raw, g in zip(raws, got, strict=True):
        try:
            want = decode_coarse(raw, model.state_size)
        except CorruptState as exc:
            assert isinstance(g, CorruptState) and str(g) == str(exc)
            continue
        if want is None:
            assert g is None
        else:
            np.testing.assert_array_equal(g, want)
            assert g.flags.writeable
    decoded = [g for g in got if isinstance(g, np.ndarray)]
    assert len(decoded) == 4 and not any(np.shares_memory(a, b) for a in decoded for b in decoded if a is not b)
    assert encode_coarse_many(np.stack(states)) == [encode_coarse(s) for s in states]
    assert encode_coarse_many(np.zeros((0, model.state_size))) == []


def _stored(ckpt: Checkpoint, codes: dict[str, bytes], applied: list[Accepted]) -> np.ndarray:
    """The records a history holds for these events, in the order applied."""
    rows = np.frombuffer(b"".join(codes[a.event.item_id] for a in applied), np.uint8).reshape(len(applied), -1)
    return records(
        rows, [a.event.scenario for a in applied], [a.event.action for a in applied], [a.event.ts for a in applied]
    )


def test_history_appends_then_trims_amortised(old):
    """Batches append records (the stored bytes equal the whole history encoded at once) until the history
    would pass cap + trim_slack(cap) records; then it is rewritten whole, trimmed to the newest cap.  Times go
    back between batches (a late event): a negative delta, decoded exactly."""
    codes = codes_of(old, range(20))
    mem, applied, rewrites = MemoryUsers(), [], 0
    rng = np.random.default_rng(5)
    offset = 0
    for b in range(100):
        n = int(rng.integers(1, 6))
        late = b % 7 == 3  # a batch of events from before the last one stored
        base = 1.7e9 + 3600.0 * (b - 3 if late else b)
        batch = [ev("u", int(rng.integers(0, 20)), offset + i, ts=base + 61.0 * i, scenario=i % 3) for i in range(n)]
        offset += n
        plans = run(mem, {"u": batch}, codes, ctx(old))
        up = plans["u"].update
        assert (up.history is None) != (up.records == b"")
        rewrites += up.history is not None
        applied += sorted(batch, key=lambda a: (a.event.ts, a.offset))
        stored = decode_history(mem.history["u"], old.codebook.cfg.bytes_per_item)
        want = _stored(old, codes, applied)
        if up.history is not None:
            assert len(stored) == CAP
        assert len(stored) <= CAP + trim_slack(CAP)
        np.testing.assert_array_equal(stored, want[-len(stored) :])
        assert mem.history["u"] == encode(stored)  # appends never differ from one encoding of the whole
    assert offset > 2 * CAP and 1 <= rewrites <= offset // trim_slack(CAP)


def test_an_event_whose_time_no_record_holds_is_dead_lettered(old):
    mem = MemoryUsers()
    plans = run(mem, {"u": [ev("u", 1, 1, ts=1e14)], "v": [ev("v", 1, 2)]}, codes_of(old, range(3)), ctx(old))
    assert plans["u"].poison and "time no history record holds" in plans["u"].poison and plans["v"].update is not None
    assert "u" not in mem.state and mem.state["v"]["seq"] == b"1"
