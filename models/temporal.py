"""Global temporal protocol: train on everything before a time cut, score what users do after it.

One global cut ``T`` at a quantile of all event times (0.9 by default).  Training data is every event
with ``ts < T``, and nothing else reaches a trainer: ``before(ds, T)`` builds a dataset without the
later rows, and every method (baselines and models) is fitted on that dataset only.  Targets are the
events at or after ``T`` of the users who have history before ``T``; items the user had before ``T``
are excluded from both the ranking and the targets (the same exclusion for every method).  Candidates
are the whole catalogue for every method (an item with no event before the cut is *cold*: it can be a
target, and only content can rank it).

Every choice (a baseline's window or neighbourhood, a model's steps, K, the trend's time constant) is
made on a validation cut inside the training period: train on ``ts < Tv`` (the 0.8 quantile), score
``[Tv, T)``.  The test period is then looked at once, by methods refitted on ``ts < T`` with the chosen
settings.  ``models.evaluate`` keeps the older per-user leave-last-W-out protocol as a secondary one.

Two target columns per split: **all** (every post-cut unseen item of the user, recall = hits in the top
k / number of targets) and **next** (the first post-cut unseen item only).  Figures: Recall@10/50/200,
NDCG@50, catalogue coverage@50 (distinct items in all users' top 50 / catalogue size) and the cold-item
share of the targets.

Baselines (documented here, checked by hand in ``tests/test_temporal.py``); ties in every score are
broken by all-time popularity before the cut, then by item index:

- ``popularity``: number of events of the item before the cut;
- ``recent_popularity``: number of events in ``[cut - window, cut)``;
- ``item_knn``: binary user × item matrix before the cut, cosine item-item similarity
  ``|U_i ∩ U_j| / sqrt(|U_i| |U_j|)`` (self-similarity 0), each item keeping its ``neighbours`` most
  similar items; user score = sum of the similarity rows of the items in the user's history;
- ``transition``: count of ``a → b`` where ``b`` directly follows ``a`` in a user's time-ordered history
  before the cut; user score = the row of the user's last item.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from models.batches import Sample
from models.data import Dataset
from models.metrics import item_index, multi_interest_topk, ndcg_at_k

DAY = 86400.0
KS = (10, 50, 200)
DEPTH = max(KS)


# --------------------------------------------------------------------------------------------- the split
def cut_time(ds: Dataset, quantile: float) -> float:
    """The time at ``quantile`` of all event times."""
    return float(np.quantile(ds.ts, quantile))


def before(ds: Dataset, cut: float) -> Dataset:
    """The dataset with only the events at ``ts < cut``: every user and item kept (a user may have none)."""
    keep = ds.ts < cut
    user = ds.user[keep]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(user, minlength=ds.n_users))])
    query = [q for q, k in zip(ds.query, keep.tolist(), strict=True) if k] if ds.query is not None else None
    return replace(
        ds,
        user=user,
        item=ds.item[keep],
        scenario=ds.scenario[keep],
        action=ds.action[keep],
        ts=ds.ts[keep],
        offsets=offsets,
        query=query,
    )


@dataclass
class TemporalSplit:
    """One cut: the training dataset (events before ``cut``) and the samples to score on ``[cut, end)``."""

    name: str
    cut: float
    end: float
    train: Dataset  # ``before(ds, cut)``: the only data any method is fitted on
    samples: list[Sample]  # indices into ``train``; one per (user, scenario) with history and targets
    next_item: list[np.ndarray]  # per sample: the first post-cut unseen item (one item)

    def seen(self, s: Sample) -> set[int]:
        return set(self.train.item[s.start : s.cut].tolist())

    def cold_items(self) -> np.ndarray:
        """(n_items,) True for items with no event before the cut."""
        return np.bincount(self.train.item, minlength=self.train.n_items) == 0


def temporal_split(ds: Dataset, cut: float, end: float = np.inf, name: str = "test") -> TemporalSplit:
    train = before(ds, cut)
    samples, nexts = [], []
    window = (ds.ts >= cut) & (ds.ts < end)
    for u in range(ds.n_users):
        start, stop = int(train.offsets[u]), int(train.offsets[u + 1])
        if stop == start:
            continue  # no history before the cut: not a user this protocol scores
        seen = set(train.item[start:stop].tolist())
        sl = ds.user_slice(u)
        for s in range(len(ds.scenarios)):
            idx = np.flatnonzero(window[sl] & (ds.scenario[sl] == s)) + sl.start  # time order
            items = [int(i) for i in ds.item[idx] if int(i) not in seen]
            if not items:
                continue
            targets = np.asarray(list(dict.fromkeys(items)), dtype=np.int64)  # unique, first-seen order
            samples.append(Sample(u, start, stop, targets, s))
            nexts.append(targets[:1])
    return TemporalSplit(name, cut, end, train, samples, nexts)


def protocol_splits(ds: Dataset, test_q: float = 0.9, valid_q: float = 0.8) -> tuple[TemporalSplit, TemporalSplit]:
    """(validation, test): validation trains before ``Tv`` and scores ``[Tv, T)``; test trains before ``T``."""
    t, tv = cut_time(ds, test_q), cut_time(ds, valid_q)
    return temporal_split(ds, tv, t, "validation"), temporal_split(ds, t, np.inf, "test")


# --------------------------------------------------------------------------------------------- ranking
def rank_scores(scores: np.ndarray, exclude: list[set[int]], tiebreak: np.ndarray, k: int = DEPTH) -> list[list[int]]:
    """Per row the top-k items by score, ties broken by ``tiebreak`` (higher first) then item index;
    items in ``exclude[row]`` never ranked."""
    out = []
    for row, skip in zip(scores, exclude, strict=True):
        order = np.lexsort((np.arange(len(row)), -tiebreak, -row))
        out.append([int(i) for i in order[: k + len(skip)] if int(i) not in skip][:k])
    return out


def rank_vectors(
    user_vectors: np.ndarray, item_vectors: np.ndarray, exclude: list[set[int]], k: int = DEPTH
) -> list[list[int]]:
    """The served path: faiss inner product over ``item_vectors``, each user's (K, d) vectors max-merged."""
    return multi_interest_topk(item_index(item_vectors), user_vectors, k, exclude=exclude)


