"""What the integration tests compare a stream's Redis state against: the models run offline."""

from __future__ import annotations

import time
import urllib.request

import numpy as np
import orjson
import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.admin import KafkaAdminClient, OffsetSpec

from models.codebook import CodebookConfig, ResidualCodebook, transcode
from models.refiner import UserInput
from models.user_model import Checkpoint
from state.history import MINUTE, minutes
from state.keys import Keys
from state.store import RedisTLS, connect_sync
from state.users import decode_coarse
from streams.replay import expected_seq, plan, send_events, send_items
from streams.security import interest_reader, kafka_python_config, redis_sync
from streams.topics import ensure_topics

COARSE_TOL = 1e-5  # float64 running sums: only summation order differs between stream and offline
VECTOR_TOL = 1e-4  # float32 refiner; the same inputs up to the coarse tolerance
#: Stored vectors are float16 (``state.store.encode_vectors``): one float16 step, relative, on top.
STORED_RTOL = 2.0**-10


def lagging(settings, timeout: float = 60.0) -> dict[TopicPartition, int]:
    """Polls until the worker group has committed every input partition to its end offset (a worker acks
    an event only once Redis holds its effect); returns what is still behind at the timeout."""
    topics = [*(settings.events_topic(s) for s in settings.scenarios), settings.items_topic]
    tps = [TopicPartition(t, p) for t in topics for p in range(settings.partitions)]
    admin = KafkaAdminClient(**kafka_python_config(settings))
    try:
        ends = {tp: o.offset for tp, o in admin.list_partition_offsets(dict.fromkeys(tps, OffsetSpec.LATEST)).items()}
        deadline = time.monotonic() + timeout
        while True:
            done = admin.list_group_offsets({settings.app_id: tps})[settings.app_id]
            behind = {tp: end - max(done[tp].offset if tp in done else 0, 0) for tp, end in ends.items()}
            behind = {tp: n for tp, n in behind.items() if n > 0}
            if not behind or time.monotonic() >= deadline:
                return behind
            time.sleep(0.5)
    finally:
        admin.close()


def read_deadletters(settings, n: int, timeout_ms: int = 30_000) -> list[dict]:
    """The first ``n`` dead letters of the run (fewer if they do not come within the timeout)."""
    consumer = KafkaConsumer(
        settings.deadletter_topic,
        **kafka_python_config(settings),
        auto_offset_reset="earliest",
        consumer_timeout_ms=timeout_ms,
    )
    out = []
    for msg in consumer:
        out.append(orjson.loads(msg.value))
        if len(out) >= n:
            break
    consumer.close()
    return out


