"""Training, in HyMiRec's stages: item tower → codebook on item vectors → coarse + refiner jointly.

1. Item tower (text datasets): the LLM (SmolLM2-135M by default) stays frozen; its hidden states at the
   appended token are extracted once (cached) and the adapter + retrieval head are trained with a
   next-item contrastive loss over consecutive items of the training histories.  Datasets that give
   item vectors (the simulator) skip this stage.
2. Codebook: cosine residual codebook on the item vectors (``models.codebook``).
3. User side: coarse recommender + refiner (and the shared head) with the DMIL loss, reading
   codebook-decoded item vectors, AdamW + cosine schedule with warm-up + grad clip 1.0, fixed seeds.

``mirstream train`` runs all three and writes a checkpoint folder the worker and ``evaluate`` load.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.backbone import models_home
from models.batches import eval_samples, global_train_samples, make_batch, train_limits, train_samples
from models.coarse import CoarseConfig
from models.codebook import CodebookConfig, ResidualCodebook
from models.data import Dataset, load, load_files
from models.item_tower import ItemTower, TextEncoder
from models.refiner import RefinerConfig
from models.user_model import Checkpoint, ModelConfig, UserModel


@dataclass(frozen=True)
class TrainConfig:
    dataset: str = "ml-100k"
    #: Refiner backbone: "tiny" (config-built), "smollm2", or a local folder.
    backbone: str = "tiny"
    backbone_layers: int | None = None
    #: Item-tower LLM for text datasets: the backbone, its first N layers (None: all) and its run type.
    #: SmolLM2's first 8 of 30 layers in bfloat16, the adapter fitted to those states: the items/s the
    #: worker needs for unseen catalogue text, at the full tower's validation quality (README, items).
    item_backbone: str = "smollm2"
    item_layers: int | None = 8
    item_dtype: str = "bfloat16"
    #: Optimiser steps of the user model (each step: batch_size users, one random cut each).
    steps: int = 300
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    window: int = 10
    negatives: int = 512
    interests: int = 3
    coarse_interests: int = 4
    coarse_dim: int = 64
    recent: int = 64
    retrieval_dim: int = 64
    codebook_layers: int = 3
    codewords: int = 256
    item_tower_epochs: int = 4
    #: Weight of the InfoNCE on the served score (max over interests) next to DMIL (``models.losses``).
    served_weight: float = 1.0
    #: Weight of the DMIL term itself (0: the served-score term alone trains the K interests).
    dmil_weight: float = 1.0
    #: Sampled-softmax popularity correction of the candidates' logits (``models.losses``).
    log_q: bool = True
    #: Strength of that correction: the logged expected counts are multiplied by this (1: the full logQ).
    log_q_strength: float = 1.0
    #: Learned item-ID embeddings next to the content vector (items seen in training; cold items: content).
    id_embeddings: bool = False
    #: A learned per-interest weight on the item trend coordinate log(1 + decayed count), with this τ.
    trend: bool = False
    trend_tau_days: float = 30.0
    #: A second trend coordinate with this longer τ, its own learned weight (None: one coordinate).
    trend_long_tau_days: float | None = None
    #: Training samples: "random" (a random cut per user) or "global" (global times t*, targets ahead of
    #: t* within ``horizon_days``, as the temporal protocol scores).
    sampler: str = "random"
    horizon_days: float = 21.0
    #: Global sampler: weight the sample times toward the end of the training data, exp((t - newest) / this)
    #: (None: every training event's time alike).
    cut_recency_days: float | None = None
    #: Serving only (applied once trained; ``UserModel.with_served_trend``): a factor on the learned trend
    #: weight and the τ the trend is read with (None: the training τ), both chosen on a validation cut.
    trend_gain: float = 1.0
    serve_tau_days: float | None = None
    #: Train on the events before this time quantile only (the temporal protocol's cut; the checkpoint
    #: a stream replaying the pre-cut events serves).  None: the leave-last-W-out split.
    cut_quantile: float | None = None
    seed: int = 0
    #: A user's own files (``models.schema``; JSONL, CSV or Parquet, gzip accepted) instead of ``dataset``.
    events: str | None = None
    items: str | None = None
    #: Where bad rows of those files are written (with line number and reason); None: counted only.
    rejects: str | None = None
    #: Use only the first N users (fast tests); None = all.
    max_users: int | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def saved(cls, config: dict) -> TrainConfig:
        """The config a checkpoint's ``train.json`` records.  A loss option missing there did not exist
        when it was trained, so it was off: its baselines are then trained without it too."""
        return cls(**{**_OFF_BEFORE_THEY_EXISTED, **config})


#: Loss options added after the first checkpoints, with the value that means "not used".
_OFF_BEFORE_THEY_EXISTED = {"served_weight": 0.0, "log_q": False, "dmil_weight": 1.0}


def seed_everything(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def subset_users(ds: Dataset, n: int | None) -> Dataset:
    if n is None or n >= ds.n_users:
        return ds
    stop = int(ds.offsets[n])
    q = ds.query[:stop] if ds.query is not None else None
    return replace(
        ds,
        user_ids=ds.user_ids[:n],
        user=ds.user[:stop],
        item=ds.item[:stop],
        scenario=ds.scenario[:stop],
        action=ds.action[:stop],
        ts=ds.ts[:stop],
        offsets=ds.offsets[: n + 1],
        query=q,
        event_ids=ds.event_ids[:stop] if ds.event_ids is not None else None,
    )


def dataset_of(cfg: TrainConfig, rejects=None, scenarios=None, actions=None) -> Dataset:
    """The training data a config names: a user's files (``events`` + ``items``) or a bundled dataset.
    ``scenarios`` / ``actions``: a trained model's (events of others are rejected)."""
    if cfg.events or cfg.items:
        if not (cfg.events and cfg.items):
            raise ValueError("training on files needs both --events and --items")
        ds = load_files(cfg.events, cfg.items, rejects, scenarios, actions)
    else:
        ds = load(cfg.dataset, seed=cfg.seed)
    return subset_users(ds, cfg.max_users)


