"""The temporal protocol end to end: choices on the validation cut, then the test period once.

``run_temporal`` (``mirstream evaluate --protocol temporal``):

1. validation cut (train on ``ts < Tv``, score ``[Tv, T)``): the recent-popularity window, the item-kNN
   neighbourhood, SASRec's epochs and the user models' steps (a validation curve each; seed 0), and for a
   model with the trend coordinate how much of it to serve and with which τ (``serving_grid``: a factor on
   the learned weight and the served τ, scored on the same trained model);
2. test cut (train on ``ts < T``, score ``[T, end]``): every method refitted with those choices, for each
   seed; the test figures are computed once, after every choice is fixed, and written with the
   validation figures and the choices next to them.

The validation phase can be repeated with other seeds (``validation_seed``) and the runs merged by
``merge_validation`` (``mirstream evaluate --merge-validation``): every choice is then made on the figures
averaged over the seeds, and the merged report is what ``reuse`` (``--choices-from``) reads.

The user models are trained by ``models.train`` on ``split.train`` (the events before the cut, nothing
else) and scored through the served path: ``UserModel.retrieval_vectors`` for the items (with the trend
coordinate read at the cut) and the faiss max-merge over the K interests (``models.temporal.rank_vectors``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.batches import make_batch
from models.codebook import CodebookConfig, ResidualCodebook
from models.data import load
from models.sasrec import SASRecConfig, sasrec_scores, train_sasrec
from models.temporal import (
    KS,
    TemporalSplit,
    baselines,
    choose_baselines,
    evaluate_ranked,
    protocol_splits,
    rank_baseline,
    rank_vectors,
    trend_feature,
)
from models.train import TrainConfig, fit_variant, item_vectors
from models.user_model import UserModel

#: The user models compared: TrainConfig overrides (+ model variant options under "variant").
MODELS: dict[str, dict] = {
    # the model the stream serves today: content only, random cuts, K = 3
    "full": {},
    # + item-ID embeddings, the trend coordinate, samples that predict across a gap
    "hybrid": {"id_embeddings": True, "trend": True, "sampler": "global"},
    "hybrid_no_trend": {"id_embeddings": True, "sampler": "global"},
    "hybrid_no_ids": {"trend": True, "sampler": "global"},
    "hybrid_random_cuts": {"id_embeddings": True, "trend": True},
    "hybrid_k1": {"id_embeddings": True, "trend": True, "sampler": "global", "interests": 1},
    "hybrid_no_coarse": {"id_embeddings": True, "trend": True, "sampler": "global", "variant": {"use_coarse": False}},
    # sample times weighted toward the last weeks before the cut (exp(-age / 30 days))
    "hybrid_recent_cuts": {"id_embeddings": True, "trend": True, "sampler": "global", "cut_recency_days": 30.0},
    # the global sampler's horizon (targets in [t*, t* + horizon)): 21 days in "hybrid"
    "hybrid_h7": {"id_embeddings": True, "trend": True, "sampler": "global", "horizon_days": 7.0},
    "hybrid_h42": {"id_embeddings": True, "trend": True, "sampler": "global", "horizon_days": 42.0},
    # two trend coordinates: the validated short τ and 30 days, each with its learned weight
    "hybrid_2trend": {"id_embeddings": True, "trend": True, "sampler": "global", "trend_long_tau_days": 30.0},
    # half of the logQ correction in training (popular candidates' logits lowered less)
    "hybrid_logq_half": {"id_embeddings": True, "trend": True, "sampler": "global", "log_q_strength": 0.5},
    "hybrid_logq_quarter": {"id_embeddings": True, "trend": True, "sampler": "global", "log_q_strength": 0.25},
}
BASELINES = ("popularity", "recent_popularity", "item_knn", "transition", "sasrec")


def _cfg(base: TrainConfig, name: str, **extra) -> tuple[TrainConfig, dict]:
    opts = dict(MODELS[name])
    variant = opts.pop("variant", {})
    return replace(base, **opts, **extra), dict(variant)


class Stage12:
    """Item tower + codebook of one (split, seed), shared by every user model trained on that split."""

    def __init__(self, split: TemporalSplit, cfg: TrainConfig, progress: bool) -> None:
        ds = split.train
        self.limit = ds.offsets[1:].copy()
        self.vectors, self.tower = item_vectors(ds, self.limit, cfg, progress)
        book = ResidualCodebook.fit(
            self.vectors,
            CodebookConfig(
                dim=self.vectors.shape[1],
                layers=cfg.codebook_layers,
                codewords=min(cfg.codewords, len(self.vectors) // 2),
                seed=cfg.seed,
            ),
        )
        self.book = book
        enc = book.encode(self.vectors)
        self.decoded = book.decode(enc.codes, enc.alphas)


def rank_user_model(split: TemporalSplit, model: UserModel, stage: Stage12, batch_size: int = 128) -> list[list[int]]:
    """Rankings through the served API: item ``retrieval_vectors`` (ids, trend at the cut) + faiss max-merge."""
    ds = split.train
    inputs = stage.decoded if model.cfg.use_codebook else stage.vectors
    trend = None
    if model.trend:  # (n_items, c): each coordinate read at the cut with its τ
        trend = np.stack([trend_feature(ds, split.cut, tau) for tau in model.trend_taus_days], 1)
    items = model.retrieval_vectors(stage.vectors, ids=np.arange(ds.n_items), trend=trend)
    users = []
    for i in range(0, len(split.samples), batch_size):
        chunk = split.samples[i : i + batch_size]
        with torch.inference_mode():
            width = max(len(s.targets) for s in chunk)
            users.append(model.interests(make_batch(ds, chunk, inputs, model.cfg, width)).numpy())
    return rank_vectors(np.concatenate(users), items, [split.seen(s) for s in split.samples])


def _serving_key(gain: float, tau: float | None) -> str:
    return f"gain {gain:g}, tau {'train' if tau is None else f'{tau:g}'}"


def serving_grid(
    split: TemporalSplit, model: UserModel, stage: Stage12, gains: tuple[float, ...], taus: tuple[float, ...]
) -> tuple[dict[str, dict], tuple[float, float | None]]:
    """How much trend to serve and with which τ: every (gain, τ) scored on ``split`` with one trained model;
    returns the figures and the (gain, τ) of the best Recall@50 (ties: the earlier, gain 1 at the training τ
    first)."""
    grid: dict[str, dict] = {}
    options = [(1.0, None)] + [(g, t) for g in gains for t in (None, *taus) if (g, t) != (1.0, None)]
    for gain, tau in options:
        grid[_serving_key(gain, tau)] = evaluate_ranked(
            split, rank_user_model(split, model.with_served_trend(gain, tau), stage)
        )
    best = max(options, key=lambda o: grid[_serving_key(*o)]["recall@50"])
    return grid, best


def served_choices(choices: dict, name: str) -> dict:
    """The serving options validation chose for ``name`` (none recorded: gain 1 at the training τ)."""
    return {
        "trend_gain": choices.get(f"{name}_trend_gain", 1.0),
        "serve_tau_days": choices.get(f"{name}_serve_tau_days"),
    }


def fit_user_model(split: TemporalSplit, stage: Stage12, cfg: TrainConfig, variant: dict, progress: bool, name: str):
    model, _ = fit_variant(
        split.train, cfg, stage.tower, stage.vectors, stage.decoded, stage.limit, progress, name=name, **variant
    )
    return model


def sasrec_curve(split: TemporalSplit, cfg: SASRecConfig, seed: int, every: int) -> dict[int, dict]:
    hist = [split.train.item[s.start : s.cut] for s in split.samples]
    curve: dict[int, dict] = {}

    def on_eval(epoch, model):
        curve[epoch] = evaluate_ranked(split, rank_baseline(split, sasrec_scores(model, hist)))

    train_sasrec(split.train, cfg, seed, every, on_eval)
    return curve


def rank_sasrec(split: TemporalSplit, cfg: SASRecConfig, seed: int) -> list[list[int]]:
    model = train_sasrec(split.train, cfg, seed)
    return rank_baseline(split, sasrec_scores(model, [split.train.item[s.start : s.cut] for s in split.samples]))


def run_temporal(
    dataset: str = "ml-100k",
    seeds: tuple[int, ...] = (0, 1, 2),
    models: tuple[str, ...] = ("full", "hybrid", "hybrid_k1"),
    steps_grid: tuple[int, ...] = (300,),
    sasrec_epochs: int = 40,
    validate_fixed: bool = False,
    validation_only: bool = False,
    sasrec: bool = True,
    reuse: str | Path | None = None,
    test_q: float = 0.9,
    valid_q: float = 0.8,
    base: TrainConfig | None = None,
    out: str | Path = "runs/temporal",
    progress: bool = True,
    threads: int = 2,
    trend_gains: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0),
    serve_taus: tuple[float, ...] = (7.0, 14.0, 30.0),
    validation_seed: int = 0,
) -> dict:
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    # One item-tower epoch (the leave-last runs use 4): the tower is fitted once per cut and shared by
    # every user model and seed on that cut, so the seeds vary the user models, not the item vectors.
    base = replace(base or TrainConfig(item_tower_epochs=1), dataset=dataset)
    ds = load(dataset, seed=0)
    valid, test = protocol_splits(ds, test_q, valid_q)
    say = tqdm.write if progress else (lambda *_: None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"dataset": ds.name, "test_quantile": test_q, "valid_quantile": valid_q, "seeds": list(seeds)}
    report["validation_seed"] = validation_seed
    report["item_text"] = {"backbone": base.item_backbone, "layers": base.item_layers, "dtype": base.item_dtype}
    report["splits"] = {
        sp.name: {
            "cut": sp.cut,
            "end": None if not np.isfinite(sp.end) else sp.end,
            "users": len({s.user for s in sp.samples}),
            "samples": len(sp.samples),
            "targets": int(sum(len(s.targets) for s in sp.samples)),
            "train_events": len(sp.train.ts),
        }
        for sp in (valid, test)
    }

    # ---------------------------------------------------------------- 1. every choice on the validation cut
    if reuse is None:
        choices, grid = choose_baselines(valid)
        say(f"validation: baselines {choices}")
        sas_cfg = SASRecConfig(epochs=sasrec_epochs, lr=3e-3)
        validation: dict[str, dict] = {
            name: evaluate_ranked(valid, r)
            for name, r in baselines(valid, choices["recent_window_days"], choices["knn_neighbours"]).items()
        }
        curve: dict[int, dict] = {}
        if sasrec:
            curve = sasrec_curve(valid, sas_cfg, seed=0, every=10)
            choices["sasrec_epochs"] = max(curve, key=lambda e: curve[e]["recall@50"])
            shown = {e: round(m["recall@50"], 4) for e, m in curve.items()}
            say(f"validation: SASRec epochs {choices['sasrec_epochs']} (R@50 by epoch {shown})")
            validation["sasrec"] = curve[choices["sasrec_epochs"]]
        model_grid: dict[str, dict] = {}
        # the trend's time constant: the recent-popularity window that won on validation
        base = replace(base, trend_tau_days=float(choices["recent_window_days"]))
        base0 = replace(base, seed=0)  # the test cut's shared item tower + codebook
        base_v = replace(base, seed=validation_seed)
        stage = Stage12(valid, base_v, progress)
        for name in models:
            model_grid[name] = {}
            if name == "full" and not validate_fixed:  # nothing of it is chosen: scored on the test cut only
                choices["full_steps"] = steps_grid[-1]
                continue
            serving: dict[int, tuple[float, float | None]] = {}
            for steps in steps_grid:
                cfg, variant = _cfg(base_v, name, steps=steps)
                model = fit_user_model(valid, stage, cfg, variant, progress, f"validation {name} {steps} steps")
                model_grid[name][steps] = evaluate_ranked(valid, rank_user_model(valid, model, stage))
                say(f"validation: {name} {steps} steps R@50 {model_grid[name][steps]['recall@50']:.4f}")
                serving[steps] = (1.0, None)
                if model.trend and (trend_gains != (1.0,) or serve_taus):
                    grid_s, serving[steps] = serving_grid(valid, model, stage, trend_gains, serve_taus)
                    model_grid[name][f"{steps} serving"] = grid_s
                    model_grid[name][steps] = grid_s[_serving_key(*serving[steps])]
                    say(f"validation: {name} {steps} steps, served trend (gain, τ) {serving[steps]} R@50 "
                        f"{model_grid[name][steps]['recall@50']:.4f}")  # fmt: skip
            best = max(steps_grid, key=lambda s: model_grid[name][s]["recall@50"])
            choices[f"{name}_steps"] = best
            choices[f"{name}_trend_gain"], choices[f"{name}_serve_tau_days"] = serving[best]
            validation[name] = model_grid[name][best]
            (out / "temporal.json").write_text(json.dumps({**report, "partial_validation": model_grid}, default=str))
        # K (and any other hybrid option): the hybrid variant that did best on validation goes to the test cut
        hybrids = [m for m in models if m.startswith("hybrid")]
        tested = [m for m in models if not m.startswith("hybrid")]
        if hybrids:
            choices["hybrid_variant"] = max(hybrids, key=lambda m: validation[m]["recall@50"])
            tested.append(choices["hybrid_variant"])
        report.update(
            choices=choices,
            validation=validation,
            validation_grid={"baselines": grid, "sasrec": curve, "models": model_grid},
        )
        (out / "temporal.json").write_text(json.dumps(report, indent=2, default=str))
    else:  # the choices (and validation figures) of an earlier run's phase 1: test phase only
        earlier = json.loads(Path(reuse).read_text())
        choices = earlier["choices"]
        report.update(choices=choices, validation=earlier["validation"], validation_grid=earlier["validation_grid"])
        report["choices_from"] = str(reuse)
        # the models named; of the hybrids, those named (e.g. a reference row for an earlier choice, in a run
        # of its own), or else the variant validation chose
        named = [m for m in models if m.startswith("hybrid")]
        tested = [m for m in models if not m.startswith("hybrid")] + (named or [choices["hybrid_variant"]])
        sas_cfg = SASRecConfig(epochs=sasrec_epochs, lr=3e-3)
        base = replace(base, trend_tau_days=float(choices["recent_window_days"]))
        base0 = replace(base, seed=0)
    if validation_only:
        md = markdown_validation(report)
        (out / "temporal.md").write_text(md)
        say(md)
        return report

    # ---------------------------------------------------------------- 2. the test period, once, per seed
    per_seed: dict[str, list[dict]] = {}
    fixed = baselines(test, choices["recent_window_days"], choices["knn_neighbours"])
    for name, ranked in fixed.items():  # deterministic: the same for every seed
        per_seed[name] = [evaluate_ranked(test, ranked)] * len(seeds)
    stage = Stage12(test, base0, progress)
    for seed in seeds:
        cfg_seed = replace(base, seed=seed)
        for name in reversed(tested):
            cfg, variant = _cfg(cfg_seed, name, steps=choices.get(f"{name}_steps", steps_grid[-1]))
            model = fit_user_model(test, stage, cfg, variant, progress, f"test {name} seed {seed}")
            served = served_choices(choices, name)
            if model.trend and served != {"trend_gain": 1.0, "serve_tau_days": None}:
                # the same weights served as trained too: what the validated serving choice changes
                as_trained = evaluate_ranked(test, rank_user_model(test, model, stage))
                per_seed.setdefault(f"{name} (trend as trained)", []).append(as_trained)
                model = model.with_served_trend(served["trend_gain"], served["serve_tau_days"])
            per_seed.setdefault(name, []).append(evaluate_ranked(test, rank_user_model(test, model, stage)))
            (out / "temporal.json").write_text(json.dumps({**report, "test_per_seed": per_seed}, default=str))
        if sasrec:
            sas = replace(sas_cfg, epochs=choices["sasrec_epochs"])
            per_seed.setdefault("sasrec", []).append(evaluate_ranked(test, rank_sasrec(test, sas, seed)))
        (out / "temporal.json").write_text(json.dumps({**report, "test_per_seed": per_seed}, default=str))
        say(f"test: seed {seed} done ({time.perf_counter() - t0:.0f}s)")
    report["test_per_seed"] = per_seed
    report["test"] = {name: summarise(runs) for name, runs in per_seed.items()}
    report["train_config"] = asdict(base)
    report["wall_s"] = time.perf_counter() - t0
    (out / "temporal.json").write_text(json.dumps(report, indent=2, default=str))
    md = markdown(report)
    (out / "temporal.md").write_text(md)
    if progress:
        tqdm.write(md)
    return report


def _serving_option(key: str) -> tuple[float, float | None]:
    gain, tau = (part.split()[1] for part in key.split(", "))
    return float(gain), None if tau == "train" else float(tau)


def merge_validation(paths: list[str | Path], out: str | Path) -> dict:
    """One validation phase from ``--validation-only`` runs on several validation seeds (and runs of one seed
    that hold different models): each model's figures, steps grid and serving grid averaged over the seeds,
    then every choice made as ``run_temporal`` makes it, on the averages.  A model (or a steps value) is
    eligible only if every seed scored it; the others are kept in the report, unaveraged, for reference.
    A run stopped after some of its models contributes the models it finished (its partial grid)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    seeds = sorted({r.get("validation_seed", 0) for r in reports})
    complete = [r for r in reports if "choices" in r]  # the others were stopped after some of their models
    if not complete:
        raise ValueError("no finished validation run among the reports (the baselines' choices are in those)")
    first = complete[0]
    for r in complete:
        if r["choices"]["recent_window_days"] != first["choices"]["recent_window_days"]:
            raise ValueError("validation runs with different baseline choices cannot be merged")
    # per model: per seed, its grid (the first run of that seed holding the model)
    grids: dict[str, dict[int, dict]] = {}
    for r in reports:
        models = r["validation_grid"]["models"] if "validation_grid" in r else r.get("partial_validation", {})
        for name, g in models.items():
            if g:
                grids.setdefault(name, {}).setdefault(r.get("validation_seed", 0), g)

    def mean(ms: list[dict]) -> dict:
        return {k: float(np.mean([m[k] for m in ms])) for k in ms[0]}

    choices = {k: v for k, v in first["choices"].items() if k in ("recent_window_days", "knn_neighbours")}
    if "sasrec_epochs" in first["choices"]:
        choices["sasrec_epochs"] = first["choices"]["sasrec_epochs"]
    validation = {k: v for k, v in first["validation"].items() if k in BASELINES}
    model_grid: dict[str, dict] = {}
    single: dict[str, dict] = {}
    for name, by_seed in grids.items():
        if set(by_seed) != set(seeds):
            single[name] = {str(sd): g for sd, g in by_seed.items()}
            continue
        runs = list(by_seed.values())
        steps_all = [k for k in runs[0] if not str(k).endswith("serving")]
        steps_common = [s for s in steps_all if all(s in g for g in runs)]
        model_grid[name] = {}
        serving: dict[str, tuple[float, float | None]] = {}
        for steps in steps_common:
            key = f"{steps} serving"
            if all(key in g for g in runs):
                opts = [k for k in runs[0][key] if all(k in g[key] for g in runs)]
                grid_s = {k: mean([g[key][k] for g in runs]) for k in opts}
                best = max(opts, key=lambda k: grid_s[k]["recall@50"])  # ties: the earlier (gain 1, training τ)
                model_grid[name][key] = grid_s
                model_grid[name][steps] = grid_s[best]
                serving[steps] = _serving_option(best)
            else:
                model_grid[name][steps] = mean([g[steps] for g in runs])
                serving[steps] = (1.0, None)
        best_steps = max(steps_common, key=lambda s: model_grid[name][s]["recall@50"])
        choices[f"{name}_steps"] = int(best_steps)
        choices[f"{name}_trend_gain"], choices[f"{name}_serve_tau_days"] = serving[best_steps]
        validation[name] = model_grid[name][best_steps]
    hybrids = [m for m in model_grid if m.startswith("hybrid")]
    if hybrids:
        choices["hybrid_variant"] = max(hybrids, key=lambda m: validation[m]["recall@50"])
    merged = {k: v for k, v in first.items() if k not in ("choices", "validation", "validation_grid")}
    merged.pop("partial_validation", None)
    merged.update(
        validation_seeds=seeds,
        choices=choices,
        validation=validation,
        validation_grid={
            "baselines": first["validation_grid"]["baselines"],
            "sasrec": first["validation_grid"].get("sasrec", {}),
            "models": model_grid,
            "single_seed_models": single,
        },
        merged_from=[str(p) for p in paths],
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "temporal.json").write_text(json.dumps(merged, indent=2, default=str))
    md = markdown_validation(merged)
    (out / "temporal.md").write_text(md)
    return merged