def evaluate_ranked(split: TemporalSplit, ranked: list[list[int]]) -> dict[str, float]:
    """The protocol's figures for one method's rankings (one list per sample of ``split``)."""
    out: dict[str, float] = {}
    cols = {"": [set(s.targets.tolist()) for s in split.samples], "next_": [set(n.tolist()) for n in split.next_item]}
    for prefix, targets in cols.items():
        for k in KS:
            out[f"{prefix}recall@{k}"] = float(
                np.mean([len(set(r[:k]) & t) / len(t) for r, t in zip(ranked, targets, strict=True)])
            )
        out[f"{prefix}ndcg@50"] = float(np.mean([ndcg_at_k(r, t, 50) for r, t in zip(ranked, targets, strict=True)]))
    n_items = split.train.n_items
    out["coverage@50"] = len({i for r in ranked for i in r[:50]}) / n_items
    cold = split.cold_items()
    all_targets = np.concatenate([s.targets for s in split.samples]) if split.samples else np.zeros(0, np.int64)
    out["cold_target_share"] = float(cold[all_targets].mean()) if len(all_targets) else 0.0
    return out


def score_served(
    split: TemporalSplit,
    vectors: dict[str, np.ndarray],
    item_vectors: np.ndarray,
    interests: int,
) -> dict[str, float]:
    """Scores vectors read from anywhere (e.g. Redis after a replay of the pre-cut stream) on ``split``.

    ``vectors[user_id]`` is the user's (S·K, d) block as the stream stores it (scenario-major, as
    ``InterestReader.get_user_interests(user, scenario=None)`` returns it); each sample uses the K rows of
    the scenario it asks for.  ``item_vectors`` (n_items, d) in the dataset's item order (the stored
    ``ret`` of every item).  A user with no vectors ranks nothing (counts as a miss).
    """
    ds = split.train
    d = item_vectors.shape[1]
    rows, missing = [], []
    for i, s in enumerate(split.samples):
        v = vectors.get(str(ds.user_ids[s.user]))
        if v is None:
            missing.append(i)
            rows.append(np.zeros((interests, d), np.float32))
        else:
            rows.append(np.asarray(v, np.float32).reshape(-1, interests, d)[s.ask])
    ranked = rank_vectors(np.stack(rows), item_vectors, [split.seen(s) for s in split.samples])
    for i in missing:
        ranked[i] = []
    return evaluate_ranked(split, ranked)


# --------------------------------------------------------------------------------------------- baselines
def item_counts(ds: Dataset, since: float = -np.inf) -> np.ndarray:
    return np.bincount(ds.item[ds.ts >= since], minlength=ds.n_items).astype(np.float64)


def popularity_scores(split: TemporalSplit) -> np.ndarray:
    return np.broadcast_to(item_counts(split.train), (len(split.samples), split.train.n_items))