def offline(
    ckpt: Checkpoint, ds, user: str, cap: int, stored_by: Checkpoint | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """What the models compute for a user without any stream: coarse interests and refined vectors.
    ``stored_by``: the items were stored by a worker of that checkpoint's codebook, then re-encoded
    into ``ckpt``'s (a codebook switch, ``streams.switch``)."""
    u = int(np.flatnonzero(ds.user_ids.astype(str) == user)[0])
    sl = ds.user_slice(u)
    items = ckpt.item_vectors[ds.item[sl]]
    decoded = ckpt.codebook.from_bytes(item_records(ckpt, items, stored_by), len(items))
    model = ckpt.model
    state = model.coarse.update(model.coarse.init_state(), decoded, ds.scenario[sl], ds.action[sl], ds.ts[sl])
    coarse = model.coarse.read(state)
    keep = slice(max(0, len(decoded) - cap), None)
    # The refiner reads the history's records: times floored to the minute (``state.history``), in
    # (time, scenario) order, the order applied breaking ties (``streams.refinement.user_inputs``).
    ts = minutes(ds.ts[sl][keep]) * MINUTE
    scenario, action = ds.scenario[sl][keep], ds.action[sl][keep]
    order = np.lexsort((scenario, ts))
    recent = UserInput(coarse, decoded[keep][order], scenario[order], action[order], ts[order])
    return coarse, model.refine_users([recent], list(range(len(ds.scenarios))))[0]


def item_records(ckpt: Checkpoint, items: np.ndarray, stored_by: Checkpoint | None = None) -> bytes:
    """The codes a worker of ``ckpt`` uses for these item vectors: its own encoding, or after a switch
    from ``stored_by``'s codebook the re-encoded codes of that one."""
    if stored_by is None:
        return ckpt.codebook.encode(items).records().tobytes()
    old = stored_by.codebook.encode(items).records().tobytes()
    return transcode(old, len(items), stored_by.codebook, ckpt.codebook)


def retrained(src: str, out, version: str) -> Checkpoint:
    """A checkpoint as a retrain would give: another codebook (4 layers instead of 3, so a history record
    changes size too) and other coarse weights; the refiner and item table kept."""
    ckpt = Checkpoint.load(src)
    cfg = ckpt.codebook.cfg
    ckpt.codebook = ResidualCodebook.fit(ckpt.item_vectors, CodebookConfig(cfg.dim, 4, cfg.codewords, seed=11))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in ckpt.model.coarse.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ckpt.version = version
    ckpt.save(out)
    return Checkpoint.load(out)


def snapshot(redis_url: str, prefix: str, users: list[str], tls: RedisTLS | None = None) -> dict[str, tuple]:
    """Every byte of each user's state, coarse state, history and vectors (timestamps of writes aside)."""
    r, keys = connect_sync(redis_url, tls), Keys(prefix)
    out = {}
    for u in users:
        s = r.hgetall(keys.user_state(u))
        v = r.hgetall(keys.user_vectors(u))
        out[u] = (
            s[b"seq"],
            r.get(keys.user_coarse(u)),
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
    reader = interest_reader(settings)
    r, keys = redis_sync(settings), Keys(settings.prefix)
    for user, n in expected.items():
        _, meta = reader.get_user_interests(user)
        assert meta.seq == n, f"user {user}: seq {meta.seq} != {n} events (one lost or applied twice)"
        state = decode_coarse(r.get(keys.user_coarse(user)), ckpt.model.coarse.state_size)
        coarse_off, vectors_off = offline(ckpt, ds, user, settings.history_cap)
        np.testing.assert_allclose(ckpt.model.coarse.read(state), coarse_off, atol=COARSE_TOL)
        for s in scenarios:
            want = vectors_off[ds.scenarios.index(s)]
            np.testing.assert_allclose(meta.vectors[s], want, atol=VECTOR_TOL, rtol=STORED_RTOL)


def behind_report(settings, behind: dict[str, int], web_port: int | None = None) -> str:
    """Why users are behind, for a failure message: per user the seq expected, applied (state) and
    refined (vectors), its dirty-set entries and quarantine reason; the committed lag; events still
    parked; the counters of a running worker (its web port) that say whether its agents and refinement
    ticks move."""
    reader = interest_reader(settings)
    users = list(behind)
    applied, refined = reader.seqs(users, applied=True), reader.seqs(users)
    r, keys = redis_sync(settings), Keys(settings.prefix)
    lines = []
    for u, want, got_a, got_r in zip(users, behind.values(), applied, refined, strict=True):
        dirty = {p: r.hget(keys.dirty_seq(p), u) for p in range(settings.partitions) if r.zscore(keys.dirty(p), u)}
        why = r.hget(keys.quarantine, u)
        lines.append(f"user {u}: expected {want}, applied {got_a}, refined {got_r}, dirty {dirty}, quarantined {why}")
    lines.append(f"lag: {lagging(settings, timeout=5)}")
    for item, _ in r.zrange(keys.parked_index, 0, 20, withscores=True):  # events still waiting for an item
        bodies = [orjson.loads(b) for b in r.lrange(keys.parked(item.decode()), 0, -1)]
        lines.append(f"parked for item {item.decode()}: {[(b['user_id'], b.get('_origin')) for b in bodies]}")
    if web_port:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
        except OSError as exc:
            text = ""
            lines.append(f"no metrics from the worker: {exc}")
        wanted = (
            "mirstream_agent_errors",
            "mirstream_refinements",
            "mirstream_last_progress",
            "mirstream_events_total",
        )
        lines += [m for m in text.splitlines() if m.startswith(wanted)] + [f"now {time.time():.0f}"]
    return "\n".join(lines)
