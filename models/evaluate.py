"""One run, one split, one table: the trained model against baselines and ablations.

Split by time (``models.batches``): per user and scenario the last W events are held out.  Retrieval is
faiss ``IndexFlatIP`` over every item's retrieval vector; a multi-interest user takes each interest's
top-k and merges by max score; items the user already had are excluded.  Baselines and ablations are
trained here with the checkpoint's own training config (same seed, same samples, same steps):

- ``popularity``: most frequent training items;
- ``sasrec``: SASRec-style single vector — the same causal decoder over the last N items, one output,
  no coarse tokens;
- ``comirec``: ComiRec-SA-style multi-interest attention pooling without an LLM (the coarse model alone);
- ablations of the full model: ``no_coarse``, ``raw_vectors`` (no codebook), ``k1`` (one interest),
  ``single_scenario`` (history of the asked scenario only) and ``shared_queries`` (one query set for
  every scenario instead of scenario-aware querying); these two only on multi-scenario data.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.batches import Sample, make_batch
from models.data import Dataset
from models.metrics import diversity_at_k, item_index, multi_interest_topk, ndcg_at_k, recall_at_k
from models.train import TrainConfig, dataset_of, fit_variant, split
from models.user_model import Checkpoint, UserModel

KS = (10, 50, 200)
VARIANTS: dict[str, dict] = {
    "sasrec": {"use_coarse": False, "interests": 1},
    "comirec": {"variant": "comirec"},
    "no_coarse": {"use_coarse": False},
    "raw_vectors": {"use_codebook": False},
    "k1": {"interests": 1},
    "single_scenario": {"single_scenario": True},
    "shared_queries": {"scenario_queries": False},
}


def score(ds: Dataset, samples: list[Sample], ranked: list[list[int]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in KS:
        out[f"recall@{k}"] = float(
            np.mean([recall_at_k(r, set(s.targets.tolist()), k) for s, r in zip(samples, ranked, strict=True)])
        )
        out[f"ndcg@{k}"] = float(
            np.mean([ndcg_at_k(r, set(s.targets.tolist()), k) for s, r in zip(samples, ranked, strict=True)])
        )
    out["categories@50"] = float(np.mean([diversity_at_k(r, ds.item_category, 50) for r in ranked]))
    return out


def seen(ds: Dataset, s: Sample) -> set[int]:
    return set(ds.item[s.start : s.cut].tolist())


def rank_model(
    ds: Dataset,
    model: UserModel,
    samples: list[Sample],
    inputs: np.ndarray,
    vectors: np.ndarray,
    window: int,
    batch_size: int = 128,
) -> list[list[int]]:
    index = item_index(model.retrieval_vectors(vectors))
    ranked: list[list[int]] = []
    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        with torch.inference_mode():
            interests = model.interests(make_batch(ds, chunk, inputs, model.cfg, window)).numpy()
        ranked += multi_interest_topk(index, interests, max(KS), exclude=[seen(ds, s) for s in chunk])
    return ranked


def rank_popularity(ds: Dataset, samples: list[Sample], limit: np.ndarray) -> list[list[int]]:
    counts = np.zeros(ds.n_items)
    for u in range(ds.n_users):
        np.add.at(counts, ds.item[ds.offsets[u] : limit[u]], 1)
    order = np.argsort(-counts, kind="stable")
    out = []
    for s in samples:
        skip = seen(ds, s)
        out.append([int(i) for i in order[: max(KS) + len(skip)] if i not in skip][: max(KS)])
    return out


def by_scenario(ds: Dataset, samples: list[Sample], ranked: list[list[int]]) -> dict[str, dict[str, float]]:
    table = {"all": score(ds, samples, ranked)}
    if len(ds.scenarios) > 1:
        for s_id, name in enumerate(ds.scenarios):
            pick = [i for i, s in enumerate(samples) if s.ask == s_id]
            table[name] = score(ds, [samples[i] for i in pick], [ranked[i] for i in pick])
    return table


def run_evaluate(
    checkpoint: str | Path,
    variants: list[str] | None = None,
    progress: bool = True,
    out: str | Path | None = None,
    events: str | None = None,
    items: str | None = None,
    rejects: str | None = None,
) -> dict:
    """``events`` / ``items``: score a user's files (default: the data the checkpoint was trained on);
    their scenarios and actions must be the checkpoint's, and the items its catalogue."""
    from models.files import Rejects

    ckpt_dir = Path(checkpoint)
    t0 = time.perf_counter()
    cfg = TrainConfig.saved(json.loads((ckpt_dir / "train.json").read_text())["config"])
    if events or items:
        cfg = replace(cfg, events=events, items=items)
    ckpt = Checkpoint.load(ckpt_dir)
    mcfg = ckpt.model.cfg
    with Rejects(rejects) as bad:
        ds = dataset_of(cfg, bad, tuple(mcfg.scenarios), tuple(mcfg.actions))
    if bad.total and progress:
        print(bad.summary())
    if list(map(str, ds.item_ids)) != list(map(str, ckpt.item_ids)):
        raise ValueError(
            f"the item file has {ds.n_items} items, not the {len(ckpt.item_ids)} the checkpoint was trained on "
            "(in the same order): evaluate with the checkpoint's item file"
        )
    held, limit = split(ds, cfg.window)
    vectors = ckpt.item_vectors
    enc = ckpt.codebook.encode(vectors)
    decoded = ckpt.codebook.decode(enc.codes, enc.alphas)
    results: dict[str, dict] = {"popularity": by_scenario(ds, held, rank_popularity(ds, held, limit))}
    results["full"] = by_scenario(ds, held, rank_model(ds, ckpt.model, held, decoded, vectors, cfg.window))
    wanted = [v for v in (variants if variants is not None else VARIANTS) if v in VARIANTS]
    if len(ds.scenarios) == 1:  # the same as the full model on single-scenario data
        wanted = [w for w in wanted if w not in ("single_scenario", "shared_queries")]
    for name in wanted:
        # Same item tower as the checkpoint: its head before stage 3 is not stored, so baselines start
        # from the trained full model's tower, an advantage for them, not for the full model.
        model, _ = fit_variant(
            ds, cfg, ckpt.model.item_tower, vectors, decoded, limit, progress, name=name, **VARIANTS[name]
        )
        inputs = decoded if model.cfg.use_codebook else vectors
        results[name] = by_scenario(ds, held, rank_model(ds, model, held, inputs, vectors, cfg.window))
    report = {
        "dataset": ds.name,
        "users": ds.n_users,
        "items": ds.n_items,
        "held_out_samples": len(held),
        "window": cfg.window,
        "wall_s": time.perf_counter() - t0,
        "results": results,
    }
    out_dir = Path(out) if out else ckpt_dir
    (out_dir / "results.json").write_text(json.dumps(report, indent=2))
    md = markdown_table(report)
    (out_dir / "results.md").write_text(md)
    if progress:
        tqdm.write(md)
    return report


def markdown_table(report: dict) -> str:
    cols = [f"recall@{k}" for k in KS] + [f"ndcg@{k}" for k in KS] + ["categories@50"]
    lines = [
        f"### {report['dataset']}: {report['users']} users, {report['items']} items, "
        f"last {report['window']} events held out per user and scenario ({report['held_out_samples']} samples)",
        "",
        "| model | slice | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    for model, slices in report["results"].items():
        for slice_name, m in slices.items():
            cells = [f"{m[c]:.4f}" if c != "categories@50" else f"{m[c]:.1f}" for c in cols]
            lines.append(f"| {model} | {slice_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
