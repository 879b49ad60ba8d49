"""Refiner: shapes, normalisation, scenario-aware queries, batch == single, 2-D mixing quotas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.item_tower import ProjectionHead
from models.refiner import Refiner, RefinerConfig, UserInput, select_recent


def _user(rng, n: int, item_dim=16, coarse_dim=12, m=4, scenarios=3) -> UserInput:
    return UserInput(
        coarse=rng.normal(size=(m, coarse_dim)).astype(np.float32),
        items=rng.normal(size=(n, item_dim)).astype(np.float32),
        scenario=rng.integers(0, scenarios, n),
        action=rng.integers(0, 2, n),
        ts=np.sort(rng.uniform(0, 1e6, n)),
    )


@pytest.fixture(scope="module")
def refiner() -> Refiner:
    torch.manual_seed(0)
    cfg = RefinerConfig(
        item_dim=16,
        coarse_dim=12,
        num_scenarios=3,
        num_actions=2,
        interests=3,
        recent=10,
        quotas=(5, 3, 3),
        hidden=32,
        layers=2,
        heads=2,
        intermediate=64,
    )
    return Refiner(cfg, ProjectionHead(16, 8)).eval()


def test_shapes_and_unit_norm(refiner):
    rng = np.random.default_rng(0)
    out = refiner.refine([_user(rng, 30), _user(rng, 4)], scenarios=[0, 2])
    assert out.shape == (2, 2, 3, 8)
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)
    # The K queries give K different vectors, and each scenario asks for its own view.
    assert np.abs(out[0, 0, 0] - out[0, 0, 1]).max() > 1e-3
    assert np.abs(out[0, 0] - out[0, 1]).max() > 1e-3


def test_batch_equals_single(refiner):
    rng = np.random.default_rng(1)
    users = [_user(rng, n) for n in (25, 3, 10, 1, 0)]
    batched = refiner.refine(users, scenarios=[0, 1, 2])
    for i, u in enumerate(users):
        np.testing.assert_allclose(batched[i], refiner.refine([u], scenarios=[0, 1, 2])[0], atol=1e-5)


def test_select_recent_respects_quotas_and_time_order():
    scen = np.array([0] * 10 + [1] * 2 + [0] * 5 + [2] * 6)
    ts = np.arange(len(scen), dtype=float)
    picked = select_recent(scen, ts, n=10, quotas=(4, 3, 3))
    assert list(picked) == sorted(picked)
    counts = np.bincount(scen[picked], minlength=3)
    # scenario 1 has only 2 events: its spare slot goes to the newest remaining (scenario 0 or 2) events.
    assert counts[1] == 2 and counts.sum() == 10 and counts[0] >= 4 and counts[2] >= 3
    assert list(select_recent(scen, ts, n=50, quotas=(1, 1, 1))) == list(range(len(scen)))


def test_truncated_backbone_layers():
    cfg = RefinerConfig(
        item_dim=8,
        coarse_dim=8,
        num_scenarios=1,
        num_actions=1,
        hidden=32,
        layers=4,
        heads=2,
        intermediate=64,
        backbone_layers=1,
    )
    model = Refiner(cfg, ProjectionHead(8, 4))
    assert len(model.backbone.layers) == 1


def test_shared_prefix_cache_equals_one_row_per_scenario(refiner):
    """``refine`` runs the prefix once and each scenario's queries on its KV cache: same as ``forward``."""
    from models.refiner import collate

    rng = np.random.default_rng(4)
    users = [_user(rng, n) for n in (25, 3, 0)]
    scenarios = [2, 0, 1]
    fast = refiner.refine(users, scenarios)
    with torch.inference_mode():
        rows = [(i, s) for i in range(len(users)) for s in scenarios]
        slow = refiner(**collate(refiner.cfg, users, rows)).reshape(len(users), len(scenarios), 3, -1).numpy()
    np.testing.assert_allclose(fast, slow, atol=1e-5)


def test_a_history_cut_to_what_select_recent_picks_refines_to_the_same_vectors(refiner):
    """The worker decodes only the events ``select_recent`` picks (``streams.refinement.user_inputs``):
    the refiner must give the same vectors as from the whole history, quotas included."""
    rng = np.random.default_rng(3)
    users = [_user(rng, n) for n in (0, 4, 10, 37, 300)]
    cfg = refiner.cfg
    cut = []
    for u in users:
        p = select_recent(u.scenario, u.ts, cfg.recent, cfg.quotas)
        assert len(select_recent(u.scenario[p], u.ts[p], cfg.recent, cfg.quotas)) == len(p)
        cut.append(UserInput(u.coarse, u.items[p], u.scenario[p], u.action[p], u.ts[p]))
    np.testing.assert_array_equal(refiner.refine(cut, [0, 1, 2]), refiner.refine(users, [0, 1, 2]))
