"""Item tower (RED-Rec / HLLM style): item text → LLM → hidden state at an appended token → vectors.

Two vectors per item: the backbone-width *item vector* (what the codebook compresses and the user side
reads) and a small *retrieval vector* (default 64-d) from the projection head that the refiner shares,
so user interests and items live in one space for faiss.  Training keeps the LLM frozen (CPU budget) and
trains the adapter and the head; hidden states are extracted once and cached.
"""

from __future__ import annotations

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


class TextEncoder:
    """Runs the (frozen) LLM over item texts; the item's state is the hidden state at the appended EOS."""

    def __init__(self, spec: str = "smollm2", max_tokens: int = 48) -> None:
        self.tokenizer = load_tokenizer(spec)
        self.model = load_backbone(spec).eval()
        self.max_tokens = max_tokens
        self.hidden = self.model.config.hidden_size
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # the appended token is then always the last position

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        out = np.empty((len(texts), self.hidden), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc="item tower (LLM)", unit="batch")
        eos = self.tokenizer.eos_token
        for i in starts:
            chunk = texts[i : i + batch_size]
            ids = self.tokenizer(chunk, truncation=True, max_length=self.max_tokens - 1, add_special_tokens=False)
            ids = {"input_ids": [[*x, self.tokenizer.convert_tokens_to_ids(eos)] for x in ids["input_ids"]]}
            batch = self.tokenizer.pad(ids, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            out[i : i + len(chunk)] = hidden[:, -1].float().numpy()
        return out
