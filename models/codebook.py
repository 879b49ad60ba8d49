"""Cosine residual codebook (HyMiRec): a long history costs a few bytes per item.

Layer i picks the codeword closest in cosine to the residual, b_i = argmax_x cos(e_i, c_x), then removes
the projection onto it: e_{i+1} = e_i - α_i c_{b_i}, α_i = (e_i·c_{b_i}) / ‖c_{b_i}‖².  Codewords are unit
vectors, so α_i = e_i·c_{b_i} and decode is Σ α_i c_{b_i}.  α_i is stored as int8 on a per-layer scale,
so an item costs 2 bytes per layer (code + α) when a layer has at most 256 codewords.

Each layer is built with balanced spherical k-means on that layer's residuals: faiss spherical k-means
for the start, then capacity-bounded reassignment rounds so no codeword hoards the pool (collapse).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import faiss
import numpy as np
from safetensors.numpy import load, load_file, save, save_file


@dataclass(frozen=True)
class CodebookConfig:
    dim: int
    layers: int = 3
    codewords: int = 256
    #: Rounds of capacity-bounded reassignment after faiss's spherical k-means.
    balance_rounds: int = 4
    #: A codeword may take at most ``balance_slack`` × (pool size / codewords) vectors.
    balance_slack: float = 1.5
    kmeans_iters: int = 20
    seed: int = 0

    @cached_property  # read per record on the hot paths; the config is frozen
    def code_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.codewords <= 256 else np.uint16)

    @cached_property
    def bytes_per_item(self) -> int:
        return self.layers * (self.code_dtype.itemsize + 1)  # code + int8 alpha per layer


@dataclass(frozen=True)
class Encoded:
    """Codes (n, L) and int8-quantised projection coefficients (n, L)."""

    codes: np.ndarray
    alphas: np.ndarray

    def records(self) -> np.ndarray:
        """Every item's compact record: (n, bytes_per_item) uint8, each row L codes then L int8 alphas."""
        n = len(self.codes)
        return np.concatenate([self.codes.view(np.uint8).reshape(n, -1), self.alphas.view(np.uint8)], axis=1)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def balanced_spherical_kmeans(x: np.ndarray, k: int, cfg: CodebookConfig, seed: int) -> np.ndarray:
    """Unit centroids (k, d) of the unit rows of ``x``, with every cluster size bounded."""
    x = np.ascontiguousarray(_unit(x.astype(np.float32)))
    n, d = x.shape
    if n < k:
        raise ValueError(f"codebook layer needs at least {k} vectors to train {k} codewords, got {n}")
    km = faiss.Kmeans(
        d,
        k,
        niter=cfg.kmeans_iters,
        spherical=True,
        seed=seed,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=max(256, n // k + 1),
    )
    km.train(x)
    centroids = _unit(km.centroids.copy())
    capacity = int(np.ceil(cfg.balance_slack * n / k))
    for _ in range(cfg.balance_rounds):
        assign = _capacity_assign(x, centroids, capacity)
        sums = np.zeros_like(centroids)
        np.add.at(sums, assign, x)
        empty = np.linalg.norm(sums, axis=1) < 1e-9
        centroids = np.where(empty[:, None], centroids, _unit(sums))
    return centroids.astype(np.float32)


def _capacity_assign(x: np.ndarray, centroids: np.ndarray, capacity: int, candidates: int = 8) -> np.ndarray:
    """Greedy best-cosine-first assignment where each centroid takes at most ``capacity`` rows."""
    n, k = x.shape[0], centroids.shape[0]
    m = min(candidates, k)
    sims = x @ centroids.T
    top = np.argpartition(-sims, m - 1, axis=1)[:, :m]
    top_sims = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-top_sims, axis=None, kind="stable")
    rows, cols = np.unravel_index(order, top.shape)
    assign = np.full(n, -1, dtype=np.int64)
    load = np.zeros(k, dtype=np.int64)
    for r, c in zip(rows.tolist(), top[rows, cols].tolist(), strict=True):
        if assign[r] < 0 and load[c] < capacity:
            assign[r] = c
            load[c] += 1
    leftover = np.flatnonzero(assign < 0)  # all m candidates full: take the best centroid with room
    for r in leftover.tolist():
        open_ = np.flatnonzero(load < capacity)
        c = int(open_[np.argmax(sims[r, open_])])
        assign[r] = c
        load[c] += 1
    return assign


