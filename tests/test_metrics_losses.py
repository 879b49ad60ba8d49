"""Metric functions against hand-computed cases; DMIL matching and loss behaviour."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.losses import DMILLoss, cosine_kmeans, match_targets
from models.metrics import diversity_at_k, item_index, multi_interest_topk, ndcg_at_k, recall_at_k


def test_recall_and_ndcg_by_hand():
    ranked = [5, 3, 9, 1, 7]
    targets = {3, 7, 42}
    assert recall_at_k(ranked, targets, 2) == pytest.approx(1 / 3)
    assert recall_at_k(ranked, targets, 5) == pytest.approx(2 / 3)
    # hits at ranks 2 and 5: (1/log2(3) + 1/log2(6)) / (1 + 1/log2(3) + 1/log2(4))
    expected = (1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3) + 0.5)
    assert ndcg_at_k(ranked, targets, 5) == pytest.approx(expected)
    assert ndcg_at_k([3], {3}, 10) == pytest.approx(1.0)
    assert recall_at_k(ranked, set(), 5) == 0.0


def test_diversity():
    category = np.array([0, 0, 1, 2, 2])
    assert diversity_at_k([0, 1, 2], category, 3) == 2
    assert diversity_at_k([0, 2, 3, 4], category, 4) == 3


def test_multi_interest_max_merge_and_exclusion():
    items = np.eye(4, dtype=np.float32)
    index = item_index(items)
    interests = np.array([[[1, 0, 0, 0], [0, 0.9, 0.1, 0]]], dtype=np.float32)
    assert multi_interest_topk(index, interests, 3)[0] == [0, 1, 2]
    assert multi_interest_topk(index, interests, 2, exclude=[{0}])[0] == [1, 2]


def test_kmeans_and_hungarian_matching():
    a, b = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
    x = np.stack([a, a, b, b])
    labels = cosine_kmeans(x, 2)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    interests = np.stack([b, a])[None]  # interest 0 points at b, interest 1 at a
    match = match_targets(interests, x[None], np.ones((1, 4), bool))
    assert match.tolist() == [[1, 1, 0, 0]]


def test_dmil_loss_decreases_on_toy_problem():
    """Users with two planted interests: learnable per-user interest vectors must fit them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    items = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(60, 16)), dtype=torch.float32), dim=-1)
    users = 8
    targets_ids = torch.as_tensor(np.stack([rng.choice(60, 6, replace=False) for _ in range(users)]))
    emb = torch.nn.Parameter(torch.randn(users, 2, 16) * 0.1)
    loss_fn = DMILLoss()
    opt = torch.optim.Adam([emb, *loss_fn.parameters()], lr=0.05)
    valid = torch.ones(users, 6, dtype=torch.bool)
    neg_ids = torch.arange(60)
    losses = []
    for _ in range(60):
        interests = torch.nn.functional.normalize(emb, dim=-1)
        loss = loss_fn(interests, items[targets_ids], targets_ids, valid, items, neg_ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])
    assert loss_fn.logit_scale.exp().item() <= 100.0 + 1e-4


def _one_user_case():
    """One user, two interests, two targets in different directions, three sampled negatives."""
    eye = torch.eye(6)
    interests = torch.nn.functional.normalize(torch.tensor([[[1.0, 0.2, 0, 0, 0, 0], [0, 0, 1.0, 0.3, 0, 0]]]), dim=-1)
    target_ids = torch.tensor([[0, 2]])
    negative_ids = torch.tensor([3, 4, 5])
    return interests, eye[target_ids], target_ids, torch.ones(1, 2, dtype=torch.bool), eye[negative_ids], negative_ids


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_log_q_correction_by_hand(strength):
    interests, targets, target_ids, valid, negatives, negative_ids = _one_user_case()
    loss_fn = DMILLoss(log_q_strength=strength)
    plain = loss_fn(interests, targets, target_ids, valid, negatives, negative_ids)
    uniform = torch.full((6,), math.log(1 / 6))
    # A uniform prior shifts every candidate by the same amount: no change.
    assert loss_fn(interests, targets, target_ids, valid, negatives, negative_ids, uniform).item() == pytest.approx(
        plain.item(), abs=1e-6
    )
    prior = torch.log(torch.tensor([0.5, 0.1, 0.2, 0.1, 0.05, 0.05]))
    got = loss_fn(interests, targets, target_ids, valid, negatives, negative_ids, prior)
    # By hand: target 0 → interest 0, target 2 → interest 1 (the Hungarian match); candidates are
    # [item 0, item 2, items 3..5]; the other target of the same user is masked; each logit minus
    # strength × log(2 · prior + 3 / 6).
    scale = loss_fn.logit_scale.exp()
    cand = torch.eye(6)[[0, 2, 3, 4, 5]]
    offset = strength * torch.log(2 * prior.exp()[[0, 2, 3, 4, 5]] + 3 / 6)
    rows = []
    for p, k in ((0, 0), (1, 1)):
        logits = scale * interests[0, k] @ cand.T - offset
        logits[1 - p] = float("-inf")
        rows.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([p])))
    assert got.item() == pytest.approx(torch.stack(rows).mean().item(), rel=1e-5)


def test_served_score_term_by_hand():
    """The added term is InfoNCE on max over interests, the score multi-interest retrieval ranks by."""
    interests, targets, target_ids, valid, negatives, negative_ids = _one_user_case()
    base = DMILLoss()(interests, targets, target_ids, valid, negatives, negative_ids)
    loss_fn = DMILLoss(served_weight=0.5)
    got = loss_fn(interests, targets, target_ids, valid, negatives, negative_ids)
    scale = loss_fn.logit_scale.exp()
    cand = torch.eye(6)[[0, 2, 3, 4, 5]]
    served = scale * (interests[0] @ cand.T).amax(dim=0)
    rows = []
    for p in (0, 1):
        logits = served.clone()
        logits[1 - p] = float("-inf")
        rows.append(torch.nn.functional.cross_entropy(logits[None], torch.tensor([p])))
    assert got.item() == pytest.approx(base.item() + 0.5 * torch.stack(rows).mean().item(), rel=1e-5)


def test_dmil_weight_scales_only_the_matched_term():
    """``dmil_weight=0`` leaves the served-score term alone: the loss equals that term by hand."""
    interests, targets, target_ids, valid, negatives, negative_ids = _one_user_case()
    both = DMILLoss(served_weight=1.0)(interests, targets, target_ids, valid, negatives, negative_ids)
    dmil = DMILLoss()(interests, targets, target_ids, valid, negatives, negative_ids)
    served_only = DMILLoss(served_weight=1.0, dmil_weight=0.0)(
        interests, targets, target_ids, valid, negatives, negative_ids
    )
    assert served_only.item() == pytest.approx(both.item() - dmil.item(), rel=1e-5)
    assert 0 < served_only.item() < both.item()


def test_saved_train_config_reads_old_checkpoints_with_their_loss():
    """A train.json written before the loss options existed was trained without them."""
    from models.train import TrainConfig

    old = TrainConfig.saved({"dataset": "sim", "steps": 5})
    assert (old.served_weight, old.log_q, old.dmil_weight) == (0.0, False, 1.0)
    new = TrainConfig.saved({"dataset": "sim", "steps": 5, "served_weight": 1.0, "log_q": True})
    assert (new.served_weight, new.log_q) == (1.0, True)
