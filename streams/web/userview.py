"""What the user page shows, as one JSON document: "what does the system think this user likes, and is it
fresh?"

For each scenario, each of the K interest vectors as its top-N nearest items; the user's recent events
(decoded from the stored history records: time, scenario, action, item); the coarse interests as the
stored events each one weighs most; the model version, the event watermark and the freshness.  Every read
is a plain Redis read (no write, no lock), so the page can never disturb the pipeline.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import torch

from models.coarse import DAY, hour_of_day
from models.user_model import Checkpoint
from state.store import AsyncInterestReader, Interests, UserStatus
from state.users import CorruptState, decode_coarse, decode_history
from streams.web.catalogue import Catalogue, Snapshot

RECENT = 15  # events listed
TOP_N = 5  # items per interest vector


def _item(snap: Snapshot, rows: list[int]) -> dict:
    if not rows:
        return {"item": None, "title": "(item not in the catalogue with these codes)"}
    first = rows[0]
    more = f" (+{len(rows) - 1} items with the same codes)" if len(rows) > 1 else ""
    return {"item": snap.ids[first], "title": snap.titles[first] + more}


def _records(ckpt: Checkpoint, history: bytes, code_bytes: int) -> np.ndarray:
    rec = decode_history(history, code_bytes)
    return rec[np.lexsort((np.arange(len(rec)), rec["ts"]))]  # time order, applied order breaks ties


def recent_events(ckpt: Checkpoint, snap: Snapshot, codes: dict[bytes, list[int]], history: bytes, n: int) -> list:
    """The newest ``n`` stored events, newest first."""
    rec = _records(ckpt, history, ckpt.codebook.cfg.bytes_per_item)[-n:][::-1]
    scenarios, actions = ckpt.model.cfg.scenarios, ckpt.model.cfg.actions
    out = []
    for r in rec:
        s, a = int(r["scenario"]), int(r["action"])
        row = {
            "ts": float(r["ts"]),
            "scenario": scenarios[s] if s < len(scenarios) else f"#{s}",
            "action": actions[a] if a < len(actions) else f"#{a}",
        }
        out.append({**row, **_item(snap, codes.get(r["code"].tobytes(), []))})
    return out


@torch.inference_mode()
def coarse_weights(ckpt: Checkpoint, status: UserStatus, history: bytes) -> np.ndarray:
    """(M, events) attention of each coarse query over the stored events (time order): the same logits the
    coarse state sums over (decay included), normalised over the stored history only."""
    model = ckpt.model.coarse
    state = decode_coarse(status.coarse, model.state_size)
    rec = _records(ckpt, history, ckpt.codebook.cfg.bytes_per_item)
    if state is None or not len(rec):
        return np.zeros((model.cfg.interests, 0))
    items = ckpt.codebook.from_bytes(rec["code"].tobytes(), len(rec))
    ts = rec["ts"].astype(np.float64)
    logits, _ = model.event_terms(
        torch.as_tensor(items, dtype=torch.float32),
        torch.as_tensor(rec["scenario"].astype(np.int64)),
        torch.as_tensor(rec["action"].astype(np.int64)),
        torch.as_tensor(hour_of_day(ts)),
        torch.as_tensor((ts - state[1]) / DAY, dtype=torch.float32),
    )
    return torch.softmax(logits.double(), dim=0).T.numpy()


def coarse_section(
    ckpt: Checkpoint, status: UserStatus, history: bytes, snap: Snapshot, codes: dict[bytes, list[int]]
) -> dict:
    """Each coarse interest as the items of the events it weighs most, or why that cannot be shown."""
    if status.state_id != ckpt.state_id or status.codebook != ckpt.codebook_id:
        return {"available": False, "note": "the coarse state was built by another checkpoint than this worker's"}
    try:
        weights = coarse_weights(ckpt, status, history)
    except CorruptState as exc:
        return {"available": False, "note": f"the stored state cannot be read: {exc}"}
    rec = _records(ckpt, history, ckpt.codebook.cfg.bytes_per_item)
    interests = []
    for w in weights:
        per_item: dict[bytes, float] = {}
        for code, x in zip(rec["code"], w, strict=True):
            per_item[code.tobytes()] = per_item.get(code.tobytes(), 0.0) + float(x)
        top = sorted(per_item.items(), key=lambda kv: -kv[1])[:TOP_N]
        interests.append([{**_item(snap, codes.get(c, [])), "weight": x} for c, x in top])
    note = f"attention of each of the {len(weights)} coarse queries over the {len(rec)} stored events"
    return {"available": bool(len(rec)), "note": note, "interests": interests}


def vectors_section(found: Interests, snap: Snapshot, n: int) -> list[dict]:
    out = []
    for scenario in sorted(found.vectors):
        hits = snap.nearest(found.vectors[scenario], n)
        interests = [[{"item": snap.ids[j], "title": snap.titles[j], "score": s} for j, s in h] for h in hits]
        out.append({"scenario": scenario, "interests": interests})
    return out


async def user_view(
    ckpt: Checkpoint, reader: AsyncInterestReader, catalogue: Catalogue, user: str, n: int = TOP_N
) -> tuple[int, dict]:
    """(HTTP status, the page's document).  Raises what Redis raises (the caller tells an outage apart)."""
    body: dict = {"user": user, "now": time.time()}
    status, found = await asyncio.gather(reader.user_status(user), reader.interests(user))
    if status is None and found is None:
        body |= {"status": "unknown", "message": f"no event of user {user!r} has been applied: unknown user"}
        return 404, body
    snap = await catalogue.current()
    body["items"] = len(snap.ids)
    if status is not None:
        body["applied"] = {"seq": status.seq, "last_ts": status.last_ts, "kafka_ts": status.kts}
        history = await reader.history(user)
        code_map = await catalogue.code_map(snap, status.codebook) if status.codebook else {}
        body["recent"] = []
        if status.codebook != ckpt.codebook_id:
            body["recent_note"] = f"the history is in codebook {status.codebook}, not this worker's: not decoded here"
        else:
            try:
                body["recent"] = recent_events(ckpt, snap, code_map, history, RECENT)
            except CorruptState as exc:
                body["recent_note"] = f"the stored history cannot be read: {exc}"
        body["coarse"] = await asyncio.to_thread(coarse_section, ckpt, status, history, snap, code_map)
    if found is None:
        seq = status.seq if status else 0
        body |= {"status": "no_vectors", "message": f"user {user!r} has {seq} events applied but no vectors yet"}
        return 200, body
    body["status"] = "ok"
    body["vectors"] = {
        "version": found.version,
        "seq": found.seq,
        "updated_at": found.updated_at,
        "event_ts": found.event_ts,
        "produced_at": found.produced_at,
        "freshness_s": found.updated_at - found.produced_at,
        "pending": max(0, (status.seq if status else found.seq) - found.seq),
        "k": next(iter(found.vectors.values())).shape[0],
    }
    body["scenarios"] = await asyncio.to_thread(vectors_section, found, snap, n)
    return 200, body
