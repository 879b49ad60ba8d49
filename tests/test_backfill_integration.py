"""Bring your own data against real Kafka + Redis: a backfill of the first half of a dataset followed by the
stream equals the stream of all of it (also when the stream replays the backfilled half), and the CLI's
train / evaluate / replay / backfill all work on the example files."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import redis

from models.data import load, load_files
from models.files import Rejects
from models.train import TrainConfig, run_train
from models.user_model import Checkpoint
from state import trend
from state.history import decode
from state.keys import Keys
from state.store import InterestReader
from state.users import decode_coarse
from streams.backfill import run_backfill
from streams.replay import expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.security import interest_reader
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
USERS = 8
TOL = 1e-5


def _write_files(tmp: Path) -> tuple[Path, Path, Path, float]:
    """The simulator's first users as a team's files: items, all events, and the first half (by time)."""
    ds = load("sim")
    stop = int(ds.offsets[USERS])
    order = np.lexsort((np.arange(stop), ds.ts[:stop]))
    items, every, half = tmp / "items.jsonl", tmp / "events.jsonl", tmp / "first-half.jsonl"
    with open(items, "wb") as f:
        for j in np.unique(ds.item[:stop]).tolist():
            f.write(orjson.dumps({"item_id": str(ds.item_ids[j]), "vector": ds.item_vectors[j].tolist()}) + b"\n")
    cut = float(ds.ts[order[len(order) // 2]])
    with open(every, "wb") as f, open(half, "wb") as h:
        for i in order.tolist():
            body = {
                "event_id": f"e{i}",
                "user_id": str(ds.user_ids[ds.user[i]]),
                "item_id": str(ds.item_ids[ds.item[i]]),
                "scenario": ds.scenarios[ds.scenario[i]],
                "action": ds.actions[ds.action[i]],
                "ts": float(ds.ts[i]),
            }
            f.write(orjson.dumps(body) + b"\n")
            if body["ts"] <= cut:
                h.write(orjson.dumps(body) + b"\n")
    return items, every, half, cut


def _stream(settings, events: Path, items: Path, log: Path, expected: dict[str, int], only_after: float = 0.0):
    ds = load_files(events, items, Rejects())
    p = plan(ds)
    ensure_topics(settings)
    with WorkerProcess(settings, log=log):
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events[ds.ts[p.events] > only_after], progress=False)
        assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}


def _state(settings, users: list[str], ckpt: Checkpoint) -> dict[str, tuple]:
    r, keys = redis.Redis.from_url(settings.redis_url), Keys(settings.prefix)
    code_bytes, size = ckpt.codebook.cfg.bytes_per_item, ckpt.model.coarse.state_size
    reader = InterestReader(settings.redis_url, settings.prefix)
    out = {}
    for u in users:
        s, v = r.hgetall(keys.user_state(u)), r.hgetall(keys.user_vectors(u))
        rec = decode(r.get(keys.user_history(u)), code_bytes)
        # Within one timestamp the order of appends depends on how the scenario topics interleave:
        # the records are compared in (time, scenario) order, the order the refiner reads them in.
        rec = rec[np.lexsort((rec["scenario"], rec["ts"]))]
        vecs = reader.interests(u).vectors
        out[u] = (int(s[b"seq"]), rec.tobytes(), decode_coarse(r.get(keys.user_coarse(u)), size), vecs, int(v[b"seq"]))
    return out


def test_backfill_then_stream_equals_streaming_everything(pipeline_settings, tmp_path):
    items, every, half, cut = _write_files(tmp_path)
    ckpt = Checkpoint.load(pipeline_settings.checkpoint)
    full = load_files(every, items, Rejects())
    expected = expected_seq(full, np.arange(len(full.ts)))
    base = pipeline_settings.prefix
    runs = {}
    as_parquet = tmp_path / "first-half.parquet"  # the columnar reader's path
    pq.write_table(pa.Table.from_pylist([orjson.loads(x) for x in half.read_bytes().splitlines()]), as_parquet)
    r = redis.Redis.from_url(pipeline_settings.redis_url)
    for name in ("stream", "overlap", "rest"):
        settings = replace(pipeline_settings, prefix=f"{base}{name}", app_id=f"{base}{name}-app")
        if name != "stream":
            source = str(as_parquet if name == "overlap" else half)
            # rest: the first run stops before refining (as a crash between the two would); the next run
            # finds every event applied and must still refine those users.
            report = run_backfill(settings, [source], [str(items)], progress=False, refine=name == "overlap")
            assert report.events_applied == int((full.ts <= cut).sum()) and report.rejected == 0
            again = run_backfill(settings, [source], None, progress=False, buckets=3)  # another run: all dup
            assert again.events_applied == 0 and again.duplicates == report.events_applied
            keys = Keys(settings.prefix)
            for u in {str(full.user_ids[x]) for x in full.user[full.ts <= cut]}:
                assert r.hget(keys.user_vectors(u), "seq") == r.hget(keys.user_state(u), "seq"), f"{name} {u}"
        # overlap: the stream replays every event, the backfilled half included; rest: only the later half.
        _stream(settings, every, items, tmp_path / f"{name}.log", expected, cut if name == "rest" else 0.0)
        runs[name] = _state(settings, list(expected), ckpt)
    for name in ("overlap", "rest"):
        for user, (seq, hist, coarse, vecs, vseq) in runs["stream"].items():
            got = runs[name][user]
            assert got[0] == seq == expected[user] and got[4] == vseq == seq, f"{name} {user}: seq"
            assert got[1] == hist, f"{name} {user}: history records differ"
            np.testing.assert_allclose(ckpt.model.coarse.read(got[2]), ckpt.model.coarse.read(coarse), atol=TOL)
            assert set(got[3]) == set(vecs)
            for s in vecs:
                np.testing.assert_allclose(got[3][s], vecs[s], atol=TOL, rtol=2.0**-10)  # float16: one step


def _fold_all(ds, mask: np.ndarray, tau_s: float) -> dict[str, tuple[float, float]]:
    """Each item's (decayed count, newest time) over the chosen events: the reference ``state.trend.fold``."""
    out: dict[str, tuple[float, float]] = {}
    for j in np.unique(ds.item[mask]).tolist():
        times = np.sort(ds.ts[mask & (ds.item == j)])
        count, last, _, _ = trend.fold(0.0, None, -1, enumerate(times.tolist()), tau_s)
        out[str(ds.item_ids[j])] = (count, last)
    return out


