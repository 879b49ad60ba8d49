"""Coarse recommender: the O(1) incremental state equals a full recompute over the whole history."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.coarse import CoarseConfig, CoarseInterests

# float64 running sums vs a float32 batch softmax: agreement to 1e-4 absolute on O(1) outputs.
TOL = 1e-4


def _history(rng: np.random.Generator, n: int, cfg: CoarseConfig):
    items = rng.normal(size=(n, cfg.item_dim)).astype(np.float32)
    scen = rng.integers(0, cfg.num_scenarios, n)
    act = rng.integers(0, cfg.num_actions, n)
    ts = 1.6e9 + np.cumsum(rng.exponential(3600 * 5, n))  # ~5 h apart, spanning months
    return items, scen, act, ts


def _full(model: CoarseInterests, items, scen, act, ts) -> np.ndarray:
    with torch.inference_mode():
        out = model(
            torch.as_tensor(items)[None],
            torch.as_tensor(scen)[None],
            torch.as_tensor(act)[None],
            torch.as_tensor(ts)[None],
            torch.ones(1, len(ts), dtype=torch.bool),
        )
    return out[0].numpy()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_incremental_equals_full_recompute(seed, chunk):
    torch.manual_seed(seed)
    cfg = CoarseConfig(item_dim=24, num_scenarios=3, num_actions=5, d_model=32, interests=4, decay_per_day=0.05)
    model = CoarseInterests(cfg).eval()
    rng = np.random.default_rng(seed)
    items, scen, act, ts = _history(rng, 300, cfg)
    state = model.init_state()
    for i in range(0, len(ts), chunk):
        sl = slice(i, i + chunk)
        state = model.update(state, items[sl], scen[sl], act[sl], ts[sl])
    incremental = model.read(state)
    full = _full(model, items, scen, act, ts)
    assert incremental.shape == (4, 32)
    np.testing.assert_allclose(incremental, full, atol=TOL, rtol=0)
    assert state[0] == 300 and state.shape == (model.state_size,)


def test_state_does_not_depend_on_how_scenarios_interleave():
    """Topics interleave arbitrarily and parked events arrive late: same state in any order."""
    torch.manual_seed(3)
    cfg = CoarseConfig(item_dim=12, num_scenarios=3, num_actions=2, d_model=16, interests=3, decay_per_day=0.05)
    model = CoarseInterests(cfg).eval()
    items, scen, act, ts = _history(np.random.default_rng(3), 120, cfg)
    time_order = model.update(model.init_state(), items, scen, act, ts)
    by_scenario = model.init_state()
    for s in (2, 0, 1):  # all of scenario 2 first, then 0, then 1
        m = scen == s
        by_scenario = model.update(by_scenario, items[m], scen[m], act[m], ts[m])
    shuffled = np.random.default_rng(4).permutation(len(ts))
    any_order = model.init_state()
    for chunk in np.array_split(shuffled, 9):
        any_order = model.update(any_order, items[chunk], scen[chunk], act[chunk], ts[chunk])
    np.testing.assert_allclose(model.read(any_order), model.read(time_order), atol=1e-6)
    np.testing.assert_allclose(model.read(by_scenario), model.read(time_order), atol=1e-6)
    np.testing.assert_allclose(model.read(time_order), _full(model, items, scen, act, ts), atol=TOL)


def test_state_size_does_not_grow_with_history():
    cfg = CoarseConfig(item_dim=8, num_scenarios=1, num_actions=1)
    model = CoarseInterests(cfg).eval()
    items, scen, act, ts = _history(np.random.default_rng(0), 2000, cfg)
    s1 = model.update(model.init_state(), items[:10], scen[:10], act[:10], ts[:10])
    s2 = model.update(s1, items[10:], scen[10:], act[10:], ts[10:])
    assert s1.nbytes == s2.nbytes == model.state_size * 8


def test_decay_favours_recent_events():
    torch.manual_seed(0)
    # Both events fall in the same hour of day, so only the decay can tell the two histories apart.
    cfg = CoarseConfig(item_dim=8, num_scenarios=1, num_actions=1, d_model=16, interests=1, decay_per_day=5.0)
    model = CoarseInterests(cfg).eval()
    old, new = np.zeros((1, 8), np.float32), np.zeros((1, 8), np.float32)
    old[0, 0], new[0, 1] = 5.0, 5.0
    z = np.zeros(1, np.int64)
    s = model.update(
        model.init_state(), np.vstack([old, new]), np.zeros(2, np.int64), z.repeat(2), np.array([0.0, 30 * 86400])
    )
    only_new = model.update(model.init_state(), new, z, z, np.array([30 * 86400.0]))
    # After 30 days at λ=5/day the old event's weight is e^-150: the state reads as the new event alone.
    np.testing.assert_allclose(model.read(s), model.read(only_new), atol=1e-5)


def test_empty_state_and_bad_state():
    model = CoarseInterests(CoarseConfig(item_dim=4, num_scenarios=1, num_actions=1, d_model=8, interests=2)).eval()
    assert np.isfinite(model.read(model.init_state())).all()
    with pytest.raises(ValueError, match="coarse state"):
        model.update(np.zeros(3), np.zeros((1, 4), np.float32), np.zeros(1, int), np.zeros(1, int), np.zeros(1))


def test_update_many_equals_one_user_at_a_time():
    """The ingest path folds many users in one call: each user's state must be what its own update gives."""
    torch.manual_seed(3)
    cfg = CoarseConfig(item_dim=24, num_scenarios=3, num_actions=5, d_model=32, interests=4, decay_per_day=0.05)
    model = CoarseInterests(cfg).eval()
    rng = np.random.default_rng(3)
    users = 5
    states = np.stack([model.init_state() for _ in range(users)])
    states[1] = model.update(states[1], *_history(rng, 20, cfg))  # some users already have history
    states[3] = model.update(states[3], *_history(rng, 3, cfg))
    items, scen, act, ts = _history(rng, 40, cfg)
    owner = rng.integers(0, users - 1, 40)  # user 4 gets no events this batch
    got = model.update_many(states, items, scen, act, ts, owner)
    for u in range(users):
        mine = owner == u
        want = model.update(states[u], items[mine], scen[mine], act[mine], ts[mine])
        # float32 event terms: a batched matmul may sum in another order than a one-user call.
        np.testing.assert_allclose(got[u], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[4], states[4])