def split(ds: Dataset, window: int) -> tuple[list, np.ndarray]:
    """The held-out evaluation samples and, per user, where training must stop."""
    held = eval_samples(ds, window)
    return held, train_limits(ds, held)


# --------------------------------------------------------------------------- stage 1: item tower


def item_states(
    ds: Dataset, spec: str, progress: bool, layers: int | None = None, dtype: str = "float32"
) -> np.ndarray:
    """Frozen-LLM hidden states of every item text, cached per dataset and LLM configuration (the same
    ``TextEncoder`` configuration the worker serves with, so the adapter is fitted to those states)."""
    tag = "" if layers is None and dtype == "float32" else f"-{layers or 'all'}l-{dtype}"
    cache = models_home() / "features" / f"{ds.name}-{Path(spec).name}-{ds.n_items}{tag}.npy"
    if cache.exists():
        return np.load(cache)
    states = TextEncoder(spec, layers=layers, dtype=dtype).encode(ds.item_text, progress=progress)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, states)
    return states


def train_item_tower(ds: Dataset, states: np.ndarray, limit: np.ndarray, cfg: TrainConfig, progress: bool) -> ItemTower:
    """Adapter + retrieval head on frozen states: consecutive training items are positives (InfoNCE)."""
    rng = seed_everything(cfg.seed)
    tower = ItemTower(states.shape[1], cfg.retrieval_dim)
    pairs = []
    for u in range(ds.n_users):
        idx = np.arange(ds.offsets[u], limit[u])
        pairs.append(np.stack([ds.item[idx[:-1]], ds.item[idx[1:]]], 1))
    pairs = np.concatenate(pairs)
    x = torch.as_tensor(states)
    opt = torch.optim.AdamW(tower.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scale = 1 / 0.07
    bs = 512
    steps = range(cfg.item_tower_epochs * math.ceil(len(pairs) / bs))
    for _ in tqdm(steps, desc="stage 1: item tower", disable=not progress):
        batch = pairs[rng.integers(0, len(pairs), bs)]
        a = tower(x[batch[:, 0]])[1]
        b = tower(x[batch[:, 1]])[1]
        logits = scale * a @ b.T
        same = torch.as_tensor(batch[:, 1][None, :] == batch[:, 1][:, None]) & ~torch.eye(bs, dtype=torch.bool)
        loss = F.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(bs))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return tower.eval()


def item_vectors(ds: Dataset, limit: np.ndarray, cfg: TrainConfig, progress: bool) -> tuple[np.ndarray, ItemTower]:
    if ds.item_vectors is not None:
        return ds.item_vectors, ItemTower(ds.item_vectors.shape[1], cfg.retrieval_dim)
    states = item_states(ds, cfg.item_backbone, progress, cfg.item_layers, cfg.item_dtype)
    tower = train_item_tower(ds, states, limit, cfg, progress)
    with torch.inference_mode():
        vecs = tower.item_vectors(torch.as_tensor(states)).numpy()
    return vecs, tower


# --------------------------------------------------------------------------- stage 3: user side