def test_backfill_counts_the_item_trend_once(pipeline_settings, tmp_path):
    """A trend + item-ID model: the backfill counts each backfilled event once in its item's trend (a second
    run adds nothing), stores each item's retrieval vector as the item agent does, and the stream that
    takes over counts only the later events: the counts end equal to counting every event once."""
    items, every, half, cut = _write_files(tmp_path)
    cfg = TrainConfig(dataset="sim", steps=5, trend=True, id_embeddings=True, sampler="global")
    ckpt = run_train(cfg, tmp_path / "trend-ckpt", progress=False)
    settings = replace(pipeline_settings, checkpoint=str(tmp_path / "trend-ckpt"))
    tau = ckpt.model.trend_tau_s
    full = load_files(every, items, Rejects())
    store = interest_reader(settings)

    def counts(want: dict[str, tuple[float, float]]) -> None:
        c, t = store.item_trend(list(want))
        for (item, (count, last)), got_c, got_t in zip(want.items(), c, t, strict=True):
            assert got_t == last and got_c == pytest.approx(count, rel=1e-9), item

    report = run_backfill(settings, [str(half)], [str(items)], progress=False)
    assert report.events_applied == int((full.ts <= cut).sum())
    counts(_fold_all(full, full.ts <= cut, tau))
    again = run_backfill(settings, [str(half)], None, progress=False, buckets=3)
    assert again.events_applied == 0
    counts(_fold_all(full, full.ts <= cut, tau))
    ids, ret = store.item_vectors()
    vectors = {str(full.item_ids[j]): full.item_vectors[j] for j in range(full.n_items)}
    want = ckpt.model.stored_retrieval(np.stack([vectors[i] for i in ids]), ckpt.item_rows(ids))
    np.testing.assert_allclose(ret, want, atol=1e-6)  # content + item-ID embedding, as the item agent stores
    expected = expected_seq(full, np.arange(len(full.ts)))
    _stream(settings, every, items, tmp_path / "trend.log", expected)  # replays every event: the half again
    counts(_fold_all(full, np.ones(len(full.ts), bool), tau))


def test_cli_on_the_example_files(pipeline_settings, tmp_path):
    """train → evaluate → backfill → replay on examples/ (the README's commands), through the CLI."""
    s = pipeline_settings
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "KAFKA_BOOTSTRAP_SERVERS": s.bootstrap_servers,
        "REDIS_URL": s.redis_url,
        "MIRSTREAM_PREFIX": s.prefix,
    }
    files = ["--events", str(ROOT / "examples/events.jsonl"), "--items", str(ROOT / "examples/items.jsonl")]
    ckpt = tmp_path / "ckpt"

    def cli(*args: str) -> str:
        out = subprocess.run([sys.executable, "-m", "streams.cli", *args], env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout

    cli("train", *files, "--steps", "10", "--out", str(ckpt), "-q")
    assert "| full | all |" in cli("evaluate", str(ckpt), *files, "--variants", "k1")
    rejects = tmp_path / "rejects.jsonl"
    done = cli("backfill", *files, "--checkpoint", str(ckpt), "--until", "1700600000", "--rejects", str(rejects))
    assert "0 rejected rows" in done and "after the cut" in done
    sent = cli("replay", "--events", str(ROOT / "examples/events.jsonl"), "--no-items", "--speedup", "1e9")
    assert "sent 2126 events of 40 users" in sent
    assert orjson.loads(cli("lookup", "u27"))["seq"] > 0
