"""Codebook / coarse-model switches on stored state, without services: a history re-encoded into another
codebook and the coarse state rebuilt from it, in both directions of a roll-out."""

from __future__ import annotations

import numpy as np
import pytest
from pipeline_checks import item_records, retrained

from models.data import load
from models.refiner import select_recent
from models.user_model import Checkpoint
from state.history import decode, encode, records
from state.users import UserRow
from streams.refinement import user_inputs
from streams.switch import rebuild_user


@pytest.fixture(scope="module")
def pair(sim_checkpoint, tmp_path_factory) -> tuple[Checkpoint, Checkpoint]:
    return Checkpoint.load(sim_checkpoint), retrained(str(sim_checkpoint), tmp_path_factory.mktemp("cb2"), "cb-2")


@pytest.fixture(scope="module")
def user_events(pair):
    old, _ = pair
    ds = load("sim")
    sl = ds.user_slice(0)
    return old.item_vectors[ds.item[sl]], ds.scenario[sl], ds.action[sl], ds.ts[sl]


def _history(ckpt: Checkpoint, items, scenario, action, ts, stored_by: Checkpoint | None = None) -> bytes:
    codes = item_records(ckpt, items, stored_by)
    return encode(records(np.frombuffer(codes, np.uint8).reshape(len(ts), -1), scenario, action, ts))


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def test_rebuild_reencodes_the_history_and_recomputes_the_state(pair, user_events):
    old, new = pair
    items, scenario, action, ts = user_events
    state, history = rebuild_user(new, old.codebook, _history(old, items, scenario, action, ts))
    assert history == _history(new, items, scenario, action, ts, stored_by=old)
    rec = decode(history, new.codebook.cfg.bytes_per_item)
    minute_ts = np.floor(ts / 60) * 60  # what a history record keeps
    np.testing.assert_array_equal(rec["ts"], minute_ts)
    decoded = new.codebook.from_bytes(rec["code"].tobytes(), len(rec))
    want = new.model.coarse.update(new.model.coarse.init_state(), decoded, scenario, action, minute_ts)
    np.testing.assert_allclose(state, want, rtol=1e-12, atol=1e-12)
    assert _cos(decoded, items) > 0.9


def test_rebuild_back_to_the_old_codebook(pair, user_events):
    """A partition can move back to a worker of the old checkpoint during a roll-out: the history comes
    back into the old codebook, a little further from the items each way."""
    old, new = pair
    items, scenario, action, ts = user_events
    _, there = rebuild_user(new, old.codebook, _history(old, items, scenario, action, ts))
    state, back = rebuild_user(old, new.codebook, there)
    rec = decode(back, old.codebook.cfg.bytes_per_item)
    direct = old.codebook.from_bytes(item_records(old, items), len(items))
    decoded = old.codebook.from_bytes(rec["code"].tobytes(), len(rec))
    assert _cos(direct, items) - 0.05 < _cos(decoded, items) <= _cos(direct, items)
    np.testing.assert_array_equal(rec["scenario"], scenario)
    want = old.model.coarse.update(old.model.coarse.init_state(), decoded, scenario, action, np.floor(ts / 60) * 60)
    np.testing.assert_allclose(state, want, rtol=1e-12, atol=1e-12)


def test_refiner_inputs_of_a_state_another_checkpoint_built(pair, user_events):
    """A dirty user whose state the old checkpoint built is refined from the history, decoded with the
    codebook that wrote it, not from the foreign coarse state."""
    old, new = pair
    items, scenario, action, ts = user_events
    history = _history(old, items, scenario, action, ts)
    old_state = old.model.coarse.update(old.model.coarse.init_state(), items, scenario, action, ts)
    row = UserRow(
        "u", 1, len(ts), old_state.tobytes(), old.codebook_id, old.state_id, 0, float(ts.max()), 0.0, history=history
    )
    (got,) = user_inputs(new, [row], {old.codebook_id: old.codebook})
    state, rebuilt = rebuild_user(new, old.codebook, history)
    np.testing.assert_allclose(got.coarse, new.model.coarse.read(state), atol=1e-6)
    rec = decode(rebuilt, new.codebook.cfg.bytes_per_item)
    rec = rec[np.lexsort((rec["scenario"], rec["ts"]))]
    cfg = new.model.refiner.cfg
    rec = rec[select_recent(rec["scenario"], rec["ts"], cfg.recent, cfg.quotas)]  # what the refiner reads
    np.testing.assert_array_equal(got.items, new.codebook.from_bytes(rec["code"].tobytes(), len(rec)))