def model_config(ds: Dataset, cfg: TrainConfig, item_dim: int, **variant) -> ModelConfig:
    n_s = len(ds.scenarios)
    quotas = None if n_s == 1 else tuple([cfg.recent // 2] + [max(1, cfg.recent // (2 * (n_s - 1)))] * (n_s - 1))
    refiner_opts = {k: variant.pop(k) for k in ("use_coarse", "interests", "scenario_queries", "trend") if k in variant}
    trend = refiner_opts.get("trend", cfg.trend) and variant.get("variant", "full") != "comirec"
    id_items = ds.n_items if variant.pop("id_embeddings", cfg.id_embeddings) else 0
    coarse = CoarseConfig(
        item_dim=item_dim,
        num_scenarios=n_s,
        num_actions=len(ds.actions),
        d_model=cfg.coarse_dim,
        interests=cfg.coarse_interests,
    )
    refiner = RefinerConfig(
        item_dim=item_dim,
        coarse_dim=cfg.coarse_dim,
        num_scenarios=n_s,
        num_actions=len(ds.actions),
        interests=refiner_opts.get("interests", cfg.interests),
        recent=cfg.recent,
        quotas=quotas,
        use_coarse=refiner_opts.get("use_coarse", True),
        scenario_queries=refiner_opts.get("scenario_queries", True),
        backbone=cfg.backbone,
        backbone_layers=cfg.backbone_layers,
        trend=trend,
        trend_coords=1 if cfg.trend_long_tau_days is None else 2,
    )
    return ModelConfig(
        scenarios=ds.scenarios,
        actions=ds.actions,
        item_dim=item_dim,
        coarse=coarse,
        refiner=refiner,
        retrieval_dim=cfg.retrieval_dim,
        id_items=id_items,
        trend_tau_days=cfg.trend_tau_days,
        trend_long_tau_days=cfg.trend_long_tau_days,
        item_backbone=cfg.item_backbone,
        item_layers=cfg.item_layers,
        item_dtype=cfg.item_dtype,
        **variant,
    )


class TrendCache:
    """Item trend rows at sample times, from the training events only (read at the hour boundary at or
    before the time, so nothing at or after it is counted)."""

    def __init__(self, ds: Dataset, limit: np.ndarray, tau_days: float | tuple[float, ...]) -> None:
        keep = np.zeros(len(ds.ts), bool)
        for u in range(ds.n_users):
            keep[ds.offsets[u] : limit[u]] = True
        self.ts, self.item, self.n = ds.ts[keep], ds.item[keep], ds.n_items
        self.taus = [tau * 86400.0 for tau in np.atleast_1d(tau_days).tolist()]
        self.rows: dict[float, np.ndarray] = {}

    def at(self, t: float) -> np.ndarray:
        """(n_items,) with one τ, (n_items, c) with c of them."""
        t = math.floor(t / 3600.0) * 3600.0
        row = self.rows.get(t)
        if row is None:
            m = self.ts < t
            cols = [
                np.log1p(np.bincount(self.item[m], weights=np.exp(-(t - self.ts[m]) / tau), minlength=self.n))
                for tau in self.taus
            ]
            row = cols[0] if len(cols) == 1 else np.stack(cols, 1)
            self.rows[t] = row = row.astype(np.float32)
        return row


def train_user_model(
    ds: Dataset,
    model: UserModel,
    inputs: np.ndarray,
    vectors: np.ndarray,
    limit: np.ndarray,
    cfg: TrainConfig,
    progress: bool,
    desc: str = "stage 3: user model",
) -> list[float]:
    """DMIL training of coarse + refiner (+ the shared head). ``inputs`` feed the user side, ``vectors`` are targets."""
    rng = seed_everything(cfg.seed)
    trainable = [p for n, p in model.named_parameters() if not n.startswith("item_tower.adapter")]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))
    )
    item_x = torch.as_tensor(vectors, dtype=torch.float32)
    all_ids = torch.arange(ds.n_items)
    model.loss.served_weight = cfg.served_weight
    model.loss.dmil_weight = cfg.dmil_weight
    model.loss.log_q_strength = cfg.log_q_strength
    seen = np.concatenate([ds.item[ds.offsets[u] : limit[u]] for u in range(ds.n_users)])
    if model.cfg.id_items:
        model.id_known.copy_(torch.as_tensor(np.bincount(seen, minlength=ds.n_items) > 0))
    trends = TrendCache(ds, limit, model.trend_taus_days) if model.trend else None
    prior = None
    if cfg.log_q:
        counts = np.bincount(seen, minlength=ds.n_items) + 1.0
        prior = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32)
    losses: list[float] = []
    model.train()
    bar = tqdm(total=total, desc=desc, disable=not progress)
    while len(losses) < total:
        if cfg.sampler == "global":
            samples = global_train_samples(
                ds, limit, rng, cfg.window, horizon_days=cfg.horizon_days, recency_days=cfg.cut_recency_days
            )
        else:
            samples = train_samples(ds, limit, rng, cfg.window)
        order = rng.permutation(len(samples))
        for i in range(0, len(order), cfg.batch_size):
            if len(losses) >= total:
                break
            chunk = [samples[j] for j in order[i : i + cfg.batch_size]]
            batch = make_batch(ds, chunk, inputs, model.cfg, cfg.window)
            interests = model.interests(batch)
            all_ret = model.item_retrieval(item_x, all_ids)
            neg_ids = torch.as_tensor(rng.choice(ds.n_items, min(cfg.negatives, ds.n_items), replace=False))
            targets = all_ret[batch["target_ids"]]
            trend = None
            if trends is not None:
                trend = torch.as_tensor(np.stack([trends.at(s.time(ds)) for s in chunk]))
            loss = model.loss(
                interests, targets, batch["target_ids"], batch["valid"], all_ret[neg_ids], neg_ids, prior, trend
            )
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    bar.close()
    return losses


