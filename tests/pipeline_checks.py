"""What the integration tests compare a stream's Redis state against: the models run offline."""

from __future__ import annotations

import numpy as np

from models.refiner import UserInput
from models.user_model import Checkpoint
from state.keys import Keys
from state.store import InterestReader, connect_sync
from streams.replay import expected_seq, plan, send_events, send_items
from streams.topics import ensure_topics

COARSE_TOL = 1e-5  # float64 running sums: only summation order differs between stream and offline
VECTOR_TOL = 1e-4  # float32 refiner; the same inputs up to the coarse tolerance


def offline(ckpt: Checkpoint, ds, user: str, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """What the models compute for a user without any stream: coarse interests and refined vectors."""
    u = int(np.flatnonzero(ds.user_ids.astype(str) == user)[0])
    sl = ds.user_slice(u)
    items = ckpt.item_vectors[ds.item[sl]]
    enc = ckpt.codebook.encode(items)
    decoded = ckpt.codebook.decode(enc.codes, enc.alphas)
    model = ckpt.model
    state = model.coarse.update(model.coarse.init_state(), decoded, ds.scenario[sl], ds.action[sl], ds.ts[sl])
    coarse = model.coarse.read(state)
    keep = slice(max(0, len(decoded) - cap), None)
    recent = UserInput(coarse, decoded[keep], ds.scenario[sl][keep], ds.action[sl][keep], ds.ts[sl][keep])
    return coarse, model.refine_users([recent], list(range(len(ds.scenarios))))[0]


def snapshot(redis_url: str, prefix: str, users: list[str]) -> dict[str, tuple]:
    """Every byte of each user's state, history and vectors (timestamps of writes aside)."""
    r, keys = connect_sync(redis_url), Keys(prefix)
    out = {}
    for u in users:
        s = r.hgetall(keys.user_state(u))
        v = r.hgetall(keys.user_vectors(u))
        out[u] = (
            s[b"seq"],
            s[b"coarse"],
            r.get(keys.user_history(u)),
            v.get(b"seq"),
            tuple(sorted((k, val) for k, val in v.items() if k.startswith(b"vec:"))),
        )
    return out


def replay(settings, ds, users: int, **kw) -> dict[str, int]:
    p = plan(ds, max_users=users)
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    send_events(settings, ds, p.events, progress=False, **kw)
    return expected_seq(ds, p.events)


def assert_matches_offline(settings, ds, expected: dict[str, int], scenarios: tuple[str, ...] = ("feed",)) -> None:
    """Each user applied exactly its events (``seq``), and state + vectors equal the offline models."""
    ckpt = Checkpoint.load(settings.checkpoint)
    reader = InterestReader(settings.redis_url, settings.prefix)
    r, keys = connect_sync(settings.redis_url), Keys(settings.prefix)
    for user, n in expected.items():
        _, meta = reader.get_user_interests(user)
        assert meta.seq == n, f"user {user}: seq {meta.seq} != {n} events (one lost or applied twice)"
        state = np.frombuffer(r.hget(keys.user_state(user), "coarse"), dtype="<f8")
        coarse_off, vectors_off = offline(ckpt, ds, user, settings.history_cap)
        np.testing.assert_allclose(ckpt.model.coarse.read(state), coarse_off, atol=COARSE_TOL)
        for s in scenarios:
            np.testing.assert_allclose(meta.vectors[s], vectors_off[ds.scenarios.index(s)], atol=VECTOR_TOL)
