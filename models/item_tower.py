"""Item tower (RED-Rec / HLLM style): item text → LLM → hidden state at an appended token → vectors.

Two vectors per item: the backbone-width *item vector* (what the codebook compresses and the user side
reads) and a small *retrieval vector* (default 64-d) from the projection head that the refiner shares,
so user interests and items live in one space for faiss.  Training keeps the LLM frozen (CPU budget) and
trains the adapter and the head; hidden states are extracted once and cached.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.backbone import load_backbone, load_tokenizer


class ProjectionHead(nn.Module):
    """Linear → (GELU → Linear → dropout) residual → LayerNorm → L2 norm (RED-Rec's shared head)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.inp = nn.Linear(d_in, d_out)
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(d_out, d_out), nn.Dropout(dropout))
        self.norm = nn.LayerNorm(d_out)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The head before the final L2 normalisation (where item-ID embeddings are added)."""
        h = self.inp(x)
        return self.norm(h + self.mlp(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(x), dim=-1)


class ItemTower(nn.Module):
    """Adapter (item vector) + retrieval head over frozen LLM hidden states."""

    def __init__(self, hidden: int, retrieval_dim: int = 64) -> None:
        super().__init__()
        self.hidden = hidden
        self.adapter = ProjectionHead(hidden, hidden)
        self.retrieval_head = ProjectionHead(hidden, retrieval_dim)

    def item_vectors(self, states: torch.Tensor) -> torch.Tensor:
        """Backbone hidden states (n, H) → L2-normalised item vectors (n, H)."""
        return self.adapter(states)

    def forward(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = self.item_vectors(states)
        return items, self.retrieval_head(items)


#: The item-text LLM's run types by name (what configs and checkpoints record).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class TextEncoder:
    """Runs the (frozen) LLM over item texts; the item's state is the hidden state at the appended EOS.

    Two paths give the same states (``tests/test_item_encoder.py``, within 1e-5 of the state's scale):

    - ``encode_reference``: the original path, kept as the parity reference and the bench's "before":
      batches of 32 texts in the order given, each padded to its longest text.
    - ``encode`` (what the item agent and training use): texts already seen are answered from an LRU
      cache keyed by a hash of the text (a catalogue re-sent, items updated with their old text, a
      recode); repeated texts in one call run once; the rest are tokenized in one call and sorted by
      length, so each batch pads to its neighbours' length rather than to the longest text of 32
      arbitrary ones.  On short catalogue titles padding was about half of the tokens the LLM ran.
      The last layer runs for the last position only (``last_token_states``).

    A causal LLM's state at the last token depends only on the tokens before it, so neither the order
    nor the batch a text lands in changes its state beyond float rounding: padding is on the left and
    masked, and RoPE scores depend on relative positions only.  ``max_tokens`` caps the tokens per text
    (EOS included): text beyond it never reaches the LLM, on both paths.

    ``layers`` keeps the LLM's first N decoder layers (the final norm still applies) and ``dtype`` is the
    weights' and activations' type ("bfloat16" runs on the CPU's bf16 dot products where it has them);
    both change the states, so an item tower is trained on the states of the configuration it serves
    with (``models.train.item_states``; a checkpoint records both).  States are returned as float32 whatever the dtype.
    """

    def __init__(
        self,
        spec: str = "smollm2",
        max_tokens: int = 48,
        cache_size: int = 10_000,
        layers: int | None = None,
        dtype: str = "float32",
    ) -> None:
        self.tokenizer = load_tokenizer(spec)
        self.model = load_backbone(spec, keep_layers=layers).to(DTYPES[dtype]).eval()
        self.dtype = dtype
        self.max_tokens = max_tokens
        self.hidden = self.model.config.hidden_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # the appended token is then always the last position
        self.eos_id = int(self.tokenizer.convert_tokens_to_ids(self.tokenizer.eos_token))
        self.pad_id = int(self.tokenizer.pad_token_id)
        self.cache = StateCache(cache_size)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's token ids, cut to ``max_tokens - 1``, with the EOS appended (both paths)."""
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_tokens - 1, add_special_tokens=False)
        return [[*x, self.eos_id] for x in ids["input_ids"]]

    @torch.inference_mode()
    def encode_reference(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """The original path (no cache, input order, batches of 32): the parity reference."""
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="item tower (LLM)", unit="batch")
        for i in starts:
            chunk = texts[i : i + batch_size]
            batch = self.tokenizer.pad({"input_ids": self.token_ids(chunk)}, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            out[i : i + len(chunk)] = hidden[:, -1].float().numpy()
        return out

    @torch.inference_mode()
    def encode(
        self, texts: list[str], batch_size: int = 64, progress: bool = False, use_cache: bool = True
    ) -> np.ndarray:
        """Hidden states (n, H) at each text's appended EOS: cached, deduplicated, length-sorted batches."""
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}  # text hash → the positions that want it
        for i, text in enumerate(texts):
            key = text_key(text)
            hit = self.cache.get(key) if use_cache else None
            if hit is not None:
                out[i] = hit
            else:
                todo.setdefault(key, []).append(i)
        if not todo:
            return out
        keys = list(todo)
        ids = self.token_ids([texts[todo[k][0]] for k in keys])
        order = sorted(range(len(keys)), key=lambda j: len(ids[j]))
        starts = range(0, len(order), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="item tower (LLM)", unit="batch")
        for s in starts:
            group = order[s : s + batch_size]
            states = self._run([ids[j] for j in group])
            for j, state in zip(group, states, strict=True):
                out[todo[keys[j]]] = state
                if use_cache:
                    self.cache.put(keys[j], state)
        return out

    def _run(self, seqs: list[list[int]]) -> np.ndarray:
        """One forward pass over sequences of similar length, left-padded; the state at each last token."""
        width = max(len(x) for x in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, x in enumerate(seqs):
            input_ids[r, width - len(x) :] = torch.as_tensor(x)
            mask[r, width - len(x) :] = 1
        if getattr(self.model.config, "model_type", "") == "llama" and len(self.model.layers) > 1:
            last = last_token_states(self.model, input_ids, mask)
        else:
            last = self.model(input_ids=input_ids, attention_mask=mask).last_hidden_state[:, -1]
        return last.float().numpy().copy()


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def last_token_states(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A Llama decoder's final-norm state at the last position, with the last layer run for that position
    only: its keys and values need every position, but its query, attention output and MLP only the
    last one (on a 4-layer tower about a fifth of the work).  Every other layer is the model's own.
    Same masking as the model's forward (causal, left padding masked; a padding position attends to
    itself so no row is empty), so the states match ``model(...).last_hidden_state[:, -1]``."""
    b, w = input_ids.shape
    h = model.embed_tokens(input_ids)
    pos = torch.arange(w)[None]
    cos, sin = model.rotary_emb(h, position_ids=pos)
    keys = mask.bool()
    allowed = (torch.ones(w, w, dtype=torch.bool).tril()[None] & keys[:, None, :]) | torch.eye(w, dtype=torch.bool)
    for layer in model.layers[:-1]:
        h = layer(h, attention_mask=allowed[:, None], position_embeddings=(cos, sin), position_ids=pos)
    last = model.layers[-1]
    attn = last.self_attn
    x = last.input_layernorm(h)
    d = attn.head_dim
    q = _rope(attn.q_proj(x[:, -1:]).view(b, 1, -1, d).transpose(1, 2), cos[:, None, -1:], sin[:, None, -1:])
    k = _rope(attn.k_proj(x).view(b, w, -1, d).transpose(1, 2), cos[:, None], sin[:, None])
    v = attn.v_proj(x).view(b, w, -1, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None, :], scale=attn.scaling, enable_gqa=True)
    h = h[:, -1:] + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
    h = h + last.mlp(last.post_attention_layernorm(h))
    return model.norm(h)[:, 0]


def text_key(text: str) -> bytes:
    """The cache key of a text: 16 bytes of BLAKE2b (a collision is far less likely than a bit flip)."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class StateCache:
    """A bounded LRU of text hash → LLM state (H float32 each: 2.3 KB for SmolLM2, 23 MB at 10,000).

    Keys are hashes, not texts, so a long description costs 16 bytes of key; 0 entries turns it off."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: bytes) -> np.ndarray | None:
        found = self._d.get(key)
        if found is None:
            self.misses += 1
            return None
        self._d.move_to_end(key)
        self.hits += 1
        return found

    def put(self, key: bytes, state: np.ndarray) -> None:
        if self.size <= 0:
            return
        self._d[key] = state
        self._d.move_to_end(key)
        while len(self._d) > self.size:
            self._d.popitem(last=False)

    def clear(self) -> None:
        self._d.clear()