class ResidualCodebook:
    """Trained codewords (L, k, d) plus per-layer α scales; encode/decode are batch-vectorised numpy."""

    def __init__(self, cfg: CodebookConfig, codewords: np.ndarray, alpha_scale: np.ndarray) -> None:
        if codewords.shape != (cfg.layers, cfg.codewords, cfg.dim):
            raise ValueError(f"codewords shape {codewords.shape} does not match {cfg}")
        self.cfg = cfg
        self.codewords = codewords.astype(np.float32)
        self.alpha_scale = alpha_scale.astype(np.float32)

    # ---------------------------------------------------------------- training
    @classmethod
    def fit(cls, items: np.ndarray, cfg: CodebookConfig, progress: bool = False) -> ResidualCodebook:
        items = cls._check(items, cfg.dim)
        residual = items.copy()
        books, scales = [], []
        layers = range(cfg.layers)
        if progress:
            from tqdm import tqdm

            layers = tqdm(layers, desc="codebook layers", unit="layer")
        for layer in layers:
            c = balanced_spherical_kmeans(residual, cfg.codewords, cfg, seed=cfg.seed + layer)
            codes, alpha = cls._assign(residual, c)
            residual = residual - alpha[:, None] * c[codes]
            books.append(c)
            scales.append(max(float(np.abs(alpha).max()), 1e-8) / 127.0)
        return cls(cfg, np.stack(books), np.asarray(scales, dtype=np.float32))

    @staticmethod
    def _assign(residual: np.ndarray, book: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Codewords are unit length: argmax cosine == argmax dot product for each row.
        dots = residual @ book.T
        codes = np.argmax(dots, axis=1)
        return codes, dots[np.arange(len(codes)), codes]

    @staticmethod
    def _check(x: np.ndarray, dim: int) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != dim:
            raise ValueError(f"expected item vectors of shape (n, {dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("item vectors contain NaN or inf")
        return x

    # ---------------------------------------------------------------- encode / decode
    def encode(self, items: np.ndarray) -> Encoded:
        residual = self._check(items, self.cfg.dim).copy()
        n, L = residual.shape[0], self.cfg.layers
        codes = np.empty((n, L), dtype=self.cfg.code_dtype)
        alphas = np.empty((n, L), dtype=np.int8)
        for layer in range(L):
            book = self.codewords[layer]
            idx, alpha = self._assign(residual, book)
            q = np.clip(np.rint(alpha / self.alpha_scale[layer]), -127, 127).astype(np.int8)
            codes[:, layer] = idx
            alphas[:, layer] = q
            # Subtract what decode will add back (the quantised α), so later layers fix its error too.
            residual -= (q.astype(np.float32) * self.alpha_scale[layer])[:, None] * book[idx]
        return Encoded(codes, alphas)

    def decode(self, codes: np.ndarray, alphas: np.ndarray, layers: int | None = None) -> np.ndarray:
        """Σ_i α_i c_{b_i} over the first ``layers`` layers (all by default); shapes (..., L) → (..., d)."""
        L = self.cfg.layers if layers is None else layers
        codes = np.asarray(codes).astype(np.int64)
        a = np.asarray(alphas).astype(np.float32) * self.alpha_scale
        out = np.zeros((*codes.shape[:-1], self.cfg.dim), dtype=np.float32)
        for layer in range(L):
            out += a[..., layer, None] * self.codewords[layer][codes[..., layer]]
        return out

    def valid_record(self, record: bytes) -> bool:
        """Whether ``record`` is one item record this codebook can decode (right size, codes in range)."""
        if len(record) != self.cfg.bytes_per_item:
            return False
        L, cd = self.cfg.layers, self.cfg.code_dtype
        codes = np.frombuffer(record[: L * cd.itemsize], dtype=cd)
        return bool((codes < self.cfg.codewords).all())

    def valid_records(self, records: list[bytes]) -> list[bool]:
        """``valid_record`` of each record, the codes checked in one numpy pass (a batch's item codes)."""
        size = self.cfg.bytes_per_item
        ok = [len(r) == size for r in records]
        whole = [r for r, fits in zip(records, ok, strict=True) if fits]
        if not whole:
            return ok
        L, cd = self.cfg.layers, self.cfg.code_dtype
        raw = np.frombuffer(b"".join(whole), dtype=np.uint8).reshape(len(whole), size)[:, : L * cd.itemsize]
        in_range = iter((np.ascontiguousarray(raw).view(cd) < self.cfg.codewords).all(axis=1).tolist())
        return [fits and next(in_range) for fits in ok]

    def from_bytes(self, records: bytes | np.ndarray, count: int) -> np.ndarray:
        """Decodes ``count`` packed item records (see ``Encoded.records``) into (count, d) vectors."""
        L, cd = self.cfg.layers, self.cfg.code_dtype
        raw = np.frombuffer(records, dtype=np.uint8).reshape(count, self.cfg.bytes_per_item)
        codes = raw[:, : L * cd.itemsize].copy().view(cd).reshape(count, L)
        alphas = raw[:, L * cd.itemsize :].copy().view(np.int8)
        return self.decode(codes, alphas)

    # ---------------------------------------------------------------- reports
    def reconstruction_cosine(self, items: np.ndarray) -> list[float]:
        """Mean cosine(item, decode) using the first 1..L layers: must rise with L."""
        items = self._check(items, self.cfg.dim)
        enc = self.encode(items)
        out = []
        for layer in range(1, self.cfg.layers + 1):
            rec = self.decode(enc.codes, enc.alphas, layers=layer)
            out.append(float(np.mean(np.sum(_unit(items) * _unit(rec), axis=1))))
        return out

    def utilisation(self, items: np.ndarray) -> list[dict[str, float]]:
        """Per layer: share of codewords used and normalised code entropy (1.0 = uniform; ~0 = collapse)."""
        codes = self.encode(items).codes
        report = []
        for layer in range(self.cfg.layers):
            counts = np.bincount(codes[:, layer].astype(np.int64), minlength=self.cfg.codewords)
            p = counts[counts > 0] / counts.sum()
            entropy = float(-(p * np.log(p)).sum() / np.log(self.cfg.codewords))
            report.append({"used": float((counts > 0).mean()), "entropy": entropy})
        return report

    # ---------------------------------------------------------------- identity (roll-outs)
    @cached_property
    def fingerprint(self) -> str:
        """A short id of these exact codewords: stored codes name the codebook that can decode them."""
        h = hashlib.sha256(json.dumps(asdict(self.cfg), sort_keys=True).encode())
        h.update(self.codewords.tobytes())
        h.update(self.alpha_scale.tobytes())
        return h.hexdigest()[:12]

    def to_blob(self) -> bytes:
        """The whole codebook as one byte string (config + safetensors), to share it through a store."""
        meta = {"config": json.dumps(asdict(self.cfg))}
        return save({"codewords": self.codewords, "alpha_scale": self.alpha_scale}, metadata=meta)

    @classmethod
    def from_blob(cls, blob: bytes) -> ResidualCodebook:
        header_len = int.from_bytes(blob[:8], "little")
        cfg = CodebookConfig(**json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["config"]))
        tensors = load(blob)
        return cls(cfg, tensors["codewords"], tensors["alpha_scale"])

    # ---------------------------------------------------------------- persistence
    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({"codewords": self.codewords, "alpha_scale": self.alpha_scale}, str(d / "codebook.safetensors"))
        (d / "codebook.json").write_text(json.dumps(asdict(self.cfg), indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> ResidualCodebook:
        d = Path(directory)
        cfg = CodebookConfig(**json.loads((d / "codebook.json").read_text()))
        tensors = load_file(str(d / "codebook.safetensors"))
        return cls(cfg, tensors["codewords"], tensors["alpha_scale"])


def transcode(records: bytes | np.ndarray, count: int, source: ResidualCodebook, target: ResidualCodebook) -> bytes:
    """Item records of ``source`` → records of ``target`` (decode, then encode): what a codebook switch does
    to codes whose raw vector is gone.  Loses a little more than encoding the raw vector would."""
    if count == 0:
        return b""
    return target.encode(source.from_bytes(records, count)).records().tobytes()