def fit_variant(
    ds: Dataset,
    cfg: TrainConfig,
    tower: ItemTower,
    vectors: np.ndarray,
    decoded: np.ndarray,
    limit: np.ndarray,
    progress: bool,
    name: str = "full",
    **variant,
) -> tuple[UserModel, list[float]]:
    mcfg = model_config(ds, cfg, vectors.shape[1], **variant)
    seed_everything(cfg.seed)
    model = UserModel(mcfg)
    model.item_tower.load_state_dict(copy.deepcopy(tower.state_dict()))
    inputs = decoded if mcfg.use_codebook else vectors
    losses = train_user_model(ds, model, inputs, vectors, limit, cfg, progress, desc=f"stage 3: {name}")
    if model.trend and (cfg.trend_gain != 1.0 or cfg.serve_tau_days is not None):
        model = model.with_served_trend(cfg.trend_gain, cfg.serve_tau_days)
    return model.eval(), losses


def run_train(cfg: TrainConfig, out: str | Path, progress: bool = True) -> Checkpoint:
    out = Path(out)
    t0 = time.perf_counter()
    from models.files import Rejects

    with Rejects(cfg.rejects) as rejects:
        ds = dataset_of(cfg, rejects)
    if rejects.total and progress:
        print(rejects.summary())
    cut = None
    if cfg.cut_quantile is not None:
        from models.temporal import before, cut_time

        cut = cut_time(ds, cfg.cut_quantile)
        ds = before(ds, cut)  # nothing at or after the cut exists for training
        limit = ds.offsets[1:].copy()
    else:
        _, limit = split(ds, cfg.window)
    timings = {}
    vectors, tower = item_vectors(ds, limit, cfg, progress)
    timings["item_tower_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    book = ResidualCodebook.fit(
        vectors,
        CodebookConfig(
            dim=vectors.shape[1],
            layers=cfg.codebook_layers,
            codewords=min(cfg.codewords, len(vectors) // 2),
            seed=cfg.seed,
        ),
        progress=progress,
    )
    enc = book.encode(vectors)
    decoded = book.decode(enc.codes, enc.alphas)
    timings["codebook_s"] = time.perf_counter() - t
    t = time.perf_counter()
    model, losses = fit_variant(ds, cfg, tower, vectors, decoded, limit, progress)
    timings["user_model_s"] = time.perf_counter() - t
    ckpt = Checkpoint(model, book, ds.item_ids, vectors, version=f"{ds.name}-{int(time.time())}")
    ckpt.save(out)
    report = {
        "config": asdict(cfg),
        "timings_s": timings,
        "wall_s": time.perf_counter() - t0,
        "loss_first": float(np.mean(losses[:10])),
        "loss_last": float(np.mean(losses[-10:])),
        "codebook_reconstruction_cosine": book.reconstruction_cosine(vectors),
        "codebook_bytes_per_item": book.cfg.bytes_per_item,
        "codebook_utilisation": book.utilisation(vectors),
        "item_dim": int(vectors.shape[1]),
        "cut": cut,
    }
    (out / "train.json").write_text(json.dumps(report, indent=2))
    if progress:
        print(
            f"trained {ds.name}: {ds.n_users} users, {ds.n_items} items, loss {report['loss_first']:.3f} → "
            f"{report['loss_last']:.3f}, codebook cos {report['codebook_reconstruction_cosine'][-1]:.3f} "
            f"({book.cfg.bytes_per_item} B/item), {report['wall_s']:.0f}s → {out}"
        )
    return ckpt
