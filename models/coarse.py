"""Lightweight (coarse) recommender over the whole history, with an O(1) incremental state.

M learned interest queries attend over every event the user ever had.  Each event is embedded on its
own (decoded item vector + scenario + action + time-gap bucket, through a small MLP), so the attention
pooling is a sum over events and can be kept as a running log-sum-exp per query:
``mu`` (max logit), ``Z`` (softmax denominator at that max), ``S`` (weighted value sum).  Folding one
event in is O(1); reading the interests is S/Z through an output layer.  The incremental state equals a
full recompute over the whole history (tests/test_coarse.py checks it, the pattern HSTU uses for its
cached forward).

Time gaps are measured to the user's previous event *of the same scenario*: each scenario topic is
ordered per user, so the state does not depend on how the stream interleaves scenarios.

Exponential time decay comes for free: a weight exp(-λ (t_now - t)) is a logit offset λ·t (t_now is
the same for every event and cancels in the softmax), so it needs no re-scaling as time passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

DAY = 86400.0


@dataclass(frozen=True)
class CoarseConfig:
    item_dim: int
    num_scenarios: int
    num_actions: int
    d_model: int = 64
    interests: int = 4
    gap_buckets: int = 16
    #: λ in 1/day: how much older events weigh less (0 = no decay).
    decay_per_day: float = 0.01


def gap_bucket(gap_seconds: np.ndarray | torch.Tensor, buckets: int) -> np.ndarray | torch.Tensor:
    """log2 buckets of the gap to the previous event, in minutes: 0, 1, 2-3, 4-7, ... (first event: 0)."""
    if isinstance(gap_seconds, torch.Tensor):
        g = torch.clamp(gap_seconds.double(), min=0) / 60.0
        return torch.clamp(torch.floor(torch.log2(1.0 + g)), max=buckets - 1).long()
    g = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0) / 60.0
    return np.minimum(np.floor(np.log2(1.0 + g)), buckets - 1).astype(np.int64)


def previous_same_scenario(ts: torch.Tensor, scenario: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) time of each event's previous event in the same scenario (its own time when it is the first)."""
    positions = torch.arange(ts.shape[1]).expand_as(ts)
    prev = ts.clone()
    for s in torch.unique(scenario[mask]).tolist():
        mine = (scenario == s) & mask
        last = torch.cummax(torch.where(mine, positions, -1), dim=1).values
        before = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)
        found = mine & (before >= 0)
        prev = torch.where(found, torch.gather(ts, 1, before.clamp(min=0)), prev)
    return prev


