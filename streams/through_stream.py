"""The temporal protocol scored through the served path: the number a user gets is the number reported.

``mirstream evaluate --protocol temporal --through-stream``:

1. trains one user model on the events before the test cut T, with the validation cut's choices (an
   earlier ``temporal.json``), and scores it offline (``models.temporal_run.rank_user_model``);
2. saves it as a checkpoint, starts a real worker on it (real Kafka, real Redis, fresh topics/prefix),
   produces the catalogue (each item's vector) and every pre-T event in time order, and waits until every
   user's vectors reflect all of its events;
3. reads the users' vectors and the items' index rows back from Redis (``streams.search.index_vectors``:
   stored ``ret`` + the trend coordinate the agents counted, read at T) and scores them on the same
   samples (``models.temporal.score_served``);
4. checks parity on a sample of users: the stored vectors against the offline model's on the same
   history as the worker stores it (``as_stored``: times floored to the minute, in the order the refiner
   reads them), and reports the cosine to the offline model on the exact times beside it.

Nothing of the test period reaches the worker: it sees only pre-T events.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import torch
from tqdm import tqdm

from models.batches import make_batch
from models.data import Dataset, load
from models.temporal import evaluate_ranked, protocol_splits, score_served, trend_feature
from models.temporal_run import MODELS, Stage12, _cfg, fit_user_model, rank_user_model, served_choices
from models.train import TrainConfig
from models.user_model import Checkpoint
from state.history import MINUTE, minutes
from streams.replay import expected_seq, plan, producer, send_events, wait_for_items, wait_for_vectors
from streams.search import index_vectors
from streams.security import interest_reader
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

#: Choices used when no validation report is given (those ``mirstream evaluate --protocol temporal``
#: made on the ML-100K validation cut; pass ``--choices-from`` to use a run's own).
DEFAULT_CHOICES = {
    "recent_window_days": 3,
    "hybrid_steps": 300,
    "full_steps": 300,
    "hybrid_trend_gain": 4.0,
    "hybrid_serve_tau_days": 14.0,
    "hybrid_variant": "hybrid_logq_half",
    "hybrid_logq_half_steps": 300,
    "hybrid_logq_half_trend_gain": 4.0,
    "hybrid_logq_half_serve_tau_days": None,
}


def _send_catalogue(settings: Settings, item_ids: np.ndarray, vectors: np.ndarray) -> None:
    p = producer(settings)
    for j, item in enumerate(item_ids.tolist()):
        body = {"item_id": str(item), "vector": vectors[j].tolist()}
        p.send(settings.items_topic, key=str(item).encode(), value=orjson.dumps(body))
    p.flush()
    p.close()


class _SavedStage:
    """What ``rank_user_model`` reads of a ``Stage12``, from a saved checkpoint: the item vectors and their
    codebook reconstruction."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.book, self.vectors = ckpt, ckpt.codebook, ckpt.item_vectors
        enc = ckpt.codebook.encode(ckpt.item_vectors)
        self.decoded = ckpt.codebook.decode(enc.codes, enc.alphas)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def as_stored(ds: Dataset) -> Dataset:
    """The events as a worker's history records hold them (``state.history``): times floored to the minute,
    each user's in (minute, scenario) order, ties in the order the replay applies them (the dataset's), as
    ``streams.refinement.user_inputs`` reads them."""
    ts = minutes(ds.ts) * MINUTE
    order = np.lexsort((ds.scenario, ts, ds.user))  # stable: full ties keep the dataset's order
    lists = {c: [getattr(ds, c)[i] for i in order] for c in ("query", "event_ids") if getattr(ds, c) is not None}
    return replace(
        ds,
        user=ds.user[order],
        item=ds.item[order],
        scenario=ds.scenario[order],
        action=ds.action[order],
        ts=ts[order],
        **lists,
    )


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return (a * b).sum(-1)


