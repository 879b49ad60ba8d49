"""The pipeline through a SASL_SSL Kafka listener and a TLS + password Redis (real processes, self-signed
certificates), and what a worker does with credentials or certificates that are refused: one line, exit 70."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from pipeline_checks import assert_matches_offline, lagging, replay

from models.data import load
from streams.replay import send_events, wait_for_vectors
from streams.retry import EXIT_FATAL
from streams.security import redis_sync
from streams.workerproc import WorkerProcess, settings_env

pytestmark = pytest.mark.integration
USERS = 6  # ~650 events over three scenarios


@pytest.fixture(scope="module")
def ds():
    return load("sim")


def test_pipeline_through_sasl_ssl_kafka_and_tls_redis(secure_settings, ds, tmp_path):
    settings = secure_settings
    assert settings.kafka_security_protocol == "SASL_SSL" and settings.redis_url.startswith("rediss://:")
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        expected = replay(settings, ds, USERS)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
        assert lagging(settings) == {}  # the worker's consumer group committed through SASL_SSL too
        log = w.log_text()
    assert_matches_offline(settings, ds, expected, scenarios=("feed", "search", "ads"))
    assert "SASL_SSL, SCRAM-SHA-256 as mirstream" in log
    assert settings.kafka_sasl_password not in log and "Traceback" not in log


def test_pipeline_through_a_tls_redis_cluster_with_a_password(secure_settings, secure_cluster_url, ds, tmp_path):
    settings = secure_settings.with_(redis_url=secure_cluster_url)
    assert settings.redis_url.startswith("rediss+cluster://:")
    with WorkerProcess(settings, log=tmp_path / "worker.log") as w:
        expected = replay(settings, ds, USERS)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
        log = w.log_text()
    assert_matches_offline(settings, ds, expected)
    assert len(redis_sync(settings).get_nodes()) == 3 and "Traceback" not in log


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-512"])
def test_other_sasl_mechanisms_reach_the_worker(secure_settings, ds, tmp_path, mechanism):
    settings = secure_settings.with_(kafka_sasl_mechanism=mechanism)
    with WorkerProcess(settings, log=tmp_path / "worker.log"):
        expected = replay(settings, ds, 1)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}


def _worker_refused(settings, tmp_path) -> tuple[int, str]:
    """Starts ``mirstream worker`` with these settings; its exit code and stderr (the timeout only guards a
    worker that would retry forever)."""
    env = {**settings_env(settings), "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "streams.cli", "worker"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )
    return out.returncode, out.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kafka_sasl_password": "wrong-password"}, "Kafka authentication failed for user 'mirstream' (SCRAM-SHA-256)"),
        ({"kafka_sasl_username": "nobody"}, "Kafka authentication failed for user 'nobody'"),
        ({"kafka_sasl_mechanism": "PLAIN", "kafka_sasl_password": "wrong-password"}, "(PLAIN): Authentication failed"),
        ({"kafka_ssl_ca_file": ""}, "TLS certificate not trusted"),
        ({"redis_url": "WRONG"}, "Redis authentication failed"),
        ({"redis_ca_file": ""}, "TLS certificate not trusted"),
    ],
)
def test_refused_credentials_stop_the_worker_with_one_line(secure_settings, tmp_path, change, message):
    if change.get("redis_url") == "WRONG":
        change = {"redis_url": "rediss://:wrong-password@" + secure_settings.redis_url.rsplit("@", 1)[1]}
    code, stderr = _worker_refused(secure_settings.with_(**change), tmp_path)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code == EXIT_FATAL, stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], stderr[-2000:]
    assert lines[0].startswith("mirstream worker: ")
    assert secure_settings.kafka_sasl_password not in stderr and "wrong-password" not in stderr


def test_redis_password_rotated_under_a_running_worker(secure_settings, ds, tmp_path):
    """The password changes while the worker runs: its next Redis connection is refused, and it stops with
    one CRITICAL line and exit 70 instead of retrying (or logging a traceback per refinement tick)."""
    settings = secure_settings
    old = settings.redis_url.split("@")[0].rsplit(":", 1)[1]
    admin = redis_sync(settings)
    worker = WorkerProcess(settings, log=tmp_path / "worker.log").start()
    try:
        expected = replay(settings, ds, 1)
        assert wait_for_vectors(settings, expected, timeout=120, progress=False) == {}
        admin.config_set("requirepass", "rotated-password")
        admin.client_kill_filter(_type="normal", skipme=True)  # every connection re-authenticates
        send_events(settings, ds, np.arange(3), progress=False)
        assert worker.proc.wait(timeout=120) == EXIT_FATAL
    finally:
        worker.kill()
        admin.config_set("requirepass", old)  # this connection stays authenticated: the stack is ours again
    log = worker.log_text()
    critical = [line for line in log.splitlines() if "CRITICAL" in line or "Redis authentication failed" in line]
    assert len(critical) == 1 and "Redis authentication failed" in critical[0], log[-3000:]
    assert "Traceback" not in log, log[-3000:]
