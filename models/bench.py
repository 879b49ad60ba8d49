"""Offline benchmarks of the models: codebook, coarse state, refiner backbones (``mirstream bench <part>``).

Every figure is measured in the same run as its baseline, and timings are medians of repeats (the
machines this runs on are small and shared).  Each part returns rows, prints a markdown table and
writes ``<out>/<part>.json``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch

from models.coarse import CoarseConfig, CoarseInterests
from models.codebook import CodebookConfig, ResidualCodebook
from models.item_tower import ProjectionHead
from models.refiner import Refiner, RefinerConfig, UserInput, collate


def median_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def write_rows(out: str | Path, part: str, rows: list[dict]) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"{part}.json").write_text(json.dumps(rows, indent=2))


def print_table(header: list[str], align: str, cells: list[list[str]]) -> None:
    """Prints a markdown table; ``align`` has one letter per column: l (left) or r (right)."""
    print("| " + " | ".join(header) + " |")
    print("|" + "".join("---:|" if a == "r" else "---|" for a in align))
    for row in cells:
        print("| " + " | ".join(row) + " |")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


# ---------------------------------------------------------------------------------------------- codebook
def item_vectors_for_bench(dataset: str) -> tuple[str, np.ndarray]:
    """Content-LLM item vectors: frozen SmolLM2 states of MovieLens-100K titles, or the simulator's."""
    from models.data import load

    ds = load(dataset)
    if ds.item_vectors is not None:
        return f"{ds.name} item vectors", ds.item_vectors
    from models.train import item_states

    return f"{ds.name} SmolLM2-135M item states", item_states(ds, "smollm2", progress=True)


def bench_codebook(dataset: str = "ml-100k", layers: tuple[int, ...] = (1, 2, 3, 4), out: str = "bench") -> list[dict]:
    """Bytes/item and held-out reconstruction cosine: ours vs float32/float16 and faiss RQ/PQ at equal bytes."""
    source, vectors = item_vectors_for_bench(dataset)
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(vectors))
    cut = int(0.8 * len(vectors))
    train, test = vectors[order[:cut]], vectors[order[cut:]]
    n, d = test.shape
    f32 = 4 * d
    mean = train.mean(0)
    rows: list[dict] = []

    def row(method: str, nbytes: int, rec: np.ndarray, encode_s: float | None) -> None:
        rows.append(
            {
                "method": method,
                "bytes_per_item": nbytes,
                "x_smaller_than_float32": f32 / nbytes if nbytes else float("inf"),
                "reconstruction_cosine": _cos(test, rec),
                # LLM states share a large common direction; centred, the cosine shows what the code keeps.
                "centred_cosine": _cos(test - mean, rec - mean),
                "encode_items_per_s": n / encode_s if encode_s else None,
            }
        )

    row("float32", f32, test, None)
    row("float16", 2 * d, test.astype(np.float16).astype(np.float32), None)
    row("mean vector only (what is free)", 0, np.broadcast_to(mean, test.shape), None)
    for L in layers:
        book = ResidualCodebook.fit(train, CodebookConfig(dim=d, layers=L))
        enc = book.encode(test)
        row(
            f"cosine residual codebook, {L} layer(s)",
            book.cfg.bytes_per_item,
            book.decode(enc.codes, enc.alphas),
            median_time(lambda b=book: b.encode(test), 3),
        )
        budget = book.cfg.bytes_per_item  # one byte per code, one per alpha
        faiss_quantizers = [("ResidualQuantizer", faiss.ResidualQuantizer(d, budget, 8))]
        if d % budget == 0:
            faiss_quantizers.append(("ProductQuantizer", faiss.ProductQuantizer(d, budget, 8)))
        for name, q in faiss_quantizers:
            q.train(train)
            row(
                f"faiss {name} {budget}x8 bits",
                q.code_size,
                q.decode(q.compute_codes(test)),
                median_time(lambda q=q: q.compute_codes(test), 3),
            )
    write_rows(out, "codebook", rows)
    print(f"codebook: {source}, {len(train)} items to fit, {n} held-out items to measure, d={d}\n")
    print_table(
        ["method", "bytes/item", "× smaller than float32", "held-out cosine", "centred cosine", "encode items/s"],
        "lrrrrr",
        [
            [
                r["method"],
                str(r["bytes_per_item"]),
                f"{r['x_smaller_than_float32']:.0f}",
                f"{r['reconstruction_cosine']:.4f}",
                f"{r['centred_cosine']:.4f}",
                f"{r['encode_items_per_s']:,.0f}" if r["encode_items_per_s"] else "—",
            ]
            for r in rows
        ],
    )
    return rows