def run_through_stream(
    settings: Settings,
    dataset: str = "ml-100k",
    model: str | None = None,
    seed: int = 0,
    choices_from: str | Path | None = None,
    out: str | Path = "runs/through-stream",
    parity_users: int = 100,
    threads: int = 2,
    progress: bool = True,
    steps: int | None = None,
    checkpoint: str | Path | None = None,
) -> dict:
    """Runs steps 1-4 and writes ``through_stream.json``; ``steps`` overrides the validation choice (tests);
    ``checkpoint``: a checkpoint an earlier run saved (trained before the same cut) instead of training."""
    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = tqdm.write if progress else (lambda *_: None)
    choices = json.loads(Path(choices_from).read_text())["choices"] if choices_from else dict(DEFAULT_CHOICES)
    model = model or choices.get("hybrid_variant", "hybrid")  # default: the variant validation chose
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}: choose from {sorted(MODELS)}")
    steps = steps or choices.get(f"{model}_steps", choices.get("hybrid_steps", 300))

    # ---------------------------------------------------------------- 1. the model, offline
    ds = load(dataset, seed=0)
    _, test = protocol_splits(ds)
    base = replace(
        TrainConfig(item_tower_epochs=1), dataset=dataset, trend_tau_days=float(choices["recent_window_days"])
    )
    if checkpoint is None:
        stage = Stage12(test, replace(base, seed=0), progress)
        cfg, variant = _cfg(replace(base, seed=seed), model, steps=steps, **served_choices(choices, model))
        um = fit_user_model(test, stage, cfg, variant, progress, f"{model} seed {seed}")
        version = f"{ds.name}-temporal-{model}-s{seed}-{int(time.time())}"
        ckpt_dir = out / "checkpoint"
        Checkpoint(um, stage.book, ds.item_ids, stage.vectors, version).save(ckpt_dir)
    else:
        ckpt_dir = Path(checkpoint)
        stage = _SavedStage(Checkpoint.load(ckpt_dir))
        um = stage.ckpt.model
        if [str(i) for i in stage.ckpt.item_ids.tolist()] != [str(i) for i in ds.item_ids.tolist()]:
            raise ValueError(f"{ckpt_dir} was not trained on {dataset}'s item table")
    offline = evaluate_ranked(test, rank_user_model(test, um, stage))
    say(f"offline: {model} R@50 {offline['recall@50']:.4f} NDCG@50 {offline['ndcg@50']:.4f}")

    # ---------------------------------------------------------------- 2. the pre-T stream through a worker
    run = f"thru{int(time.time() * 1000) % 10**8}"
    s = settings.with_(
        checkpoint=str(ckpt_dir),
        prefix=run,
        app_id=f"mirstream-{run}",
        scenarios=tuple(ds.scenarios),
        refine=True,
        web_port=_free_port(),  # its pages are not needed; a free port keeps it clear of any running worker
    )
    ensure_topics(s)
    replay = plan(test.train)
    expected = expected_seq(test.train, replay.events)
    t0 = time.perf_counter()
    with WorkerProcess(s, log=out / "worker.log"):
        _send_catalogue(s, ds.item_ids, stage.vectors)
        if not wait_for_items(s, ds.n_items, timeout=600):
            raise RuntimeError(f"the worker did not store the {ds.n_items} items in time (see {out / 'worker.log'})")
        rate = send_events(s, test.train, replay.events, progress=progress)
        behind = wait_for_vectors(s, expected, timeout=1800, progress=progress)
    wall = time.perf_counter() - t0
    if behind:
        raise RuntimeError(f"{len(behind)} users' vectors did not reflect all their events (see {out / 'worker.log'})")

    # ---------------------------------------------------------------- 3. score what Redis holds
    reader = interest_reader(s)
    ids, rows = index_vectors(reader, at=test.cut)
    where = {it: i for i, it in enumerate(ids)}
    items = rows[[where[str(it)] for it in ds.item_ids.tolist()]]
    stored: dict[str, np.ndarray] = {}
    for u in sorted({smp.user for smp in test.samples}):
        found = reader.interests(str(ds.user_ids[u]))
        if found is not None:  # scenario-major in the dataset's scenario order, as score_served reads it
            stored[str(ds.user_ids[u])] = np.concatenate([found.vectors[sc] for sc in ds.scenarios])
    served = score_served(test, stored, items, um.cfg.interests)
    say(f"through the stream: {model} R@50 {served['recall@50']:.4f} NDCG@50 {served['ndcg@50']:.4f}")

    # ---------------------------------------------------------------- 4. parity on a sample of users
    rng = np.random.default_rng(seed)
    picks = sorted(rng.choice(len(test.samples), min(parity_users, len(test.samples)), replace=False).tolist())
    sample = [test.samples[i] for i in picks]
    inputs = stage.decoded if um.cfg.use_codebook else stage.vectors
    with torch.inference_mode():
        width = max(len(smp.targets) for smp in sample)
        want = um.interests(make_batch(as_stored(test.train), sample, inputs, um.cfg, width)).numpy()
        exact = um.interests(make_batch(test.train, sample, inputs, um.cfg, width)).numpy()
    got = np.stack(
        [stored[str(ds.user_ids[smp.user])].reshape(-1, um.cfg.interests, want.shape[-1])[smp.ask] for smp in sample]
    )
    cos, cos_exact = _cosines(got, want), _cosines(got, exact)
    d = um.cfg.retrieval_dim
    item_cos = _cosines(items[:, :d], um.stored_retrieval(stage.vectors, np.arange(ds.n_items)))
    trend_err = 0.0
    if um.trend:  # the counts the agents kept vs the same quantity computed from the dataset
        trend_err = float(np.abs(items[:, d] - trend_feature(test.train, test.cut, um.cfg.trend_tau_days)).max())
    report = {
        "dataset": ds.name,
        "model": model,
        "seed": seed,
        "steps": steps,
        "choices": choices,
        "events": len(replay.events),
        "users": len(expected),
        "offered_events_per_s": rate,
        "stream_wall_s": wall,
        "offline": offline,
        "through_stream": served,
        "delta_recall@50": served["recall@50"] - offline["recall@50"],
        "parity_users": len(sample),
        "user_cosine_min": float(cos.min()),
        "user_cosine_median": float(np.median(cos)),
        "user_cosine_min_exact_times": float(cos_exact.min()),
        "item_cosine_min": float(item_cos.min()),
        "trend_max_abs_error": trend_err,
    }
    (out / "through_stream.json").write_text(json.dumps(report, indent=2))
    say(
        f"ΔR@50 {report['delta_recall@50']:+.4f}; user vectors cosine min {report['user_cosine_min']:.5f} "
        f"(median {report['user_cosine_median']:.5f}; {report['user_cosine_min_exact_times']:.5f} against exact "
        f"times) over {len(sample)} samples; item rows cosine min "
        f"{report['item_cosine_min']:.5f}; trend coordinate max |error| {trend_err:.2e}"
    )
    return report
