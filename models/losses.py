"""Disentangled multi-interest learning (DMIL) loss, as in RED-Rec's released code.

Per user: the W held-out target items are clustered into K groups (cosine k-means, a few iterations),
the group centres are Hungarian-matched to the K interest outputs, and each target is contrasted
against its matched interest with InfoNCE over in-batch + sampled negatives.  Negatives too similar to
the target (cosine > 0.98: the same or a duplicate item) are masked; the temperature is learned
(logit scale starts at ln(1/0.07), capped at ln(100)).

Two options beyond the paper's loss, both measured in the README's quality tables:

- ``served_weight``: adds the same InfoNCE on the score retrieval serves, max over the K interests
  (``models.metrics.multi_interest_topk`` merges by max), so the K interests are trained for how they
  are used, not only each on its matched share of the targets.
- ``item_log_prior`` (sampled-softmax correction, "logQ"): in-batch candidates are drawn in proportion to
  popularity and the sampled ones uniformly, so popular items are over-represented as negatives; each
  candidate's logit is lowered by the log of its expected count among the candidates.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn


def cosine_kmeans(x: np.ndarray, k: int, iters: int = 5, seed: int = 0) -> np.ndarray:
    """Labels (n,) of unit rows ``x`` in ``k`` cosine clusters (k-means++-style seeding, fixed seed)."""
    n = len(x)
    if n <= k:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        far = 1.0 - np.max(x @ np.stack(centres).T, axis=1)
        p = np.clip(far, 0, None)
        centres.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
    c = np.stack(centres)
    for _ in range(iters):
        labels = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            members = x[labels == j]
            if len(members):
                m = members.sum(0)
                c[j] = m / max(np.linalg.norm(m), 1e-12)
    return np.argmax(x @ c.T, axis=1)


def match_targets(interests: np.ndarray, targets: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """For each user, the interest index (0..K-1) each target is matched to; -1 where not valid.

    interests (B, K, d), targets (B, W, d) unit vectors, valid (B, W) bool.
    """
    b, k, _ = interests.shape
    out = np.full(valid.shape, -1, dtype=np.int64)
    for i in range(b):
        idx = np.flatnonzero(valid[i])
        if len(idx) == 0:
            continue
        t = targets[i, idx]
        labels = cosine_kmeans(t, k, seed=i)
        groups = np.unique(labels)
        centres = np.stack([t[labels == g].mean(0) for g in groups])
        rows, cols = linear_sum_assignment(-(centres @ interests[i].T))  # maximise cosine
        group_to_interest = dict(zip(groups[rows].tolist(), cols.tolist(), strict=True))
        out[i, idx] = [group_to_interest[g] for g in labels.tolist()]
    return out


class DMILLoss(nn.Module):
    def __init__(
        self,
        init_temperature: float = 0.07,
        max_scale: float = 100.0,
        false_negative_cos: float = 0.98,
        served_weight: float = 0.0,
        dmil_weight: float = 1.0,
        log_q_strength: float = 1.0,
    ):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_log_scale = math.log(max_scale)
        self.false_negative_cos = false_negative_cos
        self.served_weight = served_weight
        self.dmil_weight = dmil_weight
        self.log_q_strength = log_q_strength

    def scale(self) -> torch.Tensor:
        """The (capped) learned logit scale: training logits are ``scale`` × the served inner product."""
        return self.logit_scale.clamp(max=self.max_log_scale).exp()

    def forward(
        self,
        interests: torch.Tensor,
        targets: torch.Tensor,
        target_ids: torch.Tensor,
        valid: torch.Tensor,
        negatives: torch.Tensor,
        negative_ids: torch.Tensor,
        item_log_prior: torch.Tensor | None = None,
        trend: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """interests (B, K, d), targets (B, W, d), target_ids/valid (B, W), negatives (S, d) → scalar loss.
        ``item_log_prior`` (n_items,): log popularity of each item among training targets (logQ).
        ``trend`` (B, n_items) or (B, n_items, c): each row's item trend coordinate(s) at that row's time;
        the interests then carry c more columns, the weights of those coordinates, and a candidate's score
        is ``u · c + w · trend[c]`` (the inner product of the served (d+c)-vectors)."""
        weight = None
        if trend is not None:
            if trend.dim() == 2:  # one trend coordinate
                trend = trend.unsqueeze(-1)
            c = trend.shape[-1]
            interests, weight = interests[..., :-c], interests[..., -c:]
        _b, _w, _d = targets.shape
        match = match_targets(interests.detach().float().numpy(), targets.detach().float().numpy(), valid.numpy())
        rows, cols = np.nonzero(match >= 0)
        if len(rows) == 0:
            return interests.sum() * 0.0
        user_vec = interests[rows, match[rows, cols]]  # (P, d)
        pos = targets[rows, cols]  # (P, d)
        # Candidates: every valid target in the batch (its own is the positive), then sampled items.
        cand = torch.cat([pos, negatives], 0)
        cand_ids = torch.cat([target_ids[rows, cols], negative_ids])
        cand_user = torch.cat([torch.as_tensor(rows), torch.full((len(negatives),), -1)])
        scale = self.scale()
        inner = user_vec @ cand.T  # (P, P + S)
        cand_trend = trend[rows][:, cand_ids] if trend is not None else None  # (P, P + S, c)
        if weight is not None:
            inner = inner + (weight[rows, match[rows, cols]][:, None, :] * cand_trend).sum(-1)
        logits = scale * inner
        p = len(rows)
        with torch.no_grad():
            same_user = cand_user[None, :] == torch.as_tensor(rows)[:, None]  # other targets of the same user
            dup = (pos @ cand.T > self.false_negative_cos) | (cand_ids[None, :] == cand_ids[:p, None])
            mask = same_user | dup
            mask[torch.arange(p), torch.arange(p)] = False  # keep the positive
            offset = torch.zeros(len(cand_ids))
            if item_log_prior is not None:  # expected count: P draws by popularity + S uniform draws
                prior = item_log_prior.exp()
                offset = self.log_q_strength * torch.log(p * prior[cand_ids] + len(negatives) / len(prior))
        loss = self.dmil_weight * F.cross_entropy((logits - offset).masked_fill(mask, float("-inf")), torch.arange(p))
        if self.served_weight > 0:
            each = torch.einsum("pkd,cd->pkc", interests[rows], cand)
            if weight is not None:
                each = each + torch.einsum("pkc,pnc->pkn", weight[rows], cand_trend)
            served = scale * each.amax(dim=1)
            served = (served - offset).masked_fill(mask, float("-inf"))
            loss = loss + self.served_weight * F.cross_entropy(served, torch.arange(p))
        return loss
