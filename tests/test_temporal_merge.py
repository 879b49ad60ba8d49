"""Validation runs on several seeds merged into one validation phase: figures averaged per model, serving
grid and steps, the choices made on the averages, and a model not scored on every seed not eligible."""

from __future__ import annotations

import json

import pytest

from models.temporal_run import COLUMNS, merge_validation


def _m(r50: float) -> dict:
    return {**dict.fromkeys(COLUMNS, 0.1), "recall@50": r50}


def _report(seed: int, models: dict) -> dict:
    return {
        "dataset": "toy",
        "validation_seed": seed,
        "splits": {"validation": {"users": 3, "targets": 9}},
        "choices": {"recent_window_days": 3, "knn_neighbours": 10, "hybrid_variant": "x"},
        "validation": {"popularity": _m(0.1), "recent_popularity": _m(0.3)},
        "validation_grid": {"baselines": {}, "sasrec": {}, "models": models},
    }


def _grid(trained: float, gain4: float) -> dict:
    serving = {"gain 1, tau train": _m(trained), "gain 4, tau 7": _m(gain4)}
    return {"300": _m(max(trained, gain4)), "300 serving": serving}


def test_merge_validation_averages_over_seeds_and_chooses_on_the_means(tmp_path):
    runs = {
        "s0a": _report(0, {"hybrid": _grid(0.30, 0.34), "hybrid_b": _grid(0.20, 0.40)}),
        "s0b": _report(0, {"hybrid_c": _grid(0.50, 0.50)}),  # one seed only: not eligible
        "s1": _report(1, {"hybrid": _grid(0.34, 0.30)}),
        # a seed-1 run stopped after its first model: its partial grid counts
        "s1_partial": {"validation_seed": 1, "partial_validation": {"hybrid_b": _grid(0.20, 0.30), "hybrid_d": {}}},
    }
    paths = []
    for name, r in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
        paths.append(tmp_path / f"{name}.json")
    merged = merge_validation(paths, tmp_path / "out")
    assert merged["validation_seeds"] == [0, 1]
    grid = merged["validation_grid"]["models"]
    # hybrid: 0.32 at (1, train) and 0.32 at (4, 7): a tie keeps the earlier option (as trained)
    assert grid["hybrid"]["300 serving"]["gain 4, tau 7"]["recall@50"] == pytest.approx(0.32)
    assert (merged["choices"]["hybrid_trend_gain"], merged["choices"]["hybrid_serve_tau_days"]) == (1.0, None)
    # hybrid_b: 0.35 at (4, 7)
    assert (merged["choices"]["hybrid_b_trend_gain"], merged["choices"]["hybrid_b_serve_tau_days"]) == (4.0, 7.0)
    assert merged["validation"]["hybrid_b"]["recall@50"] == pytest.approx(0.35)
    assert merged["choices"]["hybrid_variant"] == "hybrid_b"  # not hybrid_c (one seed), whatever its figure
    assert "hybrid_c" in merged["validation_grid"]["single_seed_models"] and "hybrid_c" not in merged["validation"]
    assert json.loads((tmp_path / "out" / "temporal.json").read_text())["choices"] == merged["choices"]