def merge_reports(paths: list[str | Path], out: str | Path) -> dict:
    """One report from runs of the same choices on different seeds (``reuse`` of one phase 1)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    merged = {k: v for k, v in reports[0].items() if k not in ("test_per_seed", "test", "seeds", "wall_s")}
    merged["seeds"], merged["test_per_seed"] = [], {}
    for r in reports:
        if r["choices"] != merged["choices"]:
            raise ValueError(f"runs with different validation choices cannot be merged: {paths}")
        merged["seeds"] += r["seeds"]
        for name, runs in r["test_per_seed"].items():
            merged["test_per_seed"].setdefault(name, []).extend(runs)
    merged["test"] = {name: summarise(runs) for name, runs in merged["test_per_seed"].items()}
    merged["merged_from"] = [str(p) for p in paths]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "temporal.json").write_text(json.dumps(merged, indent=2, default=str))
    (out / "temporal.md").write_text(markdown(merged))
    return merged


def summarise(runs: list[dict]) -> dict[str, tuple[float, float]]:
    return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))) for k in runs[0]}


COLUMNS = [f"recall@{k}" for k in KS] + ["ndcg@50", "next_recall@50", "coverage@50"]


def markdown_validation(report: dict) -> str:
    sp = report["splits"]["validation"]
    seeds = report.get("validation_seeds", [report.get("validation_seed", 0)])
    shown = f"seed {seeds[0]}" if len(seeds) == 1 else f"models: mean of seeds {', '.join(map(str, seeds))}"
    lines = [
        f"validation cut ({sp['users']} users, {sp['targets']} targets, {shown}):",
        "",
        "| method | " + " | ".join(COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name, m in report["validation"].items():
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def markdown(report: dict) -> str:
    sp = report["splits"]
    lines = [
        f"### {report['dataset']}, global temporal split: train before the {report['test_quantile']} time quantile, "
        f"{sp['test']['users']} users, {sp['test']['targets']} targets; seeds {report['seeds']} (mean ± sd)",
        "",
        "| method | " + " | ".join(COLUMNS) + " | validation R@50 |",
        "|---|" + "---:|" * (len(COLUMNS) + 1),
    ]
    for name, m in report["test"].items():
        runs = len(report.get("test_per_seed", {}).get(name, report["seeds"]))
        shown = name if runs == len(report["seeds"]) else f"{name} ({runs} of the seeds)"
        cells = [f"{m[c][0]:.4f} ± {m[c][1]:.4f}" if m[c][1] > 0 else f"{m[c][0]:.4f}" for c in COLUMNS]
        v = report["validation"].get(name, {}).get("recall@50")
        lines.append(f"| {shown} | " + " | ".join(cells) + (f" | {v:.4f} |" if v is not None else " | — |"))
    lines += ["", markdown_validation(report)]
    cold = report["test"]["popularity"]["cold_target_share"][0] if "popularity" in report["test"] else float("nan")
    lines += ["", f"cold-item share of the test targets: {cold:.4f}", f"choices (validation cut): {report['choices']}"]
    return "\n".join(lines) + "\n"
