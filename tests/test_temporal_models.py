"""The temporal protocol's model pieces on tiny inputs: no post-cut data in training, the global sampler's
gap, the trend coordinate in the loss and in the served vectors, item-ID embeddings for known items only."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from models import temporal as tp
from models.batches import Sample, global_train_samples, make_batch
from models.data import _finish
from models.losses import DMILLoss
from models.refiner import UserInput
from models.train import TrainConfig, TrendCache, model_config, train_user_model
from models.user_model import ModelConfig, UserModel

DAY = tp.DAY


def log(users=6, items=12, seed=0):
    """Every user rates items on days 0..29, one a day, starting at a user-specific item."""
    rng = np.random.default_rng(seed)
    u, i, d = [], [], []
    for user in range(users):
        for day in range(30):
            u.append(user)
            i.append((user + day) % items)
            d.append(day + rng.uniform(0, 0.5))
    u, i, d = np.array(u), np.array(i), np.array(d)
    vectors = rng.normal(size=(items, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return _finish(
        "toy", ["feed"], ["click"], np.arange(items), [f"t{k}" for k in range(items)], np.arange(items) % 3,
        u, i, np.zeros(len(u), np.int64), np.zeros(len(u), np.int64), d * DAY, item_vectors=vectors,
    )  # fmt: skip


def test_global_samples_predict_across_a_gap_inside_the_training_data():
    ds = tp.before(log(), 20 * DAY)
    limit = ds.offsets[1:].copy()
    samples = global_train_samples(ds, limit, np.random.default_rng(0), window=4, cuts=10, horizon_days=5)
    assert samples
    for s in samples:
        hist = ds.ts[s.start : s.cut]
        assert (hist < s.at).all() and len(hist) >= 3  # the history ends before t*
        user_ts = ds.ts[ds.user_slice(s.user)]
        user_items = ds.item[ds.user_slice(s.user)]
        ahead = user_items[(user_ts >= s.at) & (user_ts < s.at + 5 * DAY)]
        assert set(s.targets.tolist()) <= set(ahead.tolist())  # targets: after t*, within the horizon
        assert not set(s.targets.tolist()) & set(ds.item[s.start : s.cut].tolist())
        assert len(s.targets) <= 4
        assert s.at < 20 * DAY


def test_trend_cache_reads_only_training_events_before_the_time():
    ds = log()
    limit = ds.offsets[1:].copy()
    limit[0] = ds.offsets[0] + 10  # user 0's training stops after its 10th event
    cache = TrendCache(ds, limit, tau_days=2.0)
    t = 15.3 * DAY
    hour = math.floor(t / 3600) * 3600
    keep = np.zeros(len(ds.ts), bool)
    for u in range(ds.n_users):
        keep[ds.offsets[u] : limit[u]] = True
    keep &= ds.ts < hour
    expect = np.bincount(ds.item[keep], weights=np.exp(-(hour - ds.ts[keep]) / (2 * DAY)), minlength=ds.n_items)
    np.testing.assert_allclose(cache.at(t), np.log1p(expect), rtol=1e-5)


def test_loss_with_trend_scores_the_inner_product_of_the_served_vectors():
    torch.manual_seed(0)
    loss = DMILLoss(served_weight=1.0, dmil_weight=0.0)
    d, n = 4, 6
    items = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    trend = torch.rand(1, n) * 3
    u = torch.nn.functional.normalize(torch.randn(1, 1, d), dim=-1)
    w = torch.tensor([[[0.7]]])
    target = torch.tensor([[2]])
    valid = torch.ones(1, 1, dtype=torch.bool)
    neg_ids = torch.tensor([0, 1, 3, 4, 5])
    got = loss(torch.cat([u, w], -1), items[target], target, valid, items[neg_ids], neg_ids, None, trend)
    served = torch.cat([u[0, 0], w[0, 0]]) @ torch.cat([items, trend.T], 1).T  # (n,)
    cand = torch.tensor([2, 0, 1, 3, 4, 5])
    expect = torch.nn.functional.cross_entropy((loss.scale() * served[cand])[None], torch.tensor([0]))
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
    # with the trend weight at 0 the trend changes nothing
    zero = loss(torch.cat([u, 0 * w], -1), items[target], target, valid, items[neg_ids], neg_ids, None, trend)
    plain = loss(u, items[target], target, valid, items[neg_ids], neg_ids)
    assert zero.item() == pytest.approx(plain.item(), rel=1e-5)


def _tiny_model(ds, **opts) -> UserModel:
    cfg = TrainConfig(coarse_dim=8, coarse_interests=2, recent=8, retrieval_dim=8, interests=2, **opts)
    mcfg = model_config(ds, cfg, ds.item_vectors.shape[1])
    mcfg = replace(mcfg, refiner=replace(mcfg.refiner, hidden=16, layers=1, heads=2, intermediate=32))
    torch.manual_seed(0)
    return UserModel(mcfg)


def test_item_ids_only_for_items_seen_in_training():
    ds = tp.before(log(), 20 * DAY)
    model = _tiny_model(ds, id_embeddings=True).eval()
    with pytest.raises(ValueError):
        model.retrieval_vectors(ds.item_vectors)  # an ID model cannot be served without the ids
    known = np.zeros(ds.n_items, bool)
    known[:6] = True
    model.id_known.copy_(torch.as_tensor(known))
    torch.nn.init.normal_(model.item_ids.weight)
    content = model.item_tower.retrieval_head(torch.as_tensor(ds.item_vectors)).detach().numpy()
    ids = np.arange(ds.n_items)
    ids[3] = -1  # an item the checkpoint's table does not hold
    got = model.retrieval_vectors(ds.item_vectors, ids=ids)
    np.testing.assert_allclose(got[~known], content[~known], atol=1e-6)  # cold: content alone
    np.testing.assert_allclose(got[3], content[3], atol=1e-6)
    assert np.abs(got[[0, 1, 2, 4, 5]] - content[[0, 1, 2, 4, 5]]).max() > 1e-2
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_trend_model_stream_path_equals_batch_path_and_scores_the_trend():
    ds = tp.before(log(), 20 * DAY)
    model = _tiny_model(ds, trend=True).eval()
    assert isinstance(model.cfg, ModelConfig) and model.cfg.refiner.trend
    with torch.no_grad():
        model.refiner.trend_out.bias.fill_(0.5)
    s = Sample(1, int(ds.offsets[1]), int(ds.offsets[2]), np.array([0]), 0)
    inputs = ds.item_vectors
    with torch.inference_mode():
        batch = model.interests(make_batch(ds, [s], inputs, model.cfg, len(s.targets))).numpy()[0]
    # the stream: coarse state folded event by event, then refine_users on the recent events
    sl = slice(s.start, s.cut)
    events = (inputs[ds.item[sl]], ds.scenario[sl], ds.action[sl], ds.ts[sl])
    state = model.coarse.update(model.coarse.init_state(), *events)
    user = UserInput(model.coarse.read(state), *events)
    stream = model.refine_users([user], [0])[0, 0]
    assert batch.shape == stream.shape == (2, 9)  # K × (d + 1)
    np.testing.assert_allclose(stream, batch, atol=1e-4)
    trend = tp.trend_feature(ds, 20 * DAY, 3.0)
    items = model.retrieval_vectors(ds.item_vectors, trend=trend)
    assert items.shape == (ds.n_items, 9)
    np.testing.assert_allclose(items[:, -1], trend)
    # served score = cosine + (w / scale) · trend
    w = batch[:, -1]
    assert (w != 0).all()
    scores = batch @ items.T
    np.testing.assert_allclose(scores, batch[:, :-1] @ items[:, :-1].T + np.outer(w, trend), rtol=1e-5, atol=1e-6)


def test_training_on_the_cut_dataset_never_sees_later_events():
    full = log()
    cut = 20 * DAY
    ds = tp.before(full, cut)
    model = _tiny_model(ds, id_embeddings=True, trend=True)
    seen_ts: list[float] = []
    real = make_batch

    def spy(ds_, samples, *a, **k):
        for s in samples:
            seen_ts.extend(ds_.ts[s.start : s.cut].tolist())
            seen_ts.extend(ds_.ts[ds_.offsets[s.user] : ds_.offsets[s.user + 1]][np.isin(
                ds_.item[ds_.offsets[s.user] : ds_.offsets[s.user + 1]], s.targets)].tolist())  # fmt: skip
            assert s.at is None or s.at < cut
        return real(ds_, samples, *a, **k)

    import models.train as train_mod

    cfg = TrainConfig(steps=3, batch_size=8, negatives=6, window=4, sampler="global", trend=True, id_embeddings=True)
    orig = train_mod.make_batch
    train_mod.make_batch = spy
    try:
        train_user_model(ds, model, ds.item_vectors, ds.item_vectors, ds.offsets[1:].copy(), cfg, progress=False)
    finally:
        train_mod.make_batch = orig
    assert seen_ts and max(seen_ts) < cut
    # the ID table knows exactly the items with events before the cut
    before_cut = np.bincount(ds.item, minlength=ds.n_items) > 0
    assert model.id_known.numpy().tolist() == before_cut.tolist()


def test_served_trend_gain_scales_only_the_trend_weight_and_tau_is_the_served_one():
    ds = tp.before(log(), 20 * DAY)
    model = _tiny_model(ds, trend=True).eval()
    with torch.no_grad():
        model.refiner.trend_out.bias.fill_(0.5)
    s = Sample(1, int(ds.offsets[1]), int(ds.offsets[2]), np.array([0]), 0)
    served = model.with_served_trend(2.5, tau_days=14.0)
    with torch.inference_mode():
        a = model.interests(make_batch(ds, [s], ds.item_vectors, model.cfg, 1)).numpy()[0]
        b = served.interests(make_batch(ds, [s], ds.item_vectors, served.cfg, 1)).numpy()[0]
    np.testing.assert_allclose(b[:, :-1], a[:, :-1], atol=1e-6)  # the interests' directions are untouched
    np.testing.assert_allclose(b[:, -1], 2.5 * a[:, -1], rtol=1e-5)
    assert served.cfg.trend_tau_days == 14.0 and served.trend_tau_s == 14.0 * DAY  # what the stream reads
    assert model.cfg.trend_tau_days == 30.0  # the trained model is left as it was
    with pytest.raises(ValueError):
        _tiny_model(ds).with_served_trend(2.0)


def test_recency_weighted_sample_times_lean_toward_the_end_of_the_training_data():
    ds = tp.before(log(items=40), 20 * DAY)  # no item comes back: every time has unseen items ahead
    limit = ds.offsets[1:].copy()
    times = {}
    for recency in (None, 2.0):
        rng = np.random.default_rng(0)
        got = global_train_samples(ds, limit, rng, window=4, cuts=200, horizon_days=5, recency_days=recency)
        times[recency] = np.array([s.at for s in got]) / DAY
        assert (times[recency] < 20).all()
    assert np.median(times[2.0]) > 15 > np.median(times[None])  # uniform over days 1..20 has its median near 10


def test_serving_grid_scores_each_gain_and_tau_and_records_the_choice_for_the_test_cut():
    from models.temporal_run import Stage12, rank_user_model, served_choices, serving_grid

    split = tp.temporal_split(log(items=40), 20 * DAY, 25 * DAY)
    stage = Stage12(split, TrainConfig(codewords=8, codebook_layers=1, retrieval_dim=8), progress=False)
    model = _tiny_model(split.train, trend=True).eval()
    with torch.no_grad():
        model.refiner.trend_out.bias.fill_(0.5)
    grid, best = serving_grid(split, model, stage, (1.0, 3.0), (7.0,))
    assert set(grid) == {"gain 1, tau train", "gain 1, tau 7", "gain 3, tau train", "gain 3, tau 7"}
    assert grid["gain 1, tau train"] == tp.evaluate_ranked(split, rank_user_model(split, model, stage))
    assert grid["gain 3, tau 7"] == tp.evaluate_ranked(
        split, rank_user_model(split, model.with_served_trend(3.0, 7.0), stage)
    )
    assert grid[f"gain {best[0]:g}, tau {'train' if best[1] is None else f'{best[1]:g}'}"]["recall@50"] == max(
        g["recall@50"] for g in grid.values()
    )
    choices = {"hybrid_trend_gain": 3.0, "hybrid_serve_tau_days": 7.0}
    assert served_choices(choices, "hybrid") == {"trend_gain": 3.0, "serve_tau_days": 7.0}
    assert served_choices(choices, "full") == {"trend_gain": 1.0, "serve_tau_days": None}  # none chosen: as trained


def test_two_trend_coordinates_read_only_the_past_and_score_the_served_inner_product():
    """A short and a long trend coordinate: each column of the training rows is its own τ's decayed count of
    training events before the time; served vectors are K × (d + 2) and score u · ret + w · (trend_s, trend_l)."""
    full = log()
    cut = 20 * DAY
    ds = tp.before(full, cut)
    limit = ds.offsets[1:].copy()
    cache = TrendCache(ds, limit, (2.0, 30.0))
    t = 15.3 * DAY
    row = cache.at(t)
    assert row.shape == (ds.n_items, 2)
    np.testing.assert_allclose(row[:, 0], TrendCache(ds, limit, 2.0).at(t), rtol=1e-6)
    np.testing.assert_allclose(row[:, 1], TrendCache(ds, limit, 30.0).at(t), rtol=1e-6)
    # read at the cut, from the cut dataset: the same as from the whole log (no later event counted)
    for tau in (3.0, 30.0):
        np.testing.assert_allclose(tp.trend_feature(ds, cut, tau), tp.trend_feature(full, cut, tau), rtol=1e-6)

    model = _tiny_model(ds, trend=True, trend_long_tau_days=30.0, trend_tau_days=3.0).eval()
    assert model.trend_taus_days == (3.0, 30.0) and model.refiner.trend_out.out_features == 2
    with pytest.raises(ValueError):
        _ = model.trend_tau_s  # the stream keeps one count per item: not servable there yet
    with torch.no_grad():
        model.refiner.trend_out.bias.copy_(torch.tensor([0.5, -0.25]))
    s = Sample(1, int(ds.offsets[1]), int(ds.offsets[2]), np.array([0]), 0)
    with torch.inference_mode():
        user = model.interests(make_batch(ds, [s], ds.item_vectors, model.cfg, 1)).numpy()[0]
    trend = np.stack([tp.trend_feature(ds, cut, tau) for tau in model.trend_taus_days], 1)
    items = model.retrieval_vectors(ds.item_vectors, trend=trend)
    assert user.shape == (2, 10) and items.shape == (ds.n_items, 10)
    w = user[:, -2:]
    np.testing.assert_allclose(user @ items.T, user[:, :-2] @ items[:, :-2].T + w @ trend.T, rtol=1e-5, atol=1e-6)

    # the loss with two coordinates == the one-coordinate loss on their weighted sum when one weight is 0
    torch.manual_seed(0)
    loss = DMILLoss(served_weight=1.0, dmil_weight=0.0)
    d, n = 4, 6
    vecs = torch.nn.functional.normalize(torch.randn(n, d), dim=-1)
    tr = torch.rand(1, n, 2) * 3
    u = torch.nn.functional.normalize(torch.randn(1, 1, d), dim=-1)
    target, valid, neg_ids = torch.tensor([[2]]), torch.ones(1, 1, dtype=torch.bool), torch.tensor([0, 1, 3, 4, 5])
    two = loss(torch.cat([u, torch.tensor([[[0.7, 0.0]]])], -1), vecs[target], target, valid, vecs[neg_ids], neg_ids,
               None, tr)  # fmt: skip
    one = loss(torch.cat([u, torch.tensor([[[0.7]]])], -1), vecs[target], target, valid, vecs[neg_ids], neg_ids,
               None, tr[..., 0])  # fmt: skip
    assert two.item() == pytest.approx(one.item(), rel=1e-6)
    served = torch.cat([u[0, 0], torch.tensor([0.3, 0.9])]) @ torch.cat([vecs, tr[0]], 1).T
    got = loss(torch.cat([u, torch.tensor([[[0.3, 0.9]]])], -1), vecs[target], target, valid, vecs[neg_ids], neg_ids,
               None, tr)  # fmt: skip
    cand = torch.tensor([2, 0, 1, 3, 4, 5])
    expect = torch.nn.functional.cross_entropy((loss.scale() * served[cand])[None], torch.tensor([0]))
    assert got.item() == pytest.approx(expect.item(), rel=1e-5)
