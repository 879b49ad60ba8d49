"""The trained bundle the stream runs: item tower head, coarse recommender, refiner, codebook, item table.

Variants share this class so baselines and ablations train and evaluate through the same code:
``full`` (coarse tokens + refiner), ``comirec`` (coarse interests alone, no LLM), and the refiner
options (``use_coarse``, K) in ``RefinerConfig``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from models.coarse import CoarseConfig, CoarseInterests
from models.codebook import ResidualCodebook
from models.item_tower import ItemTower
from models.losses import DMILLoss
from models.refiner import Refiner, RefinerConfig, UserInput


@dataclass(frozen=True)
class ModelConfig:
    scenarios: tuple[str, ...]
    actions: tuple[str, ...]
    item_dim: int
    coarse: CoarseConfig
    refiner: RefinerConfig
    retrieval_dim: int = 64
    #: "full" = coarse + LLM refiner; "comirec" = coarse multi-interest pooling only (no LLM).
    variant: str = "full"
    #: Inputs are codebook-decoded item vectors (True) or the raw vectors (ablation).
    use_codebook: bool = True
    #: Only the asked-for scenario's events in the history (ablation).
    single_scenario: bool = False
    #: Learned item-ID embeddings for this many items (the checkpoint's item table), added to the content
    #: retrieval vector of the items seen in training (0: content alone, the default).
    id_items: int = 0
    #: Time constant (days) of the item trend coordinate when ``refiner.trend`` is on.
    trend_tau_days: float = 30.0
    #: A second, long trend coordinate with this τ (days) next to the first (None: one coordinate).  Not
    #: served by the stream yet: the offline protocol scores it (``models.temporal_run``).
    trend_long_tau_days: float | None = None
    #: The LLM configuration whose states the item tower was trained on; a worker encodes item texts
    #: with the same one.  The defaults are what checkpoints saved before these fields had.
    item_backbone: str = "smollm2"
    item_layers: int | None = None
    item_dtype: str = "float32"
    notes: dict = field(default_factory=dict)

    @property
    def interests(self) -> int:
        return self.coarse.interests if self.variant == "comirec" else self.refiner.interests

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw = json.loads(text)
        refiner = raw.pop("refiner")
        if refiner.get("quotas") is not None:
            refiner["quotas"] = tuple(refiner["quotas"])
        return cls(
            scenarios=tuple(raw.pop("scenarios")),
            actions=tuple(raw.pop("actions")),
            coarse=CoarseConfig(**raw.pop("coarse")),
            refiner=RefinerConfig(**refiner),
            **raw,
        )


class UserModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg.item_dim, cfg.retrieval_dim)
        self.coarse = CoarseInterests(cfg.coarse)
        if cfg.variant == "comirec":
            self.coarse_out = nn.Linear(cfg.coarse.d_model, cfg.item_dim)
            self.refiner = None
        else:
            self.refiner = Refiner(cfg.refiner, head=self.item_tower.retrieval_head)
        self.loss = DMILLoss()
        if cfg.id_items:
            self.item_ids = nn.Embedding(cfg.id_items, cfg.retrieval_dim)
            nn.init.zeros_(self.item_ids.weight)
            #: Items with events in the training data; the others (cold) keep their content vector alone.
            self.register_buffer("id_known", torch.zeros(cfg.id_items, dtype=torch.bool))

    @property
    def trend(self) -> bool:
        return self.refiner is not None and self.cfg.refiner.trend

    @property
    def trend_tau_s(self) -> float:
        """τ of the item trend coordinate in seconds (0: the model scores no trend).  The stream keeps one
        decayed count per item: a model with a second (long) coordinate cannot be served by it yet."""
        if self.trend and self.cfg.trend_long_tau_days is not None:
            raise ValueError("the stream keeps one item trend count: a two-coordinate trend model is offline only")
        return self.cfg.trend_tau_days * 86400.0 if self.trend else 0.0

    @property
    def trend_taus_days(self) -> tuple[float, ...]:
        """τ (days) of each item trend coordinate, in the order of the served columns (() without the trend)."""
        if not self.trend:
            return ()
        long = self.cfg.trend_long_tau_days
        return (self.cfg.trend_tau_days,) if long is None else (self.cfg.trend_tau_days, long)

    def item_retrieval(self, item_vectors: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """(n, d) unit retrieval vectors: content through the shared head, plus the item-ID embedding of
        items known to the checkpoint (``ids``: rows of its item table, -1 for an item it never saw)."""
        z = self.item_tower.retrieval_head.features(item_vectors)
        if self.cfg.id_items:
            if ids is None:
                raise ValueError("this model has item-ID embeddings: pass each item's row in the item table (-1: none)")
            ids = torch.as_tensor(ids, dtype=torch.long)
            row = ids.clamp(min=0)
            use = (ids >= 0) & self.id_known[row]
            z = z + self.item_ids(row) * use.unsqueeze(-1).to(z.dtype)
        return torch.nn.functional.normalize(z, dim=-1)

    def with_served_trend(self, gain: float = 1.0, tau_days: float | None = None) -> UserModel:
        """A copy that serves ``gain`` × the learned trend weight(s), with the (first) trend read at ``tau_days``.

        Training fits the weight for its sampled softmax over a 21-day horizon, not for the ranking that is
        scored, so how much of the trend to serve is a serving choice (made on a validation cut).  The gain is
        folded into the weight's output layer and τ into the config, so the stream serves the copy as is."""
        if not self.trend:
            raise ValueError("this model scores no trend coordinate")
        out = copy.deepcopy(self)
        with torch.no_grad():
            out.refiner.trend_out.weight.mul_(gain)
            out.refiner.trend_out.bias.mul_(gain)
        if tau_days is not None:
            out.cfg = replace(out.cfg, trend_tau_days=float(tau_days))
        return out.eval()

    def _served(self, vectors: torch.Tensor) -> torch.Tensor:
        """With the trend on, the last column is the refiner's raw weight: divided by the logit scale it is
        the user-side coordinate whose inner product with the item's trend coordinate is the served score."""
        if not self.trend:
            return vectors
        c = len(self.trend_taus_days)
        return torch.cat([vectors[..., :-c], vectors[..., -c:] / self.loss.scale()], -1)

    # ---------------------------------------------------------------- training / batch path
    def interests(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K, retrieval_dim) from a batch made by ``models.batches.make_batch``."""
        coarse = self.coarse(batch["h_items"], batch["h_scenario"], batch["h_action"], batch["h_ts"], batch["h_mask"])
        if self.refiner is None:
            return self.item_tower.retrieval_head(self.coarse_out(coarse))
        return self._served(
            self.refiner(
                coarse=coarse,
                items=batch["r_items"],
                scenario=batch["r_scenario"],
                action=batch["r_action"],
                gap=batch["r_gap"],
                mask=batch["r_mask"],
                ask=batch["ask"],
            )
        )

    # ---------------------------------------------------------------- streaming path
    @torch.inference_mode()
    def refine_users(self, users: list[UserInput], scenarios: list[int]) -> np.ndarray:
        """(U, S, K, d) vectors from coarse states already read and recent events."""
        if self.refiner is None:
            coarse = torch.as_tensor(np.stack([u.coarse for u in users]))
            v = self.item_tower.retrieval_head(self.coarse_out(coarse)).numpy()
            return np.repeat(v[:, None], len(scenarios), axis=1)
        return self._served(torch.as_tensor(self.refiner.refine(users, scenarios))).numpy()

    @torch.inference_mode()
    def stored_retrieval(self, item_vectors: np.ndarray, ids: np.ndarray | None = None) -> np.ndarray:
        """What the stream stores as an item's ``ret``: (n, d) unit vectors (content + item-ID embedding).
        A trend model's index adds the trend coordinate when it is built (``state.trend``)."""
        return self.item_retrieval(torch.as_tensor(item_vectors, dtype=torch.float32), ids).numpy()

    @torch.inference_mode()
    def retrieval_vectors(
        self, item_vectors: np.ndarray, ids: np.ndarray | None = None, trend: np.ndarray | None = None
    ) -> np.ndarray:
        """What retrieval scores against: (n, d), or (n, d + 1) with the trend coordinate
        (``models.temporal.trend_feature`` of each item at serving time) when the model has the trend.
        ``ids``: each item's row in the checkpoint's item table (-1: an item it never saw), needed when the
        model has item-ID embeddings."""
        ret = self.stored_retrieval(item_vectors, ids)
        if not self.trend:
            return ret
        if trend is None:
            raise ValueError("this model scores a trend coordinate: pass each item's trend (models.temporal)")
        c = len(self.trend_taus_days)
        return np.concatenate([ret, np.asarray(trend, np.float32).reshape(len(ret), c)], 1)

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "model.json").write_text(self.cfg.to_json())
        save_model(self, str(d / "model.safetensors"))

    @classmethod
    def load(cls, directory: str | Path) -> UserModel:
        d = Path(directory)
        if not (d / "model.json").exists():
            raise FileNotFoundError(f"no model checkpoint in {d} (train one with: mirstream train --out {d})")
        model = cls(ModelConfig.from_json((d / "model.json").read_text()))
        load_model(model, str(d / "model.safetensors"))
        return model.eval()


