"""The item trend counts (``state.trend``): what the agents keep per item equals what training computes
from a dataset (``models.temporal.trend_feature``), in any arrival order, and a redelivery adds nothing."""

from __future__ import annotations

import numpy as np

from models.data import Dataset
from models.temporal import trend_feature
from state.trend import fold, trend_at

DAY = 86400.0


def _events(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 3, n), np.sort(rng.uniform(0, 20 * DAY, n))


def test_fold_equals_the_decayed_sum_in_any_arrival_order():
    _, ts = _events()
    tau, at = 3 * DAY, 21 * DAY
    want = np.log1p(np.exp(-(at - ts) / tau).sum())
    for order in (np.arange(len(ts)), np.random.default_rng(1).permutation(len(ts))):
        c, last, counted, added = fold(0.0, None, -1, [(i, float(ts[j])) for i, j in enumerate(order)], tau)
        assert added == len(ts) and counted == len(ts) - 1
        assert abs(float(trend_at(np.array([c]), np.array([last]), at, tau)[0]) - want) < 1e-6  # float32 output


def test_a_redelivered_or_replayed_offset_is_counted_once():
    _, ts = _events(10)
    events = [(100 + i, float(t)) for i, t in enumerate(ts)]
    tau = 3 * DAY
    once = fold(0.0, None, -1, events, tau)
    # the first half, then a redelivery of everything (a crash before the commit): the second half only adds
    half = fold(0.0, None, -1, events[:5], tau)
    again = fold(half[0], half[1], half[2], events, tau)
    assert again[3] == 5 and abs(again[0] - once[0]) < 1e-12 and again[1:3] == once[1:3]
    assert fold(*once[:3], events, tau)[3] == 0


def test_the_served_coordinate_is_the_training_feature():
    """Per item: the agents' counts read at the cut == ``trend_feature`` of the events before it."""
    items, ts = _events(60, seed=3)
    n = len(ts)
    ds = Dataset(
        name="tiny",
        scenarios=("feed",),
        actions=("click",),
        item_ids=np.array(["a", "b", "c"]),
        item_text=["a", "b", "c"],
        item_category=np.zeros(3, np.int64),
        user=np.zeros(n, np.int64),
        item=items,
        scenario=np.zeros(n, np.int64),
        action=np.zeros(n, np.int64),
        ts=ts,
        offsets=np.array([0, n]),
        user_ids=np.array(["u"]),
    )
    cut, tau_days = float(ts[45]), 3.0
    want = trend_feature(ds, cut, tau_days)
    count, last = np.zeros(3), np.zeros(3)
    for it in range(3):
        before = [(i, float(t)) for i, t in enumerate(ts) if items[i] == it and t < cut]
        c, t_last, _, added = fold(0.0, None, -1, before, tau_days * DAY)
        count[it], last[it] = (c, t_last) if added else (0.0, 0.0)
    np.testing.assert_allclose(trend_at(count, last, cut, tau_days * DAY), want, rtol=1e-6, atol=1e-7)
