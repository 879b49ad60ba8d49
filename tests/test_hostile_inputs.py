"""Well-formed events with hostile values: each one is applied, parked or dead-lettered with a reason,
and no user state ever holds a NaN or an infinity.  The validation (``streams.events``) and the planner
run as the agents run them; the writes go to the in-memory reference of the Lua scripts."""

from __future__ import annotations

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_planner import read, write

from models.user_model import Checkpoint
from state.memory import MemoryUsers
from state.users import decode_coarse
from streams.events import MAX_VECTOR_VALUE, Limits, Message, Rejected, parse_event, parse_item
from streams.planner import Accepted, PlanContext, plan

NOW = 1.8e9
LIMITS = Limits(65536)
TOPIC = "t.events.feed"

hostile_ts = st.one_of(
    st.floats(min_value=1e-300, max_value=NOW + LIMITS.max_future_s, allow_nan=False),
    st.sampled_from([1e-300, 1.0, 8.9e8, NOW, NOW + LIMITS.max_future_s, 1e300, 4.1e9]),
)
hostile_id = st.one_of(
    st.text(min_size=1, max_size=12),
    st.sampled_from(["u\u202e1", "u\x1b[2J", "u\n1", "{u}", "x" * 129, "u1"]),
)
event = st.fixed_dictionaries(
    {
        "event_id": hostile_id,
        "user_id": st.sampled_from(["u1", "u2", "u3"]) | hostile_id,
        "item_id": st.sampled_from(["0", "1", "2", "big", "tiny", "unknown"]),
        "scenario": st.sampled_from(["feed", "ads"]),
        "action": st.sampled_from(["click", "like", "nope"]),
        "ts": hostile_ts,
    }
)


@pytest.fixture(scope="module")
def ckpt(sim_checkpoint) -> Checkpoint:
    return Checkpoint.load(sim_checkpoint)


def _codes(ckpt: Checkpoint) -> dict[str, bytes | None]:
    """Known items, two of them at the edges of what ``parse_item`` accepts; "unknown" is not stored."""
    d = ckpt.codebook.cfg.dim
    vectors = {str(i): ckpt.item_vectors[i] for i in range(3)}
    vectors["big"] = np.full(d, MAX_VECTOR_VALUE, np.float32)
    vectors["tiny"] = np.full(d, 1e-6, np.float32)
    for name, v in vectors.items():  # what the item agent would accept
        parse_item(orjson.dumps({"item_id": name, "vector": v.tolist()}), d, 65536)
    recs = ckpt.codebook.encode(np.stack(list(vectors.values()))).records()
    return {**{name: recs[i].tobytes() for i, name in enumerate(vectors)}, "unknown": None}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(event, min_size=1, max_size=12), min_size=1, max_size=4))
def test_hostile_events_are_applied_or_rejected_and_never_poison_state(ckpt, batches):
    scenarios, actions = ckpt.model.cfg.scenarios, ckpt.model.cfg.actions
    mem, codes, offset = MemoryUsers(), _codes(ckpt), 0
    ctx = PlanContext(ckpt, {ckpt.codebook_id: ckpt.codebook}, 100)
    for batch in batches:
        accepted: dict[str, list[Accepted]] = {}
        outcome: dict[str, str] = {}
        for body in batch:
            offset += 1
            origin = f"{TOPIC}:0:{offset}"
            try:
                e = parse_event(orjson.dumps(body), "feed", scenarios, actions, LIMITS, b"k" * 32, NOW)
            except Rejected as exc:
                assert str(exc), "a rejection has a reason"
                outcome[origin] = "rejected"
                continue
            msg = Message(TOPIC, 0, offset, e.user_id.encode(), b"", NOW)
            accepted.setdefault(e.user_id, []).append(Accepted(e, msg, origin, False))
        handled: set[str] = set()
        pending = accepted
        while pending:  # read → plan → write until no conflict, as the ingest shell does
            rows = read(mem, pending)
            plans = plan(rows, pending, codes, ctx, handled)
            for p in plans.values():
                for a in p.applied:
                    outcome[a.origin] = "applied"
                for a in p.park:
                    outcome[a.origin] = "parked"
                for a in p.dead:
                    assert p.poison, "a dead-lettered event has a reason"
                    outcome[a.origin] = "dead"
            left = write(mem, rows, plans, handled)
            pending = {u: pending[u] for u in left}
        assert len(outcome) == len(batch), "every event is applied, parked or dead-lettered"
        assert "dead" not in outcome.values(), "bounded inputs never make a user poison"
        for user, h in mem.state.items():
            state = decode_coarse(mem.coarse.get(user), ckpt.model.coarse.state_size)
            assert state is None or not (np.isnan(state).any() or np.isposinf(state).any()), user
            assert np.isfinite(float(h.get("last_ts", b"0"))), user
