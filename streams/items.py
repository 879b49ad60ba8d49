"""What the item agent does: item text or vector → item vector → codebook codes + retrieval vector → Redis.

Text-only items go through the item tower (the LLM + the trained adapter), loaded on first use.  When an
item is stored, events that were parked waiting for it are re-produced to their scenario topics.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch

from models.user_model import Checkpoint
from state.store import StreamStore
from streams import metrics
from streams.events import Item, Message, Rejected, parse_item
from streams.ingest import DeadLetter, Republish, release_parked
from streams.settings import Settings
from streams.switch import Codebooks


class ItemHandler:
    def __init__(
        self,
        settings: Settings,
        ckpt: Checkpoint,
        store: StreamStore,
        codebooks: Codebooks,
        deadletter: DeadLetter,
        republish: Republish,
        text_backbone: str | None = None,
    ) -> None:
        self.settings = settings
        self.ckpt = ckpt
        self.store = store
        self.codebooks = codebooks
        self.deadletter = deadletter
        self.republish = republish
        self.text_backbone = text_backbone
        self._encoder = None

    async def handle(self, batch: list[Message]) -> list[str]:
        await self.codebooks.publish()
        parsed: list[tuple[Message, Item]] = []
        for msg in batch:
            try:
                parsed.append((msg, parse_item(msg.value, self.ckpt.codebook.cfg.dim, self.settings.max_message_bytes)))
            except Rejected as exc:
                await self.deadletter(msg, str(exc), "item")
        if any(item.vector is None for _, item in parsed):
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._text_encoder)
            except Exception as exc:  # the worker cannot encode text: each text-only item says so, vectors go on
                reason = f"text-only item, and this worker cannot encode text ({type(exc).__name__}: {exc})"
                for msg, item in parsed:
                    if item.vector is None:
                        await self.deadletter(msg, reason, "item")
                parsed = [(m, it) for m, it in parsed if it.vector is not None]
        if not parsed:
            return []
        items = [item for _, item in parsed]
        vectors = await asyncio.get_running_loop().run_in_executor(None, self._vectors, items)
        rows = self.ckpt.item_rows([it.item_id for it in items])
        retrieval = self.ckpt.model.stored_retrieval(vectors, rows).astype("<f4")
        usable = np.isfinite(vectors).all(axis=1) & np.isfinite(retrieval).all(axis=1)
        for (msg, _), ok in zip(parsed, usable, strict=True):
            if not ok:
                await self.deadletter(msg, "the item's vector gives NaN or infinite model outputs", "item")
        items, vectors, retrieval = (
            [it for it, ok in zip(items, usable, strict=True) if ok],
            vectors[usable],
            retrieval[usable],
        )
        if not items:
            return []
        codes = self.ckpt.codebook.encode(vectors).records()
        rows = [
            (item.item_id, codes[i].tobytes(), retrieval[i].tobytes(), self.ckpt.version, item.text or "")
            for i, item in enumerate(items)
        ]
        # Stored first, then the parking lists are read (see ingest._park).
        await self.store.put_items(rows, self.ckpt.codebook_id)
        metrics.ITEMS.inc(len(items))
        ids = [it.item_id for it in items]
        for item_id, waiting in (await self.store.parked_counts(ids)).items():
            if waiting:
                await release_parked(self.store, self.republish, item_id)
        return ids

    def _text_encoder(self):
        if self._encoder is None:
            from models.item_tower import TextEncoder

            cfg = self.ckpt.model.cfg  # the LLM configuration the checkpoint's item tower was trained on
            backbone = self.text_backbone or cfg.item_backbone
            self._encoder = TextEncoder(backbone, layers=cfg.item_layers, dtype=cfg.item_dtype)
        return self._encoder

    def _vectors(self, items: list[Item]) -> np.ndarray:
        out = np.zeros((len(items), self.ckpt.codebook.cfg.dim), np.float32)
        need_text = [i for i, it in enumerate(items) if it.vector is None]
        for i, it in enumerate(items):
            if it.vector is not None:
                out[i] = it.vector
        if need_text:
            states = self._text_encoder().encode([items[i].text or "" for i in need_text])
            with torch.inference_mode():
                out[need_text] = self.ckpt.model.item_tower.item_vectors(torch.as_tensor(states)).numpy()
        return out