# ---------------------------------------------------------------------------------------------- coarse
def bench_coarse(histories: tuple[int, ...] = (100, 1000, 10000), out: str = "bench") -> list[dict]:
    """Cost of folding one new event into the O(1) state vs recomputing the model over the whole history."""
    torch.manual_seed(0)
    model = CoarseInterests(CoarseConfig(item_dim=64, num_scenarios=3, num_actions=3)).eval()
    rng = np.random.default_rng(0)
    rows = []
    for t in histories:
        items = rng.normal(size=(t + 1, 64)).astype(np.float32)
        scen, act = rng.integers(0, 3, t + 1), rng.integers(0, 3, t + 1)
        ts = np.sort(rng.uniform(1.7e9, 1.7e9 + 86400 * 365, t + 1))
        state = model.update(model.init_state(), items[:t], scen[:t], act[:t], ts[:t])

        def incremental(state=state, items=items, scen=scen, act=act, ts=ts, t=t) -> None:
            model.read(model.update(state, items[t:], scen[t:], act[t:], ts[t:]))

        tensors = [torch.as_tensor(x)[None] for x in (items, scen, act, ts)]
        mask = torch.ones(1, t + 1, dtype=torch.bool)

        def recompute(tensors=tensors, mask=mask) -> None:
            with torch.inference_mode():
                model(*tensors, mask)

        # The ingest path: a batch of 256 events of 100 users folded in one call (``update_many``).
        states = np.repeat(state[None], 100, axis=0)
        bi, bs, ba = items[-1:].repeat(256, 0), scen[-1:].repeat(256), act[-1:].repeat(256)
        bts, owner = ts[-1:].repeat(256), rng.integers(0, 100, 256)

        def batched(states=states, bi=bi, bs=bs, ba=ba, bts=bts, owner=owner) -> None:
            model.update_many(states, bi, bs, ba, bts, owner)

        reps = 200 if t <= 1000 else 30
        inc, full = median_time(incremental, reps, 5), median_time(recompute, max(5, reps // 10), 2)
        batch = median_time(batched, 30, 2) / 256
        rows.append(
            {
                "history": t,
                "incremental_us_per_event": inc * 1e6,
                "batched_us_per_event": batch * 1e6,
                "recompute_us_per_event": full * 1e6,
                "ratio": full / inc,
                "ratio_batched": full / batch,
                "state_bytes": model.state_size * 8,
                "raw_history_bytes": (t + 1) * 64 * 4,
            }
        )
    write_rows(out, "coarse", rows)
    print_table(
        [
            "history",
            "recompute µs/event",
            "incremental µs/event (1 event/call)",
            "ratio",
            "incremental µs/event (256 events of 100 users/call, as ingest)",
            "ratio",
            "state bytes",
            "raw float32 bytes",
        ],
        "rrrrrrrr",
        [
            [
                f"{r['history']:,}",
                f"{r['recompute_us_per_event']:,.0f}",
                f"{r['incremental_us_per_event']:.0f}",
                f"{r['ratio']:.1f}x",
                f"{r['batched_us_per_event']:.1f}",
                f"{r['ratio_batched']:.0f}x",
                f"{r['state_bytes']:,}",
                f"{r['raw_history_bytes']:,}",
            ]
            for r in rows
        ],
    )
    return rows


# ---------------------------------------------------------------------------------------------- refiner
def bench_refiner(
    backbones: tuple[str, ...] = ("tiny", "smollm2:4", "smollm2"),
    batch_sizes: tuple[int, ...] = (1, 8, 32, 128),
    recent: int = 64,
    repeats: int = 5,
    out: str = "bench",
) -> list[dict]:
    """Users/s and batch latency of the refiner per backbone ("name" or "name:first_n_layers"), 3 scenarios."""
    rng = np.random.default_rng(0)
    rows: list[dict] = []
    for spec in backbones:
        name, _, layers = spec.partition(":")
        cfg = RefinerConfig(
            item_dim=64,
            coarse_dim=64,
            num_scenarios=3,
            num_actions=3,
            recent=recent,
            quotas=(32, 16, 16),
            backbone=name,
            backbone_layers=int(layers) if layers else None,
        )
        torch.manual_seed(0)
        model = Refiner(cfg, ProjectionHead(64, 64)).eval()
        params = sum(p.numel() for p in model.backbone.parameters()) / 1e6
        for b in batch_sizes:
            users = [
                UserInput(
                    rng.normal(size=(4, 64)).astype(np.float32),
                    rng.normal(size=(recent, 64)).astype(np.float32),
                    rng.integers(0, 3, recent),
                    rng.integers(0, 3, recent),
                    np.sort(rng.uniform(0, 1e6, recent)),
                )
                for _ in range(b)
            ]
            times, ref_times = [], []
            model.refine(users[:1], [0, 1, 2])  # warm-up
            rows_in = collate(cfg, users, [(i, s) for i in range(b) for s in range(3)])
            # A 135M-parameter decoder takes minutes per 128-user call on 2 cores: fewer repeats there.
            for _ in range(repeats if b * params < 1000 else 1):
                t0 = time.perf_counter()
                model.refine(users, [0, 1, 2])
                times.append(time.perf_counter() - t0)
                if name == "tiny":  # the reference: ``forward`` on one row per (user, scenario)
                    t0 = time.perf_counter()
                    with torch.inference_mode():
                        model(**rows_in)
                    ref_times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            rows.append(
                {
                    "backbone": spec,
                    "params_m": params,
                    "batch": b,
                    "p50_s": med,
                    "max_s": float(max(times)),
                    "users_per_s": b / med,
                    "reference_p50_s": float(np.median(ref_times)) if ref_times else None,
                }
            )
    write_rows(out, "refiner", rows)
    print(f"refiner: {recent} recent events + 4 coarse tokens + 3 queries per row, 3 scenarios per user\n")
    print_table(
        ["backbone", "params (M)", "batch (users)", "users/s", "p50 batch (ms)", "max (ms)", "reference p50 (ms)"],
        "lrrrrrr",
        [
            [
                r["backbone"],
                f"{r['params_m']:.1f}",
                str(r["batch"]),
                f"{r['users_per_s']:.1f}",
                f"{r['p50_s'] * 1e3:.1f}",
                f"{r['max_s'] * 1e3:.1f}",
                f"{r['reference_p50_s'] * 1e3:.1f} ({r['reference_p50_s'] / r['p50_s']:.2f}x)"
                if r["reference_p50_s"]
                else "",
            ]
            for r in rows
        ],
    )
    print("\nreference: ``Refiner.forward`` on one row per (user, scenario); ratio = reference / refine")
    return rows


# ---------------------------------------------------------------------------------------------- quality
def bench_quality(dataset: str = "sim", out: str = "bench") -> dict:
    """Trains the full model on ``dataset`` and evaluates it against the baselines and ablations, one run."""
    from models.evaluate import run_evaluate
    from models.train import TrainConfig, run_train

    folder = Path(out) / f"quality-{dataset}"
    run_train(TrainConfig(dataset=dataset), folder)
    report = run_evaluate(folder, progress=True)
    write_rows(out, "quality", [report])
    return report
