"""Training and evaluation samples (time split) and the padded tensors the user model reads.

Evaluation holds out, per user and scenario, the last ``window`` events of that scenario; the history is
everything before the first of them.  Training only ever sees events before the user's earliest held-out
event, and samples a random cut per user per epoch: history = events before the cut, targets = the next
events of one scenario.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from models.data import Dataset
from models.refiner import UserInput, collate
from models.user_model import ModelConfig


@dataclass(frozen=True)
class Sample:
    user: int
    start: int  # history = events [start, cut) (absolute indices into the dataset's columns)
    cut: int
    targets: np.ndarray  # item indices
    ask: int  # scenario whose interests are asked for
    #: When the prediction is made (the item trend is read from events before it); None: the time of the
    #: last history event.
    at: float | None = None

    def time(self, ds: Dataset) -> float:
        return float(self.at) if self.at is not None else float(ds.ts[self.cut - 1])


def eval_samples(ds: Dataset, window: int) -> list[Sample]:
    out = []
    for u in range(ds.n_users):
        sl = ds.user_slice(u)
        scen = ds.scenario[sl]
        for s in range(len(ds.scenarios)):
            pos = np.flatnonzero(scen == s)
            if len(pos) <= window:  # keep a history to predict from
                continue
            held = pos[-window:] + sl.start
            out.append(Sample(u, sl.start, int(held[0]), ds.item[held], s))
    return out


def train_limits(ds: Dataset, held_out: list[Sample]) -> np.ndarray:
    """Per user, the first event index training may not see (its earliest held-out cut)."""
    limit = ds.offsets[1:].copy()
    for s in held_out:
        limit[s.user] = min(limit[s.user], s.cut)
    return limit


def train_samples(
    ds: Dataset, limit: np.ndarray, rng: np.random.Generator, window: int, min_history: int = 3
) -> list[Sample]:
    out = []
    for u in range(ds.n_users):
        start, stop = int(ds.offsets[u]), int(limit[u])
        if stop - start < min_history + 1:
            continue
        for _ in range(5):  # a few tries to find a cut with targets in the chosen scenario
            cut = int(rng.integers(start + min_history, stop))
            s = int(rng.integers(len(ds.scenarios)))
            future = np.flatnonzero(ds.scenario[cut:stop] == s)[:window] + cut
            if len(future):
                out.append(Sample(u, start, cut, ds.item[future], s))
                break
    return out


def global_train_samples(
    ds: Dataset,
    limit: np.ndarray,
    rng: np.random.Generator,
    window: int,
    cuts: int = 20,
    horizon_days: float = 21.0,
    min_history: int = 3,
    recency_days: float | None = None,
) -> list[Sample]:
    """Samples that predict across a gap, the way the temporal protocol scores: ``cuts`` random global times
    t* among the training events; for each, every user with ``min_history`` events before t* and unseen
    items in ``[t*, t* + horizon)`` (and before the user's ``limit``) gives one sample: history = events
    before t*, targets = up to ``window`` of those items drawn at random, ``at`` = t*.

    ``recency_days``: draw t* with an extra weight exp((t* - newest) / recency_days), so more of the samples
    look like the last weeks before the cut, the period the scored one follows (None: every event alike)."""
    out: list[Sample] = []
    train_ts = np.concatenate([ds.ts[ds.offsets[u] : limit[u]] for u in range(ds.n_users)])
    if len(train_ts) == 0:
        return out
    lo = np.quantile(train_ts, 0.05)
    horizon = horizon_days * 86400.0
    pool = train_ts[train_ts > lo]
    p = None
    if recency_days is not None:
        w = np.exp((pool - pool.max()) / (recency_days * 86400.0))
        p = w / w.sum()
    for t in rng.choice(pool, cuts, p=p):
        for u in range(ds.n_users):
            start, stop = int(ds.offsets[u]), int(limit[u])
            ts = ds.ts[start:stop]
            cut = start + int(np.searchsorted(ts, t, side="left"))
            if cut - start < min_history:
                continue
            seen = set(ds.item[start:cut].tolist())
            ahead = np.flatnonzero(ds.ts[cut:stop] < t + horizon) + cut
            for s in rng.permutation(len(ds.scenarios)):
                idx = ahead[ds.scenario[ahead] == s]
                items = list(dict.fromkeys(int(i) for i in ds.item[idx] if int(i) not in seen))
                if items:
                    pick = rng.permutation(len(items))[:window]
                    out.append(Sample(u, start, cut, np.asarray(items)[np.sort(pick)], int(s), float(t)))
                    break
    return out


def history(ds: Dataset, s: Sample, single_scenario: bool, max_len: int) -> np.ndarray:
    idx = np.arange(s.start, s.cut)
    if single_scenario:
        idx = idx[ds.scenario[idx] == s.ask]
    return idx[-max_len:]


def make_batch(
    ds: Dataset, samples: list[Sample], inputs: np.ndarray, cfg: ModelConfig, window: int, max_history: int = 2000
) -> dict[str, torch.Tensor]:
    """``inputs`` (n_items, item_dim): the vectors the user side reads (codebook-decoded or raw)."""
    hist = [history(ds, s, cfg.single_scenario, max_history) for s in samples]
    b, t = len(samples), max(1, max(len(h) for h in hist))
    h_items = np.zeros((b, t, inputs.shape[1]), np.float32)
    h_scen, h_act = np.zeros((b, t), np.int64), np.zeros((b, t), np.int64)
    h_ts, h_mask = np.zeros((b, t), np.float64), np.zeros((b, t), bool)
    users = []
    for i, h in enumerate(hist):
        n = len(h)
        h_items[i, :n], h_scen[i, :n], h_act[i, :n] = inputs[ds.item[h]], ds.scenario[h], ds.action[h]
        h_ts[i, :n], h_mask[i, :n] = ds.ts[h], True
        if n:
            h_ts[i, n:] = ds.ts[h[-1]]
        users.append(UserInput(np.zeros((1, 1), np.float32), h_items[i, :n], h_scen[i, :n], h_act[i, :n], h_ts[i, :n]))
    r = collate(cfg.refiner, users, [(i, s.ask) for i, s in enumerate(samples)]) if cfg.variant != "comirec" else {}
    tgt = np.zeros((b, window), np.int64)
    valid = np.zeros((b, window), bool)
    for i, s in enumerate(samples):
        tgt[i, : len(s.targets)], valid[i, : len(s.targets)] = s.targets, True
    batch = {
        "h_items": h_items,
        "h_scenario": h_scen,
        "h_action": h_act,
        "h_ts": h_ts,
        "h_mask": h_mask,
        "target_ids": tgt,
        "valid": valid,
    }
    out = {k: torch.as_tensor(v) for k, v in batch.items()}
    out.update({f"r_{k}": v for k, v in r.items() if k not in ("coarse", "ask")})
    if r:
        out["ask"] = r["ask"]
    return out
