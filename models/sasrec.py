"""SASRec-style causal item-ID model, the temporal protocol's ID-only sequential baseline.

Item-ID embeddings (no content) + learned positions → causal Transformer encoder → next-item logits
over the whole catalogue (full softmax, every position of every training sequence is a prediction).
A user's vector is the hidden state at the last event; scores are its dot products with the item
embeddings.  Trained on one dataset (the events before a cut, ``models.temporal.before``) and nothing
else; the number of epochs is chosen on the validation cut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.data import Dataset


@dataclass(frozen=True)
class SASRecConfig:
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 100
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 64
    epochs: int = 60


class SASRec(nn.Module):
    def __init__(self, n_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.items = nn.Embedding(n_items + 1, cfg.dim, padding_idx=n_items)  # last row: padding
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, 2 * cfg.dim, cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        self.pad = n_items

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded item ids → (B, L, dim) causal hidden states."""
        b, length = seq.shape
        pos = torch.arange(length).expand(b, length)
        x = self.drop(self.items(seq) * self.cfg.dim**0.5 + self.position(pos))
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        h = self.encoder(x, mask=causal)
        return self.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.items.weight[:-1].T


def sequences(ds: Dataset, max_len: int) -> list[np.ndarray]:
    """Each user's time-ordered items (the last ``max_len + 1``), users with at least two events."""
    out = []
    for u in range(ds.n_users):
        seq = ds.item[ds.user_slice(u)]
        if len(seq) >= 2:
            out.append(seq[-(max_len + 1) :])
    return out


def _pad(rows: list[np.ndarray], length: int, pad: int) -> torch.Tensor:
    out = np.full((len(rows), length), pad, np.int64)
    for i, r in enumerate(rows):
        r = r[-length:]
        if len(r):
            out[i, length - len(r) :] = r
    return torch.as_tensor(out)


def train_sasrec(
    ds: Dataset,
    cfg: SASRecConfig,
    seed: int = 0,
    eval_every: int | None = None,
    on_eval=None,
) -> SASRec:
    """Trains on every user's sequence of ``ds``; ``on_eval(epoch, model)`` runs every ``eval_every`` epochs
    (the validation curve that picks the epoch count)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = SASRec(ds.n_items, cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    seqs = sequences(ds, cfg.max_len)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        order = rng.permutation(len(seqs))
        for i in range(0, len(seqs), cfg.batch_size):
            chunk = [seqs[j] for j in order[i : i + cfg.batch_size]]
            inp = _pad([s[:-1] for s in chunk], cfg.max_len, model.pad)
            tgt = _pad([s[1:] for s in chunk], cfg.max_len, -100)
            loss = F.cross_entropy(model.logits(model(inp)).reshape(-1, ds.n_items), tgt.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if eval_every and on_eval is not None and epoch % eval_every == 0:
            on_eval(epoch, model.eval())
    return model.eval()


@torch.inference_mode()
def sasrec_scores(model: SASRec, histories: list[np.ndarray]) -> np.ndarray:
    """(users, n_items) scores: the last hidden state of each history against every item embedding."""
    model.eval()
    out = []
    for i in range(0, len(histories), 256):
        inp = _pad(histories[i : i + 256], model.cfg.max_len, model.pad)
        out.append(model.logits(model(inp)[:, -1]).numpy())
    return np.concatenate(out) if out else np.zeros((0, model.pad), np.float32)