class CoarseInterests(nn.Module):
    """Multi-query attention pooling over per-event embeddings; see the module docstring."""

    def __init__(self, cfg: CoarseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_proj = nn.Linear(cfg.item_dim, d)
        self.scenario = nn.Embedding(cfg.num_scenarios, d)
        self.action = nn.Embedding(cfg.num_actions, d)
        self.gap = nn.Embedding(cfg.gap_buckets, d)
        self.event_mlp = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        self.queries = nn.Parameter(torch.randn(cfg.interests, d) / math.sqrt(d))
        self.out = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))

    # ---------------------------------------------------------------- shared pieces
    def event_terms(
        self,
        items: torch.Tensor,
        scenario: torch.Tensor,
        action: torch.Tensor,
        gap: torch.Tensor,
        age_days: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-event (logits (..., M), values (..., d)); ``age_days`` = event time - reference time."""
        x = self.item_proj(items) + self.scenario(scenario) + self.action(action) + self.gap(gap)
        x = x + self.event_mlp(x)
        logits = self.key(x) @ self.queries.T / math.sqrt(self.cfg.d_model)
        logits = logits + self.cfg.decay_per_day * age_days.to(logits.dtype).unsqueeze(-1)
        return logits, self.value(x)

    # ---------------------------------------------------------------- batch (training, parity)
    def forward(
        self, items: torch.Tensor, scenario: torch.Tensor, action: torch.Tensor, ts: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Full recompute: (B, T, ...) right-padded histories, ``mask`` (B, T) true on real events → (B, M, d)."""
        ts = ts.double()
        gaps = gap_bucket(ts - previous_same_scenario(ts, scenario, mask), self.cfg.gap_buckets)
        age = ((ts - ts[:, :1]) / DAY).float()
        logits, values = self.event_terms(items, scenario, action, gaps, age)
        logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a user with no events → zeros
        pooled = torch.einsum("btm,btd->bmd", weights, values)
        return self.out(pooled)

    # ---------------------------------------------------------------- incremental state
    @property
    def _head(self) -> int:
        return 2 + self.cfg.num_scenarios  # count, t0, last time per scenario

    @property
    def state_size(self) -> int:
        m, d = self.cfg.interests, self.cfg.d_model
        return self._head + m * (2 + d)

    def init_state(self) -> np.ndarray:
        """[count, t0, last_ts per scenario (S), mu (M), Z (M), S (M*d)] as float64; mu starts at -inf."""
        s = np.zeros(self.state_size, dtype=np.float64)
        s[2 : self._head] = np.nan  # no event yet in that scenario
        s[self._head : self._head + self.cfg.interests] = -np.inf
        return s

    def _split(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, d, h = self.cfg.interests, self.cfg.d_model, self._head
        return state[h : h + m], state[h + m : h + 2 * m], state[h + 2 * m :].reshape(m, d)

    @torch.inference_mode()
    def update(
        self, state: np.ndarray, items: np.ndarray, scenario: np.ndarray, action: np.ndarray, ts: np.ndarray
    ) -> np.ndarray:
        """Folds events (in time order) into a copy of ``state``; cost O(events), independent of history."""
        if state.shape != (self.state_size,):
            raise ValueError(f"coarse state must have {self.state_size} values, got {state.shape}")
        n = len(ts)
        new = state.copy()
        if n == 0:
            return new
        ts = np.asarray(ts, dtype=np.float64)
        scenario = np.asarray(scenario, dtype=np.int64)
        count, t0 = new[0], new[1]
        if count == 0:
            t0 = ts[0]
        last = new[2 : self._head]  # view: updated in place below
        prev = np.empty(n)
        for i, (s, t) in enumerate(zip(scenario.tolist(), ts.tolist(), strict=True)):
            prev[i] = t if np.isnan(last[s]) else last[s]
            last[s] = t
        gaps = gap_bucket(ts - prev, self.cfg.gap_buckets)
        logits, values = self.event_terms(
            torch.as_tensor(np.asarray(items, dtype=np.float32)),
            torch.as_tensor(scenario),
            torch.as_tensor(np.asarray(action, dtype=np.int64)),
            torch.as_tensor(gaps),
            torch.as_tensor((ts - t0) / DAY, dtype=torch.float32),
        )
        logits, values = logits.double().numpy(), values.double().numpy()  # (n, M), (n, d)
        mu, z, s = self._split(new)
        batch_max = logits.max(axis=0)
        new_mu = np.maximum(mu, batch_max)
        old_scale = np.where(np.isfinite(mu), np.exp(mu - new_mu), 0.0)
        w = np.exp(logits - new_mu)  # (n, M)
        z[:] = z * old_scale + w.sum(axis=0)
        s[:] = s * old_scale[:, None] + w.T @ values
        mu[:] = new_mu
        new[0], new[1] = count + n, t0
        return new

    def read(self, state: np.ndarray) -> np.ndarray:
        """The M coarse interest vectors (M, d) of one state."""
        return self.read_many(state[None])[0].numpy()

    def read_many(self, states: np.ndarray) -> torch.Tensor:
        """(B, state_size) → (B, M, d) interests, gradients off: S/Z through the output layer."""
        m, d, h = self.cfg.interests, self.cfg.d_model, self._head
        z = states[:, h + m : h + 2 * m]
        s = states[:, h + 2 * m :].reshape(-1, m, d)
        pooled = np.where(z[..., None] > 0, s / np.maximum(z, 1e-300)[..., None], 0.0)
        with torch.inference_mode():
            return self.out(torch.as_tensor(pooled, dtype=torch.float32))
