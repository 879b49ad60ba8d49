"""LLM refiner: HyMiRec's LLM recommender as RED-Rec's user tower, with scenario-aware interest queries.

One input row per (user, scenario asked for), fed to a decoder as ``inputs_embeds``:

    [M coarse tokens] + [last N events, 2-D dense mixed] + [K query tokens of that scenario]

*2-D dense mixing* (RED-Rec): events of all scenarios in one time-ordered sequence, at most a quota per
scenario, each with learned embeddings of its position (index from the newest), scenario, action and
time gap to the newest event.  The decoder is causal, so the K queries at the end read everything
before them; their hidden states go through a linear map to item width and the projection head shared
with the item tower, giving K L2-normalised vectors in the retrieval space.

Rows are left-padded and position ids skip the padding, so a user's vectors do not depend on who else
is in the batch (tests/test_refiner.py checks batch == single).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from models.backbone import load_backbone
from models.item_tower import ProjectionHead


def gap_bucket(gap_seconds: np.ndarray | torch.Tensor, buckets: int) -> np.ndarray | torch.Tensor:
    """log2 buckets of the gap to the previous event, in minutes: 0, 1, 2-3, 4-7, ... (first event: 0)."""
    if isinstance(gap_seconds, torch.Tensor):
        g = torch.clamp(gap_seconds.double(), min=0) / 60.0
        return torch.clamp(torch.floor(torch.log2(1.0 + g)), max=buckets - 1).long()
    g = np.maximum(np.asarray(gap_seconds, dtype=np.float64), 0) / 60.0
    return np.minimum(np.floor(np.log2(1.0 + g)), buckets - 1).astype(np.int64)


@dataclass(frozen=True)
class RefinerConfig:
    item_dim: int
    coarse_dim: int
    num_scenarios: int
    num_actions: int
    interests: int = 3
    recent: int = 64
    #: Max events per scenario among the ``recent`` (None: no per-scenario cap).
    quotas: tuple[int, ...] | None = None
    gap_buckets: int = 24
    use_coarse: bool = True
    #: One query set per scenario (RED-Rec's scenario-aware querying); False: one set shared by all (ablation).
    scenario_queries: bool = True
    backbone: str = "tiny"
    backbone_layers: int | None = None
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    #: One more output per interest: the weight of the item-side trend coordinate (``models.temporal``).
    trend: bool = False


@dataclass
class UserInput:
    """What the refiner needs of one user: coarse interests and the recent mixed-scenario events."""

    coarse: np.ndarray  # (M, coarse_dim)
    items: np.ndarray  # (n, item_dim), time order
    scenario: np.ndarray  # (n,)
    action: np.ndarray  # (n,)
    ts: np.ndarray  # (n,) seconds


def select_recent(scenario: np.ndarray, ts: np.ndarray, n: int, quotas: tuple[int, ...] | None) -> np.ndarray:
    """Indices (time order) of the last ``n`` events with at most ``quotas[s]`` from scenario s.

    Input is in time order. Takes each scenario's newest events up to its quota, then the newest of the
    rest fill any room left, so a quiet scenario's slots are not wasted.
    """
    idx = np.arange(len(ts))
    if quotas is None or len(ts) <= n:
        return idx[-n:]
    chosen = np.zeros(len(ts), dtype=bool)
    for s, q in enumerate(quotas):
        mine = idx[scenario == s]
        chosen[mine[len(mine) - min(q, len(mine)) :]] = True
    if chosen.sum() > n:  # quotas add up to more than n: keep the newest n of them
        keep = idx[chosen][-n:]
        chosen[:] = False
        chosen[keep] = True
    room = n - int(chosen.sum())
    if room > 0:
        rest = idx[~chosen]
        chosen[rest[len(rest) - min(room, len(rest)) :]] = True
    return idx[chosen]


def collate(cfg: RefinerConfig, users: list[UserInput], rows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """Left-padded tensors, one row per (user index, scenario asked for) in ``rows``."""
    picks = [select_recent(u.scenario, u.ts, cfg.recent, cfg.quotas) for u in users]
    n = max(1, max((len(p) for p in picks), default=1))
    r = len(rows)
    items = np.zeros((r, n, cfg.item_dim), np.float32)
    scen, act, gap = (np.zeros((r, n), np.int64) for _ in range(3))
    mask = np.zeros((r, n), bool)
    coarse = np.zeros((r, users[0].coarse.shape[0], cfg.coarse_dim), np.float32)
    ask = np.zeros(r, np.int64)
    for row, (i, s) in enumerate(rows):
        u, p = users[i], picks[i]
        m = len(p)
        if m:
            items[row, n - m :], scen[row, n - m :], act[row, n - m :] = u.items[p], u.scenario[p], u.action[p]
            gap[row, n - m :] = gap_bucket(u.ts[p][-1] - u.ts[p], cfg.gap_buckets)
            mask[row, n - m :] = True
        coarse[row], ask[row] = u.coarse, s
    arrays = {"coarse": coarse, "items": items, "scenario": scen, "action": act, "gap": gap, "mask": mask, "ask": ask}
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def query_mask(attn: torch.Tensor, scenarios: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """(U, 1, T, T) additive attention mask of rows [prefix (``attn``: left-padded, True = a token)] +
    ``scenarios`` groups of ``k`` query tokens: causal; no token sees padding; a query sees the prefix
    and the queries of its own group before it.  A padding row sees itself only (a row that sees nothing
    would give NaN values that the softmax weights of the others, zero, cannot cancel)."""
    u, n = attn.shape
    total = n + scenarios * k
    see = torch.ones(total, total, dtype=torch.bool).tril()
    group = torch.cat([torch.full((n,), -1), torch.arange(scenarios).repeat_interleave(k)])
    see &= (group[:, None] == group[None, :]) | (group[None, :] < 0)  # queries: their group and the prefix
    see = see[None] & torch.cat([attn, torch.ones(u, scenarios * k, dtype=torch.bool)], 1)[:, None, :]
    see |= torch.eye(total, dtype=torch.bool)[None]
    mask = torch.zeros(u, 1, total, total, dtype=dtype)
    return mask.masked_fill_(~see[:, None], torch.finfo(dtype).min)


class Refiner(nn.Module):
    def __init__(self, cfg: RefinerConfig, head: ProjectionHead) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = load_backbone(
            cfg.backbone,
            cfg.backbone_layers,
            hidden=cfg.hidden,
            layers=cfg.layers,
            heads=cfg.heads,
            intermediate=cfg.intermediate,
        )
        h = self.backbone.config.hidden_size
        self.coarse_proj = nn.Linear(cfg.coarse_dim, h)
        self.item_proj = nn.Linear(cfg.item_dim, h)
        self.position = nn.Embedding(cfg.recent, h)
        self.scenario = nn.Embedding(cfg.num_scenarios, h)
        self.action = nn.Embedding(cfg.num_actions, h)
        self.gap = nn.Embedding(cfg.gap_buckets, h)
        query_sets = cfg.num_scenarios if cfg.scenario_queries else 1
        self.queries = nn.Parameter(torch.randn(query_sets, cfg.interests, h) * 0.02)
        self.out = nn.Linear(h, cfg.item_dim)
        self.head = head  # shared with the item tower's retrieval head
        self.trend_out = nn.Linear(h, 1) if cfg.trend else None

    # ---------------------------------------------------------------- tensors in, vectors out
    def forward(
        self,
        coarse: torch.Tensor,
        items: torch.Tensor,
        scenario: torch.Tensor,
        action: torch.Tensor,
        gap: torch.Tensor,
        mask: torch.Tensor,
        ask: torch.Tensor,
    ) -> torch.Tensor:
        """Left-padded events (B, N, ...) with ``mask``; ``ask`` (B,) scenario per row → (B, K, retrieval_dim)."""
        k = self.cfg.interests
        embeds, attn = self._prefix(coarse, items, scenario, action, gap, mask)
        embeds = torch.cat([embeds, self._queries(ask)], 1)
        attn = torch.cat([attn, torch.ones(mask.shape[0], k, dtype=torch.bool, device=mask.device)], 1)
        positions = (torch.cumsum(attn.long(), 1) - 1).clamp(min=0)
        hidden = self.backbone(inputs_embeds=embeds, attention_mask=attn.long(), position_ids=positions)
        return self._outputs(hidden.last_hidden_state[:, -k:])

    def _outputs(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., K, h) query states → (..., K, d) unit vectors, with the raw trend weight appended when on."""
        vectors = self.head(self.out(hidden))
        if self.trend_out is None:
            return vectors
        return torch.cat([vectors, self.trend_out(hidden)], -1)

    def _prefix(
        self,
        coarse: torch.Tensor,
        items: torch.Tensor,
        scenario: torch.Tensor,
        action: torch.Tensor,
        gap: torch.Tensor,
        mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[coarse tokens] + [mixed recent events]: what every scenario's queries read, and its mask."""
        b = mask.shape[0]
        from_newest = torch.flip(torch.cumsum(torch.flip(mask.long(), [1]), 1), [1]) - 1
        ev = self.item_proj(items) + self.scenario(scenario) + self.action(action) + self.gap(gap)
        ev = ev + self.position(from_newest.clamp(min=0))
        ev = ev * mask.unsqueeze(-1)
        if not self.cfg.use_coarse:
            return ev, mask
        ones = torch.ones(b, coarse.shape[1], dtype=torch.bool, device=mask.device)
        return torch.cat([self.coarse_proj(coarse), ev], 1), torch.cat([ones, mask], 1)

    def _queries(self, ask: torch.Tensor) -> torch.Tensor:
        return self.queries[ask if self.cfg.scenario_queries else torch.zeros_like(ask)]

    @torch.inference_mode()
    def refine(self, users: list[UserInput], scenarios: list[int]) -> np.ndarray:
        """(U, S, K, retrieval_dim) float32 interest vectors for every user and scenario asked for.

        The decoder is causal, so the shared prefix (coarse tokens + events) does not depend on the
        scenario asked: one row per user holds the prefix and then every scenario's K query tokens, and
        an attention mask keeps each scenario's queries from seeing the others'.  The same vectors as
        ``forward`` on one row per scenario (the reference; ``tests/test_refiner.py``), for about 1/S of
        the work and with no KV cache to copy per scenario.
        """
        n_s, k = len(scenarios), self.cfg.interests
        if not users:
            width = self.head.norm.normalized_shape[0] + (self.trend_out is not None)
            return np.zeros((0, n_s, k, width), np.float32)
        t = collate(self.cfg, users, [(i, scenarios[0]) for i in range(len(users))])
        embeds, attn = self._prefix(t["coarse"], t["items"], t["scenario"], t["action"], t["gap"], t["mask"])
        u, n = attn.shape
        queries = self._queries(torch.as_tensor(scenarios).repeat(u)).reshape(u, n_s * k, -1)
        embeds = torch.cat([embeds, queries.to(embeds.dtype)], 1)
        start = attn.sum(1, keepdim=True)  # each scenario's queries continue the row's positions
        positions = torch.cat([(torch.cumsum(attn.long(), 1) - 1).clamp(min=0), start + torch.arange(k).repeat(n_s)], 1)
        hidden = self.backbone(
            inputs_embeds=embeds, attention_mask=query_mask(attn, n_s, k, embeds.dtype), position_ids=positions
        )
        out = self._outputs(hidden.last_hidden_state[:, n:])
        return out.reshape(u, n_s, k, -1).float().numpy()