def recent_popularity_scores(split: TemporalSplit, window_days: float) -> np.ndarray:
    counts = item_counts(split.train, since=split.cut - window_days * DAY)
    return np.broadcast_to(counts, (len(split.samples), split.train.n_items))


def item_similarity(ds: Dataset, neighbours: int | None = None) -> np.ndarray:
    """Cosine similarity of items' binary user sets (zero diagonal), each row cut to its top neighbours."""
    x = np.zeros((ds.n_users, ds.n_items), np.float32)
    x[ds.user, ds.item] = 1.0
    co = x.T @ x
    n = np.diag(co).copy()
    sim = co / np.sqrt(np.maximum(np.outer(n, n), 1e-12))
    np.fill_diagonal(sim, 0.0)
    if neighbours is not None and neighbours < ds.n_items:
        drop = np.argsort(-sim, axis=1, kind="stable")[:, neighbours:]
        np.put_along_axis(sim, drop, 0.0, axis=1)
    return sim


def item_knn_scores(split: TemporalSplit, neighbours: int | None = None) -> np.ndarray:
    ds = split.train
    sim = item_similarity(ds, neighbours)
    return np.stack([sim[ds.item[s.start : s.cut]].sum(0) for s in split.samples])


def transition_counts(ds: Dataset) -> np.ndarray:
    t = np.zeros((ds.n_items, ds.n_items), np.float64)
    for u in range(ds.n_users):
        seq = ds.item[ds.user_slice(u)]
        np.add.at(t, (seq[:-1], seq[1:]), 1.0)
    return t


def transition_scores(split: TemporalSplit) -> np.ndarray:
    ds = split.train
    t = transition_counts(ds)
    return np.stack([t[ds.item[s.cut - 1]] for s in split.samples])


def rank_baseline(split: TemporalSplit, scores: np.ndarray) -> list[list[int]]:
    return rank_scores(np.asarray(scores), [split.seen(s) for s in split.samples], item_counts(split.train))


#: Grids searched on the validation cut.
RECENT_WINDOWS_DAYS = (1, 3, 7, 14, 30, 60, 120)
KNN_NEIGHBOURS = (10, 50, 200, None)


def baselines(split: TemporalSplit, window_days: float, neighbours: int | None) -> dict[str, list[list[int]]]:
    """Rankings of every baseline on ``split`` with the given (validated) settings."""
    return {
        "popularity": rank_baseline(split, popularity_scores(split)),
        "recent_popularity": rank_baseline(split, recent_popularity_scores(split, window_days)),
        "item_knn": rank_baseline(split, item_knn_scores(split, neighbours)),
        "transition": rank_baseline(split, transition_scores(split)),
    }


def choose_baselines(valid: TemporalSplit, metric: str = "recall@50") -> tuple[dict, dict]:
    """The recent-popularity window and the item-kNN neighbourhood that do best on the validation cut;
    returns (choices, every validation figure of the grid)."""
    grid: dict[str, dict] = {"recent_popularity": {}, "item_knn": {}}
    for w in RECENT_WINDOWS_DAYS:
        grid["recent_popularity"][w] = evaluate_ranked(valid, rank_baseline(valid, recent_popularity_scores(valid, w)))
    for n in KNN_NEIGHBOURS:
        grid["item_knn"][n] = evaluate_ranked(valid, rank_baseline(valid, item_knn_scores(valid, n)))
    choices = {
        "recent_window_days": max(RECENT_WINDOWS_DAYS, key=lambda w: grid["recent_popularity"][w][metric]),
        "knn_neighbours": max(KNN_NEIGHBOURS, key=lambda n: (grid["item_knn"][n][metric], n is None, n or 0)),
    }
    return choices, grid


# --------------------------------------------------------------------------------------------- trend signal
def decayed_counts(ds: Dataset, at: float, tau_days: float) -> np.ndarray:
    """(n_items,) Σ over the item's events with ts < at of exp(-(at - ts) / τ): what a stream keeps per item
    with ``c ← c · exp(-(t - t_last) / τ) + 1`` at each event and reads as ``c · exp(-(at - t_last) / τ)``."""
    keep = ds.ts < at
    w = np.exp(-(at - ds.ts[keep]) / (tau_days * DAY))
    return np.bincount(ds.item[keep], weights=w, minlength=ds.n_items)


def trend_feature(ds: Dataset, at: float, tau_days: float) -> np.ndarray:
    """The item-side trend coordinate: log(1 + decayed count) at time ``at`` from events before it."""
    return np.log1p(decayed_counts(ds, at, tau_days)).astype(np.float32)
