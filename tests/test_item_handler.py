"""The item agent's vectors: an item that carries a vector never reaches the LLM.

``ItemHandler._vectors`` is what the item agent runs in its executor.  A batch of vector items must not
even load the text encoder (loading SmolLM2 costs seconds and 0.5 GB); in a mixed batch only the
text-only items are encoded, and the vector items keep their vectors exactly.
"""

from __future__ import annotations

import numpy as np

from models.user_model import Checkpoint
from streams.events import Item
from streams.items import ItemHandler
from streams.settings import Settings


class CountingEncoder:
    """Stands in for the LLM: records the texts it is asked for, answers fixed states of the right width."""

    def __init__(self, hidden: int) -> None:
        self.hidden = hidden
        self.seen: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen.extend(texts)
        rng = np.random.default_rng(len(self.seen))
        return rng.standard_normal((len(texts), self.hidden)).astype(np.float32)


def handler(ckpt: Checkpoint) -> ItemHandler:
    # A backbone that cannot load: a handler that tried to load the LLM would raise.
    return ItemHandler(Settings(), ckpt, None, None, None, None, text_backbone="/nonexistent-backbone")


def test_vector_items_skip_the_llm(sim_checkpoint) -> None:
    ckpt = Checkpoint.load(sim_checkpoint)
    dim = ckpt.codebook.cfg.dim
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((5, dim)).astype(np.float32)
    h = handler(ckpt)
    out = h._vectors([Item(f"v{i}", f"title {i}", vecs[i]) for i in range(5)])  # text too: the vector wins
    assert h._encoder is None  # never loaded
    assert np.array_equal(out, vecs)


def test_mixed_batch_encodes_only_text_items(sim_checkpoint) -> None:
    ckpt = Checkpoint.load(sim_checkpoint)
    dim = ckpt.codebook.cfg.dim
    vec = np.linspace(-1, 1, dim, dtype=np.float32)
    h = handler(ckpt)
    h._encoder = CountingEncoder(ckpt.model.item_tower.hidden)
    items = [Item("a", "text a", None), Item("b", None, vec), Item("c", "text c", None)]
    out = h._vectors(items)
    assert h._encoder.seen == ["text a", "text c"]
    assert np.array_equal(out[1], vec)
    assert np.isfinite(out).all() and not np.array_equal(out[0], out[2])


def test_worker_encodes_with_the_checkpoints_llm_configuration(sim_checkpoint, monkeypatch) -> None:
    """The item tower's adapter was fitted to one LLM configuration's states (backbone, layers, run type):
    the worker must encode texts with that one, and a checkpoint saved before the fields existed means
    every layer in float32 (what it was trained on)."""
    import dataclasses
    import json

    import models.item_tower
    from models.user_model import ModelConfig

    made = []
    monkeypatch.setattr(models.item_tower, "TextEncoder", lambda spec, **kw: made.append((spec, kw)) or "encoder")
    ckpt = Checkpoint.load(sim_checkpoint)
    ckpt.model.cfg = dataclasses.replace(ckpt.model.cfg, item_backbone="some-llm", item_layers=3, item_dtype="bfloat16")
    h = ItemHandler(Settings(), ckpt, None, None, None, None)
    assert h._text_encoder() == "encoder"
    assert made == [("some-llm", {"layers": 3, "dtype": "bfloat16"})]
    old = json.loads(ckpt.model.cfg.to_json())
    for key in ("item_backbone", "item_layers", "item_dtype"):
        del old[key]
    cfg = ModelConfig.from_json(json.dumps(old))
    assert (cfg.item_backbone, cfg.item_layers, cfg.item_dtype) == ("smollm2", None, "float32")
