"""Retrieval metrics and multi-interest retrieval with faiss (max-score merge over a user's vectors)."""

from __future__ import annotations

import faiss
import numpy as np


def recall_at_k(ranked: list[int] | np.ndarray, targets: set[int], k: int) -> float:
    """Share of the user's targets found in the top-k."""
    if not targets:
        return 0.0
    return len(set(np.asarray(ranked)[:k].tolist()) & targets) / len(targets)


def ndcg_at_k(ranked: list[int] | np.ndarray, targets: set[int], k: int) -> float:
    """Binary-relevance NDCG: DCG of hits at their ranks over the ideal DCG of min(k, |targets|) hits."""
    if not targets:
        return 0.0
    top = np.asarray(ranked)[:k].tolist()
    dcg = sum(1.0 / np.log2(i + 2) for i, item in enumerate(top) if item in targets)
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(k, len(targets))))
    return dcg / ideal


def diversity_at_k(ranked: list[int] | np.ndarray, category: np.ndarray, k: int) -> int:
    """Distinct categories among the top-k."""
    return len(set(category[np.asarray(ranked)[:k]].tolist()))


def item_index(item_vectors: np.ndarray) -> faiss.IndexFlatIP:
    index = faiss.IndexFlatIP(item_vectors.shape[1])
    index.add(np.ascontiguousarray(item_vectors, dtype=np.float32))
    return index


def multi_interest_topk(
    index: faiss.Index, interests: np.ndarray, k: int, exclude: list[set[int]] | None = None
) -> list[list[int]]:
    """Per user: top-k of each interest vector, merged by each item's max score over the interests.

    interests (U, K, d).  Items in ``exclude[u]`` (e.g. already seen) are dropped before cutting to k.
    """
    u, kk, d = interests.shape
    extra = max((len(e) for e in exclude), default=0) if exclude else 0
    depth = min(index.ntotal, k + extra)
    scores, ids = index.search(np.ascontiguousarray(interests.reshape(u * kk, d), dtype=np.float32), depth)
    scores, ids = scores.reshape(u, kk * depth), ids.reshape(u, kk * depth)
    out = []
    for i in range(u):
        best: dict[int, float] = {}
        for item, s in zip(ids[i].tolist(), scores[i].tolist(), strict=True):
            if item >= 0 and s > best.get(item, -np.inf) and not (exclude and item in exclude[i]):
                best[item] = s
        out.append(sorted(best, key=lambda it: -best[it])[:k])
    return out
