"""Roll-outs that change the codebook or the coarse model: stored codes and states stay usable.

Every code in Redis names the codebook that made it: an item's codes sit in the field
``code:<codebook id>``, a user's history is in the codebook named by the state's ``cb``, and the coarse
state names the checkpoint state id (``gen``: codebook + coarse weights) that built it.  Each worker
publishes its codebook under ``<p>:codebook:<id>`` at start, so any worker can decode codes of any
codebook that ever ran, in either direction of a roll-out (a partition may move back to an old worker).

- **Items**: a worker that finds no code of its codebook on an item re-encodes one it can decode
  (decode, then encode: ``models.codebook.transcode``) and adds it next to the old one; a background
  pass (``recode_items``, at worker start and ``mirstream recode``) does the same for every item.
- **Users**: a worker that meets a state of another ``gen`` rebuilds it in the same atomic apply step:
  the history is re-encoded into its codebook and the coarse state recomputed from that history (the
  capped recent history is all that is kept, so older events drop out of the coarse interests).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import numpy as np

from models.codebook import ResidualCodebook, transcode
from models.user_model import Checkpoint
from state.history import decode, encode, records
from state.store import StreamStore
from streams import metrics

log = logging.getLogger(__name__)


def built_elsewhere(ckpt: Checkpoint, state_id: str | None) -> bool:
    """Whether another checkpoint built a stored state (None: a state from before the ``gen`` field, or no
    state yet, both this checkpoint's)."""
    return state_id not in (None, ckpt.state_id)


class UnknownCodebook(LookupError):
    """Codes name a codebook no worker published (its checkpoint never ran against this Redis)."""


class Codebooks:
    """This worker's codebook plus every other one met so far, loaded from Redis on first use."""

    def __init__(self, store: StreamStore, own: ResidualCodebook) -> None:
        self.store = store
        self.own = own
        self.own_id = own.fingerprint
        self._known: dict[str, ResidualCodebook] = {self.own_id: own}
        self._published = False

    async def publish(self) -> None:
        """Makes this codebook loadable by every worker before this one writes a code of it."""
        if not self._published:
            if await self.store.register_codebook(self.own_id, self.own.to_blob()):
                log.info("published codebook %s", self.own_id)
            self._published = True

    async def get(self, codebook_id: str) -> ResidualCodebook:
        if codebook_id not in self._known:
            blob = await self.store.codebook_blob(codebook_id)
            if blob is None:
                raise UnknownCodebook(f"codebook {codebook_id} was never published to this Redis")
            self._known[codebook_id] = ResidualCodebook.from_blob(blob)
            log.info("loaded codebook %s to decode codes stored with it", codebook_id)
        return self._known[codebook_id]

    async def loadable(self, codebook_ids: set[str]) -> dict[str, ResidualCodebook]:
        """This worker's codebook and each of ``codebook_ids`` that was published (others are left out:
        a user whose history names one cannot be applied, see ``streams.planner``)."""
        out = {self.own_id: self.own}
        for book_id in codebook_ids:
            try:
                out[book_id] = await self.get(book_id)
            except UnknownCodebook:
                continue
        return out

    async def item_codes(self, items: list[str]) -> dict[str, bytes | None]:
        """Each item's codes in this worker's codebook; re-encodes (and stores) codes of another
        codebook when the item has none in ours yet.  None: the item is not known (or its stored code
        cannot be decoded: it waits, parked, for the item to be sent again)."""
        codes = await self.store.item_codes(items, self.own_id)
        missing = [it for it, c in codes.items() if c is None]
        if missing:
            codes.update(await self.recode(missing))
        known = [item for item, code in codes.items() if code is not None]
        for item, ok in zip(known, self.own.valid_records([codes[it] for it in known]), strict=True):
            if not ok:
                log.error("item %s has a code this codebook cannot decode; treated as not known", item)
                codes[item] = None
        return codes

    async def recode(self, items: list[str]) -> dict[str, bytes]:
        """Re-encodes into this codebook items that have codes of another (published) one, and stores
        them; returns the new codes.  Items without any code are left out."""
        moved: dict[str, bytes] = {}
        for item, by_book in (await self.store.item_codes_any(items)).items():
            if self.own_id in by_book and self.own.valid_record(by_book[self.own_id]):
                moved[item] = by_book[self.own_id]  # stored by an item agent of ours since the caller looked
                continue
            for book_id, code in by_book.items():
                if book_id == self.own_id:
                    continue
                try:
                    source = await self.get(book_id)
                except UnknownCodebook:
                    continue
                if not source.valid_record(code):
                    continue
                moved[item] = transcode(code, 1, source, self.own)
                metrics.ITEMS_RECODED.inc()
                break
        # What is stored wins (an item agent may have stored the item's own code meanwhile).
        return await self.store.add_item_codes(moved, self.own_id) if moved else {}


def rebuild_user(
    ckpt: Checkpoint, source: ResidualCodebook, history: bytes, cap: int | None = None
) -> tuple[np.ndarray, bytes]:
    """A state of another checkpoint → (this checkpoint's coarse state, the history in its codebook):
    the history's newest ``cap`` records (all when None) re-encoded (when the codebook differs) and the
    coarse state recomputed over them.  ``ValueError`` for a history that cannot be decoded."""
    model = ckpt.model.coarse
    rec = decode(history, source.cfg.bytes_per_item)
    if cap is not None:
        rec = rec[-cap:]
    if len(rec) == 0:
        return model.init_state(), b""
    codes = rec["code"].tobytes()
    if source.fingerprint != ckpt.codebook_id:
        codes = transcode(codes, len(rec), source, ckpt.codebook)
    code_rows = np.frombuffer(codes, dtype=np.uint8).reshape(len(rec), ckpt.codebook.cfg.bytes_per_item)
    vectors = ckpt.codebook.from_bytes(codes, len(rec))
    state = model.update(model.init_state(), vectors, rec["scenario"], rec["action"], rec["ts"])
    return state, encode(records(code_rows, rec["scenario"], rec["action"], rec["ts"]))


async def recode_items(
    store: StreamStore,
    codebooks: Codebooks,
    chunk: int = 500,
    pause_s: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Gives every known item a code of this worker's codebook (one scan of the item set); returns how
    many were re-encoded.  Marks the codebook done, so later workers skip the scan."""
    if await store.recoded(codebooks.own_id):
        return 0
    await codebooks.publish()  # before any code of it is stored
    done, cursor = 0, 0
    while True:
        cursor, items = await store.scan_items(cursor, chunk)
        if items:
            codes = await store.item_codes(items, codebooks.own_id)
            done += len(await codebooks.recode([it for it, c in codes.items() if c is None]))
            if progress is not None:
                progress(len(items))
        if cursor == 0:
            break
        await asyncio.sleep(pause_s)  # leave the event loop to the agents between chunks
    await store.mark_recoded(codebooks.own_id)
    if done:
        log.info("re-encoded %d items into codebook %s", done, codebooks.own_id)
    return done
