"""Scale-out on real engines: a 3-master Redis Cluster, a 3-broker KRaft Kafka losing a broker, two
workers of one consumer group across a rebalance and a SIGKILL, and model roll-outs (same codebook, and
a new codebook + coarse model).  Each ends with the state the models compute offline for every user:
no event lost, none applied twice, no refinement lost."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest
from conftest import free_port
from pipeline_checks import (
    COARSE_TOL,
    STORED_RTOL,
    VECTOR_TOL,
    assert_matches_offline,
    behind_report,
    item_records,
    offline,
    replay,
    retrained,
)

from models.data import load
from models.user_model import Checkpoint
from state.history import MINUTE, decode, minutes, record_dtype
from state.keys import Keys
from state.store import InterestReader, connect_sync
from state.users import decode_coarse
from streams.replay import ReplayPlan, expected_seq, plan, send_events, send_items, wait_for_vectors
from streams.topics import ensure_topics
from streams.workerproc import WorkerProcess

pytestmark = pytest.mark.integration
USERS = 8  # ~900 events over three scenarios


@pytest.fixture(scope="module")
def ds():
    return load("sim")


@pytest.fixture
def cluster_settings(pipeline_settings, cluster):
    return pipeline_settings.with_(bootstrap_servers=cluster.kafka, redis_url=cluster.redis, replication=3)


def test_pipeline_on_redis_cluster(cluster_settings, ds, tmp_path):
    settings = cluster_settings
    assert settings.redis_url.startswith("redis+cluster://")
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        expected = replay(settings, ds, USERS)
        assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}
    assert_matches_offline(settings, ds, expected, scenarios=("feed", "search", "ads"))
    r, keys = connect_sync(settings.redis_url), Keys(settings.prefix)
    for user in expected:  # every key of one user in one slot: each Lua step is atomic on one node
        own = {r.keyslot(k) for k in (keys.user_state(user), keys.user_history(user), keys.user_vectors(user))}
        assert len(own) == 1
    nodes = {r.get_node_from_key(keys.user_state(u)).port for u in expected}
    assert len(nodes) > 1, f"users should spread over the masters, all went to {nodes}"


def test_broker_loss_with_replication_3(cluster_settings, cluster, ds, tmp_path):
    # Leaders move when the broker goes: items can be late, so parked events wait longer than these tests' usual 5 s.
    settings = cluster_settings.with_(park_timeout_s=120.0)
    p = plan(ds, max_users=USERS)
    ensure_topics(settings)
    expected = expected_seq(ds, p.events)
    half = len(p.events) // 2
    with WorkerProcess(settings, log=tmp_path / "worker.log") as worker:
        send_items(settings, ds, p.items, progress=False)
        send_events(settings, ds, p.events[:half], progress=False)
        cluster.stop_broker(2)  # replicas on the other two keep every partition writable (min ISR 2)
        try:
            send_events(settings, ds, p.events[half:], progress=False)
            assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}
            assert worker.proc is not None and worker.proc.poll() is None
        finally:
            cluster.start_broker(2)
    assert_matches_offline(settings, ds, expected)


def test_two_workers_rebalance_then_one_killed(pipeline_settings, ds, tmp_path):
    settings = pipeline_settings.with_(partitions=4, park_timeout_s=120.0)
    p = plan(ds, max_users=USERS)
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    sender = threading.Thread(
        target=send_events, args=(settings, ds, p.events), kwargs={"rate": 60, "progress": False}
    )  # ~15 s of events: B joins and A dies while they flow
    a = WorkerProcess(settings, log=tmp_path / "a.log").start()
    sender.start()
    time.sleep(2)
    b_settings = settings.with_(web_port=free_port(), datadir=str(tmp_path / "faust-b"))
    b = WorkerProcess(b_settings, log=tmp_path / "b.log").start()  # joins: the group rebalances
    time.sleep(4)
    a.kill()  # B takes A's partitions after the session timeout
    sender.join()
    expected = expected_seq(ds, p.events)
    try:
        behind = wait_for_vectors(settings, expected, timeout=180, progress=False)
        report = behind_report(settings, behind, b_settings.web_port) if behind else ""
        b_log = b.log_text()
    finally:
        b.stop()
    assert behind == {}, report
    assert_matches_offline(settings, ds, expected)
    assert "Traceback" not in b_log


def _hand_over(settings, new_checkpoint: str, ds, tmp_path, timeout: float) -> tuple[ReplayPlan, int, str]:
    """A worker of the settings' checkpoint applies the first half of the stream; a worker of
    ``new_checkpoint`` joins, the old one leaves (its partitions move), and the second half flows to the new
    one until every user's vectors are fresh.  Returns the plan, where the halves split, the new worker's log."""
    p = plan(ds, max_users=USERS)
    half = len(p.events) // 2
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    a = WorkerProcess(settings, log=tmp_path / "old.log").start()
    send_events(settings, ds, p.events[:half], progress=False)
    assert wait_for_vectors(settings, expected_seq(ds, p.events[:half]), timeout=120, progress=False) == {}
    b_settings = settings.with_(checkpoint=new_checkpoint, web_port=free_port(), datadir=str(tmp_path / "faust-new"))
    b = WorkerProcess(b_settings, log=tmp_path / "new.log").start()
    try:
        a.stop()  # the old version leaves; its partitions move to the new one
        send_events(settings, ds, p.events[half:], progress=False)
        assert wait_for_vectors(settings, expected_seq(ds, p.events), timeout=timeout, progress=False) == {}
        return p, half, b.log_text()
    finally:
        b.stop()
        a.stop()


def test_model_rollout_worker_by_worker(pipeline_settings, ds, tmp_path):
    """A worker with a new checkpoint joins, the old one leaves, the stream never stops; readers get the
    latest vectors by default and can still pin the old version."""
    settings = pipeline_settings
    old = Checkpoint.load(settings.checkpoint).version
    new_dir = tmp_path / "checkpoint-new"
    shutil.copytree(settings.checkpoint, new_dir)  # same weights, so the offline check still holds
    (new_dir / "VERSION").write_text("rollout-2\n")
    p, half, _ = _hand_over(settings, str(new_dir), ds, tmp_path, timeout=120)
    expected = expected_seq(ds, p.events)
    reader = InterestReader(settings.redis_url, settings.prefix)
    early = expected_seq(ds, p.events[:half])
    late = {str(ds.user_ids[u]) for u in ds.user[p.events[half:]]}
    for user in expected:
        latest, pinned = reader.interests(user), reader.interests(user, version=old)
        if user in early:  # refined by the old version before it left
            assert pinned is not None and pinned.version == old and early[user] <= pinned.seq <= latest.seq
        if user in late:
            assert latest.version == "rollout-2" and latest.seq == expected[user]
            assert reader.interests(user, version="rollout-2").seq == expected[user]
    assert_matches_offline(settings, ds, expected)


def test_codebook_switch_rollout(pipeline_settings, ds, tmp_path):
    """A checkpoint with a new codebook and coarse model takes over mid-stream: items get codes of the new
    codebook (on first use and by the background pass), each user the new version meets has its history
    re-encoded and coarse state rebuilt in one atomic step, and users it never meets stay decodable with
    the old codebook.  Every figure is checked against the models run offline."""
    settings = pipeline_settings.with_(park_timeout_s=120.0)
    old = Checkpoint.load(settings.checkpoint)
    new = retrained(settings.checkpoint, tmp_path / "checkpoint-cb2", "cb-2")
    assert new.codebook_id != old.codebook_id and new.state_id != old.state_id
    p, half, b_log = _hand_over(settings, str(tmp_path / "checkpoint-cb2"), ds, tmp_path, timeout=180)
    early = expected_seq(ds, p.events[:half])
    expected = expected_seq(ds, p.events)
    assert "rebuilt user" in b_log and "Traceback" not in b_log

    r, keys = connect_sync(settings.redis_url), Keys(settings.prefix)
    reader = InterestReader(settings.redis_url, settings.prefix)
    late = {str(ds.user_ids[u]) for u in ds.user[p.events[half:]]}
    for user, n in expected.items():
        state = r.hgetall(keys.user_state(user))
        history = r.get(keys.user_history(user))
        u = int(np.flatnonzero(ds.user_ids.astype(str) == user)[0])
        sl = ds.user_slice(u)
        if user not in late:  # never met by the new version: still the old codebook's, and decodable
            assert state[b"cb"].decode() == old.codebook_id and state[b"gen"].decode() == old.state_id
            assert len(decode(history, old.codebook.cfg.bytes_per_item)) == n
            continue
        assert int(state[b"seq"]) == n
        assert state[b"cb"].decode() == new.codebook_id and state[b"gen"].decode() == new.state_id
        # The history: every event's item in the new codebook, as re-encoded from the old one's codes.
        want = np.empty(n, dtype=record_dtype(new.codebook.cfg.bytes_per_item))
        codes = item_records(new, new.item_vectors[ds.item[sl]], stored_by=old)
        want["code"] = np.frombuffer(codes, np.uint8).reshape(n, -1)
        want["scenario"], want["action"], want["ts"] = ds.scenario[sl], ds.action[sl], minutes(ds.ts[sl]) * MINUTE
        got = decode(history, new.codebook.cfg.bytes_per_item)
        assert sorted(x.tobytes() for x in got) == sorted(x.tobytes() for x in want)
        # The coarse state and the vectors: the new models over that history, as if it had always run.
        coarse_off, vectors_off = offline(new, ds, user, settings.history_cap, stored_by=old)
        coarse = new.model.coarse.read(decode_coarse(r.get(keys.user_coarse(user)), new.model.coarse.state_size))
        np.testing.assert_allclose(coarse, coarse_off, atol=COARSE_TOL)
        latest = reader.interests(user)
        assert latest.version == "cb-2" and latest.seq == n
        for i, scenario in enumerate(ds.scenarios):
            np.testing.assert_allclose(latest.vectors[scenario], vectors_off[i], atol=VECTOR_TOL, rtol=STORED_RTOL)
    assert late & set(early), "some users should be met by both versions (their state is rebuilt)"
    # The background pass gave every item a code of the new codebook, next to the old one.
    for item in r.smembers(keys.items):
        fields = r.hkeys(keys.item(item.decode()))
        assert {Keys.item_code(old.codebook_id).encode(), Keys.item_code(new.codebook_id).encode()} <= set(fields)
    assert r.exists(keys.codebook_recoded(new.codebook_id))


def _applied(settings, users: list[str]) -> int:
    return sum(s or 0 for s in InterestReader(settings.redis_url, settings.prefix).seqs(users, applied=True))


def test_codebook_switch_with_overlapping_workers(pipeline_settings, ds, tmp_path):
    """A worker of a new codebook joins while the old one is busy with a running stream (a rebalance in
    the middle of batches, both workers writing), then the old one leaves mid-stream.  Whatever order the
    two wrote in, every user ends with each event applied once and a history that decodes whole with the
    codebook its state names."""
    settings = pipeline_settings.with_(park_timeout_s=120.0)
    old = Checkpoint.load(settings.checkpoint)
    new = retrained(settings.checkpoint, tmp_path / "checkpoint-cb2", "cb-2")
    books = {old.codebook_id: old.codebook, new.codebook_id: new.codebook}
    states = {(old.codebook_id, old.state_id), (new.codebook_id, new.state_id)}
    p = plan(ds, max_users=USERS)
    users = sorted(expected_seq(ds, p.events))
    first, rest = np.split(p.events, [len(p.events) // 3])
    # Every user's first event goes out before the new worker starts (each user's events stay in order), so
    # every user has a state of the old codebook: those with events after the old worker left are rebuilt
    # by the new one whichever worker the timing gave the events in between.
    opening = np.unique(ds.user[rest], return_index=True)[1]
    opening = opening[~np.isin(ds.user[rest[opening]], ds.user[first])]
    first, rest = np.concatenate([first, rest[opening]]), np.delete(rest, opening)
    middle, last = np.split(rest, [5 * len(p.events) // 6 - len(first)])
    ensure_topics(settings)
    send_items(settings, ds, p.items, progress=False)
    a = WorkerProcess(settings, log=tmp_path / "old.log").start()
    b_settings = settings.with_(
        checkpoint=str(tmp_path / "checkpoint-cb2"), web_port=free_port(), datadir=str(tmp_path / "fb")
    )
    b = WorkerProcess(b_settings, log=tmp_path / "new.log")
    try:
        send_events(settings, ds, first, progress=False)
        assert wait_for_vectors(settings, expected_seq(ds, first), timeout=120, progress=False) == {}
        # The middle third flows for 40 s: the new worker starts, joins and takes partitions while it does.
        rate = len(middle) / 40
        sender = threading.Thread(
            target=send_events, args=(settings, ds, middle), kwargs={"rate": rate, "progress": False}
        )
        sender.start()
        b.start()  # joins mid-stream: both workers run through the rebalance
        joined_at = _applied(settings, users)
        r, keys = connect_sync(settings.redis_url), Keys(settings.prefix)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(
            r.hget(keys.user_state(u), "gen") == new.state_id.encode() for u in users
        ):
            time.sleep(0.05)  # until the new worker has written a user while the old one still runs
        a.stop()  # leaves mid-stream
        left_at = _applied(settings, users)
        sender.join()
        send_events(settings, ds, last, progress=False)
        expected = expected_seq(ds, p.events)
        assert wait_for_vectors(settings, expected, timeout=180, progress=False) == {}
        logs = a.log_text() + b.log_text()
    finally:
        b.stop()
        a.stop()
    assert len(first) < joined_at <= left_at < len(p.events) - len(last), (joined_at, left_at)
    assert "Traceback" not in logs and "rebuilt user" in logs
    reader = InterestReader(settings.redis_url, settings.prefix)
    for user, n in expected.items():
        state = r.hgetall(keys.user_state(user))
        assert int(state[b"seq"]) == n, f"user {user}: {int(state[b'seq'])} applied of {n}"
        assert (state[b"cb"].decode(), state[b"gen"].decode()) in states
        rec = decode(r.get(keys.user_history(user)), books[state[b"cb"].decode()].cfg.bytes_per_item)
        sl = ds.user_slice(int(np.flatnonzero(ds.user_ids.astype(str) == user)[0]))
        assert sorted(zip(rec["ts"], rec["scenario"], strict=True)) == sorted(
            zip(minutes(ds.ts[sl]) * MINUTE, ds.scenario[sl], strict=True)
        )
        assert reader.interests(user).seq == n
