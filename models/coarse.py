"""Lightweight (coarse) recommender over the whole history, with an O(1) incremental state.

M learned interest queries attend over every event the user ever had.  Each event is embedded on its
own (decoded item vector + scenario + action + hour of day, through a small MLP), so the attention
pooling is a sum over events and can be kept as a running log-sum-exp per query:
``mu`` (max logit), ``Z`` (softmax denominator at that max), ``S`` (weighted value sum).  Folding one
event in is O(1); reading the interests is S/Z through an output layer.  The incremental state equals a
full recompute over the whole history (tests/test_coarse.py checks it, the pattern HSTU uses for its
cached forward).

No feature depends on the event before (a time gap would): the state is a commutative sum, so it is
the same whatever order the stream applies events in — scenario topics interleave freely, and an event
parked until its item arrives may be applied late.  Gaps are the refiner's job, over the sorted recent
history.

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
    #: λ in 1/day: how much older events weigh less (0 = no decay).
    decay_per_day: float = 0.01


def hour_of_day(ts: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """0..23 (UTC) of each event time in seconds."""
    if isinstance(ts, torch.Tensor):
        return torch.floor(torch.remainder(ts.double(), DAY) / 3600.0).long().clamp(0, 23)
    return np.clip(np.floor(np.remainder(np.asarray(ts, dtype=np.float64), DAY) / 3600.0), 0, 23).astype(np.int64)


class CoarseInterests(nn.Module):
    """Multi-query attention pooling over per-event embeddings; see the module docstring."""

    def __init__(self, cfg: CoarseConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.item_proj = nn.Linear(cfg.item_dim, d)
        self.scenario = nn.Embedding(cfg.num_scenarios, d)
        self.action = nn.Embedding(cfg.num_actions, d)
        self.hour = nn.Embedding(24, d)
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
        hour: torch.Tensor,
        age_days: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-event (logits (..., M), values (..., d)); ``age_days`` = event time - reference time."""
        x = self.item_proj(items) + self.scenario(scenario) + self.action(action) + self.hour(hour)
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
        age = ((ts - ts[:, :1]) / DAY).float()
        logits, values = self.event_terms(items, scenario, action, hour_of_day(ts), age)
        logits = logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        weights = torch.softmax(logits, dim=1).nan_to_num(0.0)  # a user with no events → zeros
        pooled = torch.einsum("btm,btd->bmd", weights, values)
        return self.out(pooled)

    # ---------------------------------------------------------------- incremental state
    _head = 2  # count, t0

    @property
    def state_size(self) -> int:
        m, d = self.cfg.interests, self.cfg.d_model
        return self._head + m * (2 + d)

    def init_state(self) -> np.ndarray:
        """[count, t0, mu (M), Z (M), S (M*d)] as float64; mu starts at -inf."""
        s = np.zeros(self.state_size, dtype=np.float64)
        s[self._head : self._head + self.cfg.interests] = -np.inf
        return s

    def _split(self, state: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        m, d, h = self.cfg.interests, self.cfg.d_model, self._head
        return state[h : h + m], state[h + m : h + 2 * m], state[h + 2 * m :].reshape(m, d)

    def update(
        self, state: np.ndarray, items: np.ndarray, scenario: np.ndarray, action: np.ndarray, ts: np.ndarray
    ) -> np.ndarray:
        """Folds events (any order) into a copy of ``state``; cost O(events), independent of history."""
        if state.shape != (self.state_size,):
            raise ValueError(f"coarse state must have {self.state_size} values, got {state.shape}")
        return self.update_many(state[None], items, scenario, action, ts, np.zeros(len(ts), np.int64))[0]

    @torch.inference_mode()
    def update_many(
        self,
        states: np.ndarray,
        items: np.ndarray,
        scenario: np.ndarray,
        action: np.ndarray,
        ts: np.ndarray,
        owner: np.ndarray,
    ) -> np.ndarray:
        """Folds the events of many users into copies of their states: one forward for all the events.

        ``states`` (U, state_size); event i belongs to ``states[owner[i]]``.  Per event, a small model
        costs far more in framework overhead than in arithmetic, so a batch of users shares one call.
        """
        if states.ndim != 2 or states.shape[1] != self.state_size:
            raise ValueError(f"coarse states must be (users, {self.state_size}), got {states.shape}")
        new = states.copy()
        if len(ts) == 0:
            return new
        ts, owner = np.asarray(ts, dtype=np.float64), np.asarray(owner, dtype=np.int64)
        first = np.full(len(new), np.nan)
        first[owner[::-1]] = ts[::-1]  # each owner's first event (in input order)
        fresh = new[:, 0] == 0
        new[fresh, 1] = np.where(np.isnan(first[fresh]), 0.0, first[fresh])  # any reference works (see read)
        logits, values = self.event_terms(
            torch.as_tensor(np.asarray(items, dtype=np.float32)),
            torch.as_tensor(np.asarray(scenario, dtype=np.int64)),
            torch.as_tensor(np.asarray(action, dtype=np.int64)),
            torch.as_tensor(hour_of_day(ts)),
            torch.as_tensor((ts - new[owner, 1]) / DAY, dtype=torch.float32),
        )
        logits, values = logits.double().numpy(), values.double().numpy()  # (n, M), (n, d)
        order = np.argsort(owner, kind="stable")  # each owner's events side by side: segment sums
        owner, logits, values = owner[order], logits[order], values[order]
        users, starts, counts = np.unique(owner, return_index=True, return_counts=True)
        segment = np.repeat(np.arange(len(users)), counts)
        m, d, h = self.cfg.interests, self.cfg.d_model, self._head
        mu, z = new[users, h : h + m], new[users, h + m : h + 2 * m]
        s = new[users, h + 2 * m :].reshape(len(users), m, d)
        new_mu = np.maximum(mu, np.maximum.reduceat(logits, starts, axis=0))
        old_scale = np.where(np.isfinite(mu), np.exp(mu - new_mu), 0.0)
        w = np.exp(logits - new_mu[segment])  # (n, M)
        z = z * old_scale + np.add.reduceat(w, starts, axis=0)
        s = s * old_scale[:, :, None]
        for q in range(m):  # one interest at a time: (n, d) temporaries instead of (n, M, d)
            s[:, q] += np.add.reduceat(w[:, q, None] * values, starts, axis=0)
        new[users, h : h + m], new[users, h + m : h + 2 * m] = new_mu, z
        new[users, h + 2 * m :] = s.reshape(len(users), m * d)
        new[users, 0] += counts
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
