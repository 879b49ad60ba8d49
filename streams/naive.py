"""The naive pipeline ``bench ingest`` compares against: per event, fetch, recompute, write back.

What a first design without the codebook or the O(1) state would do: for every event, read the user's
whole history of raw float32 item vectors from Redis, append the event, recompute the coarse model
over the whole history, write history and interests back.  Same Kafka topics, same model, same Redis;
one consumer process, like the worker.  No exactly-once bookkeeping (that only flatters it).
"""

from __future__ import annotations

import time

import numpy as np
import orjson
import torch
from kafka import KafkaConsumer

from models.user_model import Checkpoint
from state.baseline import BaselineStore
from streams.security import kafka_python_config, redis_sync
from streams.settings import Settings


def record_dtype(dim: int) -> np.dtype:
    return np.dtype([("v", "<f4", (dim,)), ("s", "u1"), ("a", "u1"), ("ts", "<f8")])


def run_naive(
    settings: Settings, ckpt: Checkpoint, item_vectors: dict[str, np.ndarray], events: int, timeout: float = 900.0
) -> dict:
    """Consumes ``events`` events from the scenario topics of ``settings.prefix``; returns events/s.  Its
    model calls run on one torch thread, as the worker's agents do (``streams.refinement``): on a busy
    2-core machine two OpenMP threads made each call ~50x slower, which flattered every ratio against it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _consume(settings, ckpt, item_vectors, events, timeout)
    finally:
        torch.set_num_threads(threads)


def _consume(
    settings: Settings, ckpt: Checkpoint, item_vectors: dict[str, np.ndarray], events: int, timeout: float
) -> dict:
    consumer = KafkaConsumer(
        *[settings.events_topic(s) for s in settings.scenarios],
        **kafka_python_config(settings),
        group_id=f"naive-{settings.prefix}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    store = BaselineStore(redis_sync(settings), settings.prefix)
    model = ckpt.model.coarse
    dim = ckpt.codebook.cfg.dim
    dtype = record_dtype(dim)
    scenarios = {s: i for i, s in enumerate(settings.scenarios)}
    actions = {a: i for i, a in enumerate(ckpt.model.cfg.actions)}
    done, t0 = 0, None
    deadline = time.monotonic() + timeout
    while done < events and time.monotonic() < deadline:
        for msgs in consumer.poll(timeout_ms=500, max_records=500).values():
            t0 = t0 or time.perf_counter()
            for m in msgs:
                ev = orjson.loads(m.value)
                rec = np.zeros(1, dtype)
                rec["v"], rec["s"], rec["a"], rec["ts"] = (
                    item_vectors[ev["item_id"]],
                    scenarios[ev["scenario"]],
                    actions[ev["action"]],
                    ev["ts"],
                )
                hist = np.frombuffer(store.history(ev["user_id"]) + rec.tobytes(), dtype)
                hist = hist[np.argsort(hist["ts"], kind="stable")][-settings.history_cap :]
                with torch.inference_mode():
                    interests = model(
                        torch.as_tensor(hist["v"].copy())[None],
                        torch.as_tensor(hist["s"].astype(np.int64))[None],
                        torch.as_tensor(hist["a"].astype(np.int64))[None],
                        torch.as_tensor(hist["ts"].copy())[None],
                        torch.ones(1, len(hist), dtype=torch.bool),
                    )
                store.save(ev["user_id"], hist.tobytes(), interests.numpy().astype("<f4").tobytes())
                done += 1
        consumer.commit()
    wall = time.perf_counter() - (t0 or time.perf_counter())
    consumer.close()
    return {"events": done, "wall_s": wall, "events_per_s": done / max(wall, 1e-9), "complete": done >= events}
