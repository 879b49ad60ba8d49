"""The global temporal protocol's mechanics on a tiny hand-made log (no services, no training)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from models import temporal as tp
from models.data import _finish

DAY = tp.DAY


def tiny():
    """Users 0..3, items 0..5, times in days.  Cut at day 10 (test) and day 6 (validation)."""
    rows = [
        # user, item, day
        (0, 0, 1), (0, 1, 2), (0, 2, 8), (0, 3, 11), (0, 4, 12),
        (1, 0, 1), (1, 2, 3), (1, 1, 9), (1, 0, 9.5), (1, 5, 13),  # item 0 again after the cut: excluded
        (2, 1, 4), (2, 2, 9), (2, 4, 7),  # nothing after day 10: not scored on the test cut
        (3, 5, 14),  # no history before day 10: not scored
    ]  # fmt: skip
    u, i, d = (np.array(c) for c in zip(*rows, strict=True))
    return _finish(
        "tiny", ["feed"], ["click"], np.arange(6), [f"t{k}" for k in range(6)], np.arange(6) % 2,
        u, i, np.zeros(len(u), np.int64), np.zeros(len(u), np.int64), d * DAY,
    )  # fmt: skip


def test_before_keeps_only_events_before_the_cut():
    ds = tiny()
    train = tp.before(ds, 10 * DAY)
    assert train.ts.max() < 10 * DAY
    assert len(train.ts) == int((ds.ts < 10 * DAY).sum()) == 10
    assert train.n_users == ds.n_users and train.n_items == ds.n_items
    # per-user slices still line up with their own events, in time order
    for u in range(train.n_users):
        sl = train.user_slice(u)
        assert (train.user[sl] == u).all()
        assert (np.diff(train.ts[sl]) >= 0).all()
    assert train.lengths().tolist() == [3, 4, 3, 0]


def test_split_targets_users_and_exclusion():
    ds = tiny()
    split = tp.temporal_split(ds, 10 * DAY)
    assert [s.user for s in split.samples] == [0, 1]  # user 2: no future; user 3: no past
    assert split.samples[0].targets.tolist() == [3, 4]
    assert split.samples[1].targets.tolist() == [5]  # item 0 was seen before the cut
    assert [n.tolist() for n in split.next_item] == [[3], [5]]
    # histories index the training dataset and stop at the cut
    for s in split.samples:
        assert (split.train.ts[s.start : s.cut] < 10 * DAY).all()
    assert split.seen(split.samples[1]) == {0, 1, 2}
    # items 3 and 5 have no event before the cut: cold; targets are 3, 4, 5 → 2 of 3 cold
    assert split.cold_items().tolist() == [False, False, False, True, False, True]


def test_validation_cut_scores_only_its_window():
    ds = tiny()
    valid = tp.temporal_split(ds, 6 * DAY, 10 * DAY, "validation")
    assert valid.train.ts.max() < 6 * DAY
    got = {s.user: s.targets.tolist() for s in valid.samples}
    assert got == {0: [2], 1: [1], 2: [4, 2]}  # events in [6, 10) only; day 11+ never appear


def test_popularity_and_recent_popularity_by_hand():
    ds = tiny()
    split = tp.temporal_split(ds, 10 * DAY)
    # counts before day 10: item0 3 (u0, u1 twice), item1 3, item2 3, item4 1
    assert tp.item_counts(split.train).tolist() == [3, 3, 3, 0, 1, 0]
    ranked = tp.rank_baseline(split, tp.popularity_scores(split))
    # user 0 saw 0, 1, 2: then item 4 (1 event), then 3 and 5 (0 events, index order)
    assert ranked[0] == [4, 3, 5]
    # last 2.5 days (7.5 .. 10): item2 (day 8, 9), item1 (9), item0 (9.5), item4 no (day 7)
    recent = tp.item_counts(split.train, since=10 * DAY - 2.5 * DAY)
    assert recent.tolist() == [1, 1, 2, 0, 0, 0]
    ranked = tp.rank_baseline(split, tp.recent_popularity_scores(split, 2.5))
    assert ranked[1] == [4, 3, 5]  # user 1 saw 0, 1, 2; the rest all have 0 recent events: all-time count, index


def test_item_knn_and_transition_by_hand():
    ds = tiny()
    split = tp.temporal_split(ds, 10 * DAY)
    sim = tp.item_similarity(split.train)
    # users of item 0: {0, 1}; item 1: {0, 1, 2}; item 4: {2}
    assert sim[0, 1] == pytest.approx(2 / math.sqrt(2 * 3))
    assert sim[1, 4] == pytest.approx(1 / math.sqrt(3))
    assert sim[0, 4] == 0 and sim[3].sum() == 0 and np.diag(sim).sum() == 0
    one = tp.item_similarity(split.train, neighbours=1)
    assert (one > 0).sum(1).max() == 1
    # user 0's history 0, 1, 2: score of item 4 = sim(0,4) + sim(1,4) + sim(2,4)
    scores = tp.item_knn_scores(split, None)
    assert scores[0, 4] == pytest.approx(sim[0, 4] + sim[1, 4] + sim[2, 4])
    # transitions (time order): u0 0→1→2, u1 0→2→1→0, u2 1→4→2
    t = tp.transition_counts(split.train)
    assert t[0, 1] == 1 and t[0, 2] == 1 and t[2, 1] == 1 and t[1, 0] == 1 and t[1, 4] == 1 and t[4, 2] == 1
    assert t[1, 2] == 1 and t.sum() == 7
    # user 1's last item before the cut is 0 (day 9.5): its row ranks 1 and 2, both seen, so only ties remain
    assert tp.transition_scores(split)[1].tolist() == t[0].tolist()


def test_metrics_recall_ndcg_coverage_by_hand():
    ds = tiny()
    split = tp.temporal_split(ds, 10 * DAY)
    ranked = [[4, 5, 3], [3, 4, 5]]  # user 0 targets {3, 4}; user 1 targets {5}
    m = tp.evaluate_ranked(split, ranked)
    assert m["recall@10"] == pytest.approx((2 / 2 + 1 / 1) / 2)
    # user 0: hits at ranks 1 and 3 of ideal 2; user 1: hit at rank 3
    u0 = (1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    u1 = (1 / math.log2(4)) / 1
    assert m["ndcg@50"] == pytest.approx((u0 + u1) / 2)
    assert m["next_recall@10"] == pytest.approx(1.0)  # next items 3 and 5 are in both lists
    assert m["coverage@50"] == pytest.approx(3 / 6)
    assert m["cold_target_share"] == pytest.approx(2 / 3)
    first = tp.evaluate_ranked(split, [[4], [3]])
    assert first["recall@10"] == pytest.approx((1 / 2 + 0) / 2)
    assert first["next_recall@10"] == pytest.approx(0.0)  # user 0's next item is 3, not 4


def test_score_served_takes_the_asked_scenarios_rows_and_max_merges():
    ds = tiny()
    split = tp.temporal_split(ds, 10 * DAY)
    items = np.eye(6, dtype=np.float32)
    # user 0: two interests pointing at items 3 and 4 (its targets); user 1 missing → a miss
    vectors = {"0": np.stack([items[3], 0.9 * items[4]])}
    m = tp.score_served(split, vectors, items, interests=2)
    assert m["recall@10"] == pytest.approx((1.0 + 0.0) / 2)
    # the same through rank_vectors directly: seen items never come back
    ranked = tp.rank_vectors(np.stack([vectors["0"]]), items, [split.seen(split.samples[0])])
    assert ranked[0][:2] == [3, 4] and not {0, 1, 2} & set(ranked[0])


def test_choose_baselines_picks_the_best_validation_window():
    ds = tiny()
    valid = tp.temporal_split(ds, 6 * DAY, 10 * DAY, "validation")
    choices, grid = tp.choose_baselines(valid)
    best = max(v["recall@50"] for v in grid["recent_popularity"].values())
    assert grid["recent_popularity"][choices["recent_window_days"]]["recall@50"] == best
    assert set(grid["item_knn"]) == set(tp.KNN_NEIGHBOURS)


def test_decayed_counts_match_the_streaming_update_rule():
    ds = tiny()
    tau = 3.0
    at = 10 * DAY
    got = tp.decayed_counts(ds, at, tau)
    # the stream's rule, event by event in time order: c ← c·exp(-(t − t_last)/τ) + 1, read at ``at``
    c, last = np.zeros(ds.n_items), np.zeros(ds.n_items)
    for k in np.argsort(ds.ts, kind="stable"):
        if ds.ts[k] >= at:
            continue
        i = ds.item[k]
        c[i] = c[i] * math.exp(-(ds.ts[k] - last[i]) / (tau * DAY)) + 1.0
        last[i] = ds.ts[k]
    expect = c * np.exp(-(at - last) / (tau * DAY))
    np.testing.assert_allclose(got, np.where(c > 0, expect, 0.0), rtol=1e-9)
    assert got[3] == 0 and got[5] == 0  # their events are after the cut
    np.testing.assert_allclose(tp.trend_feature(ds, at, tau), np.log1p(got), rtol=1e-6)


def test_merge_reports_pools_seeds_and_refuses_other_choices(tmp_path):
    from models.temporal_run import merge_reports

    def report(seed, r50, choices):
        m = {"recall@10": 0.0, "recall@50": r50, "recall@200": 0.0, "ndcg@50": 0.0, "next_recall@50": 0.0}
        m["coverage@50"] = 0.1
        m["cold_target_share"] = 0.03
        split = {"users": 1, "targets": 1}
        return {
            "dataset": "tiny", "test_quantile": 0.9, "seeds": [seed], "choices": choices,
            "splits": {"test": split, "validation": split}, "validation": {"hybrid": m},
            "test_per_seed": {"hybrid": [m], "popularity": [{**m, "recall@50": 0.2}]},
        }  # fmt: skip

    paths = []
    for seed, r50 in ((0, 0.3), (1, 0.4)):
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(report(seed, r50, {"k": 1})))
    merged = merge_reports(paths, tmp_path / "out")
    assert merged["seeds"] == [0, 1]
    assert merged["test"]["hybrid"]["recall@50"] == pytest.approx((0.35, 0.05))
    assert merged["test"]["popularity"]["recall@50"] == pytest.approx((0.2, 0.0))
    assert "0.3500 ± 0.0500" in (tmp_path / "out" / "temporal.md").read_text()
    other = tmp_path / "other.json"
    other.write_text(json.dumps(report(2, 0.5, {"k": 2})))
    with pytest.raises(ValueError):
        merge_reports([paths[0], other], tmp_path / "bad")