def _weights_digest(prefix: str, module: nn.Module) -> str:
    """sha256 of ``prefix`` and every tensor of ``module``'s state dict (names and bytes, any dtype)."""
    h = hashlib.sha256(prefix.encode())
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class Checkpoint:
    """Everything a worker loads: the model, the codebook and the item table it was trained with."""

    model: UserModel
    codebook: ResidualCodebook
    item_ids: np.ndarray
    item_vectors: np.ndarray  # (n, item_dim) item-tower vectors (what the codebook compresses)
    version: str

    @property
    def codebook_id(self) -> str:
        """Which codebook stored codes need to be decoded with."""
        return self.codebook.fingerprint

    @cached_property
    def state_id(self) -> str:
        """Which coarse states this checkpoint can continue: they depend on the codebook (decoded inputs)
        and on the coarse model's weights; a state of another id is rebuilt from the stored history."""
        return _weights_digest(self.codebook_id, self.model.coarse)[:12]

    @cached_property
    def fingerprint(self) -> str:
        """What computed a result: the version, the codebook and every weight of the model.  A worker and
        its refiner process compare it, so weights retrained under the same ``VERSION`` are told apart."""
        return _weights_digest(f"{self.version}\n{self.codebook_id}", self.model)[:16]

    @cached_property
    def _item_rows(self) -> dict[str, int]:
        return {str(it): i for i, it in enumerate(self.item_ids.tolist())}

    def item_rows(self, items: list[str]) -> np.ndarray:
        """Each item's row in the checkpoint's item table (-1: an item it was not trained with)."""
        return np.asarray([self._item_rows.get(it, -1) for it in items], dtype=np.int64)

    @classmethod
    def load(cls, directory: str | Path) -> Checkpoint:
        d = Path(directory)
        model = UserModel.load(d)
        table = np.load(d / "items.npz", allow_pickle=False)
        version = (d / "VERSION").read_text().strip() if (d / "VERSION").exists() else "0"
        return cls(model, ResidualCodebook.load(d / "codebook"), table["item_ids"], table["item_vectors"], version)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        self.model.save(d)
        self.codebook.save(d / "codebook")
        np.savez(d / "items.npz", item_ids=self.item_ids, item_vectors=self.item_vectors)
        (d / "VERSION").write_text(self.version + "\n")
