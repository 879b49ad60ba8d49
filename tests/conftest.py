"""Session fixtures that hand tests a real Kafka broker and a real Redis server.

Where they come from, first match wins:
1. ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` in the environment (an existing broker/Redis);
2. testcontainers, when a Docker engine answers (KRaft Kafka and Redis, pinned images);
3. the project's own local stack (``deploy/stack.py``) on test ports, stopped and wiped afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STACK = [sys.executable, str(ROOT / "deploy" / "stack.py")]
TEST_PORTS = [
    "--kafka-port",
    os.environ.get("MIRSTREAM_TEST_KAFKA_PORT", "19092"),
    "--redis-port",
    os.environ.get("MIRSTREAM_TEST_REDIS_PORT", "16379"),
]
KAFKA_IMAGE = "confluentinc/cp-kafka:7.7.1"
REDIS_IMAGE = "redis:7.4.1"


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=3).ping()
        return True
    except Exception:
        return False


_SERVICES_USED: list[str] = []


def pytest_terminal_summary(terminalreporter) -> None:
    """Says which real services the integration tests ran against (or that none were needed)."""
    for used in _SERVICES_USED or ["none (no integration test ran)"]:
        terminalreporter.write_sep("-", f"services: {used}")


def _stack_up(args: list[str], what: str) -> dict[str, str]:
    """``deploy/stack.py up`` with ``args``; the ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` it prints."""
    out = subprocess.run([*STACK, "up", *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"could not start {what}:\n{out.stderr}")
    return dict(
        line.split("=", 1) for line in out.stdout.splitlines() if line.startswith(("KAFKA_", "REDIS_", "MIRSTREAM_"))
    )


class _Services:
    """Resolves both services once per session and tears down whatever it started."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self.kafka: str | None = os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
        self.redis: str | None = os.environ.get("REDIS_URL")
        self.origin = "environment"
        self.local: set[str] = set()  # services this session started with deploy/stack.py
        if self.kafka and self.redis:
            return
        if _docker_answers():
            self._from_testcontainers()
        else:
            self._from_local_stack()

    def _from_testcontainers(self) -> None:
        from testcontainers.kafka import KafkaContainer
        from testcontainers.redis import RedisContainer

        self.origin = "testcontainers"
        if not self.kafka:
            kafka = self._stack.enter_context(KafkaContainer(KAFKA_IMAGE).with_kraft())
            self.kafka = kafka.get_bootstrap_server()
        if not self.redis:
            redis = self._stack.enter_context(RedisContainer(REDIS_IMAGE))
            self.redis = f"redis://{redis.get_container_host_ip()}:{redis.get_exposed_port(6379)}/0"

    def _from_local_stack(self) -> None:
        self.origin = "local stack (deploy/stack.py)"
        env = _stack_up(TEST_PORTS, "the local stack")
        self._stack.callback(subprocess.run, [*STACK, "down", "--wipe", *TEST_PORTS], check=False)
        self.local = {name for name, given in (("kafka", self.kafka), ("redis", self.redis)) if not given}
        self.kafka = self.kafka or env["KAFKA_BOOTSTRAP_SERVERS"]
        self.redis = self.redis or env["REDIS_URL"]

    def stop(self, service: str) -> None:
        """Stops one service (fault tests); only one this session started itself."""
        if service not in self.local:
            pytest.skip(f"{service} was not started by this test session, so it is not ours to stop")
        subprocess.run([*STACK, "down", "--only", service, *TEST_PORTS], check=True, capture_output=True)

    def start(self, service: str) -> None:
        out = subprocess.run([*STACK, "up", "--only", service, *TEST_PORTS], capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"could not restart {service}:\n{out.stderr}")

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="session")
def services() -> Iterator[_Services]:
    svc = _Services()
    _SERVICES_USED.append(f"kafka={svc.kafka} redis={svc.redis} via {svc.origin}")
    try:
        yield svc
    finally:
        svc.close()


CLUSTER_ARGS = [
    "--kafka-port",
    os.environ.get("MIRSTREAM_TEST_CLUSTER_KAFKA_PORT", "29092"),
    "--brokers",
    "3",
    "--redis-port",
    os.environ.get("MIRSTREAM_TEST_CLUSTER_REDIS_PORT", "26379"),
    "--redis-cluster",
    "3",
]


class _Cluster:
    """A 3-node KRaft Kafka and a 3-master Redis Cluster, real processes on loopback (deploy/stack.py)."""

    def __init__(self) -> None:
        try:
            env = _stack_up(CLUSTER_ARGS, "the 3-broker / Redis Cluster stack")
        except RuntimeError:
            subprocess.run([*STACK, "down", "--wipe", *CLUSTER_ARGS], capture_output=True)
            raise
        self.kafka, self.redis = env["KAFKA_BOOTSTRAP_SERVERS"], env["REDIS_URL"]

    def stop_broker(self, node: int) -> None:
        subprocess.run([*STACK, "down", "--only", "kafka", "--node", str(node), *CLUSTER_ARGS], check=True)

    def start_broker(self, node: int) -> None:
        out = subprocess.run([*STACK, "up", "--only", "kafka", "--node", str(node), *CLUSTER_ARGS], text=True)
        if out.returncode != 0:
            raise RuntimeError(f"could not restart broker {node}")

    def close(self) -> None:
        subprocess.run([*STACK, "down", "--wipe", *CLUSTER_ARGS], check=False, capture_output=True)


@pytest.fixture(scope="session")
def cluster() -> Iterator[_Cluster]:
    c = _Cluster()
    _SERVICES_USED.append(f"cluster: kafka={c.kafka} redis={c.redis} via local stack (3 brokers, 3 masters)")
    try:
        yield c
    finally:
        c.close()


def _secure_ports() -> list[str]:
    """A stack of its own, next to the plain test stack: Kafka +10 (its SASL_SSL listener +12), Redis +10."""
    kafka = int(os.environ.get("MIRSTREAM_TEST_KAFKA_PORT", "19092")) + 10
    redis = int(os.environ.get("MIRSTREAM_TEST_REDIS_PORT", "16379")) + 10
    kafka = int(os.environ.get("MIRSTREAM_TEST_SECURE_KAFKA_PORT", kafka))
    redis = int(os.environ.get("MIRSTREAM_TEST_SECURE_REDIS_PORT", redis))
    return ["--kafka-port", str(kafka), "--kafka-sasl-port", str(kafka + 2), "--redis-port", str(redis)]


class _Secure:
    """Kafka with a SASL_SSL listener (PLAIN, SCRAM-SHA-256/512) and a TLS-only Redis with requirepass, on
    self-signed certificates made for this session in a temporary folder (deploy/stack.py)."""

    def __init__(self, tls_dir: Path, args: list[str] | None = None) -> None:
        self.password = f"pw-{uuid.uuid4().hex[:12]}"
        self.tls_dir = tls_dir
        self.args = [*(args or _secure_ports()), "--redis-tls", "--tls-dir", str(tls_dir)]
        os.environ["MIRSTREAM_STACK_PASSWORD"] = self.password  # read by the stack subprocess
        try:
            self.env = _stack_up(self.args, "the SASL_SSL Kafka / TLS Redis stack")
        except RuntimeError:
            subprocess.run([*STACK, "down", "--wipe", *self.args], capture_output=True)
            raise
        finally:
            del os.environ["MIRSTREAM_STACK_PASSWORD"]

    def settings(self, base):
        """``base`` pointed at the secured services, with every security setting the stack printed."""
        from streams.settings import Settings

        env = {k: v for k, v in self.env.items() if k.startswith("MIRSTREAM_")}
        secured = Settings.from_env(env)
        names = [n for n in vars(secured) if n.startswith(("kafka_", "redis_"))]
        return base.with_(
            bootstrap_servers=self.env["KAFKA_BOOTSTRAP_SERVERS"],
            redis_url=self.env["REDIS_URL"],
            **{n: getattr(secured, n) for n in names if n != "redis_url"},
        )

    def close(self) -> None:
        subprocess.run([*STACK, "down", "--wipe", *self.args], check=False, capture_output=True)


@pytest.fixture(scope="session")
def secure(tmp_path_factory) -> Iterator[_Secure]:
    s = _Secure(tmp_path_factory.mktemp("tls"))
    _SERVICES_USED.append(f"secure: kafka={s.env['KAFKA_BOOTSTRAP_SERVERS']} (SASL_SSL) redis=rediss via local stack")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture(scope="session")
def secure_cluster_url(secure) -> Iterator[str]:
    """A Redis Cluster of 3 masters over TLS only (client and cluster bus) with requirepass/masterauth, on
    the certificates of ``secure``; its ``rediss+cluster://`` URL (the password in it)."""
    port = int(os.environ.get("MIRSTREAM_TEST_CLUSTER_REDIS_PORT", "26379")) + 10
    c = _Secure(secure.tls_dir, ["--only", "redis", "--redis-port", str(port), "--redis-cluster", "3"])
    _SERVICES_USED.append(f"secure: Redis Cluster over TLS on 127.0.0.1:{port}+ via local stack")
    try:
        yield c.env["REDIS_URL"]
    finally:
        c.close()


@pytest.fixture(scope="session")
def kafka_bootstrap(services: _Services) -> str:
    assert services.kafka
    return services.kafka


@pytest.fixture(scope="session")
def redis_url(services: _Services) -> str:
    assert services.redis
    return services.redis


@pytest.fixture
def prefix() -> str:
    """A fresh topic/key prefix per test, so tests never see each other's data."""
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def sim_checkpoint(tmp_path_factory) -> Path:
    """A small model trained on the simulator (three scenarios, given item vectors): about 20 s on 2 cores."""
    from models.train import TrainConfig, run_train

    out = tmp_path_factory.mktemp("ckpt") / "sim"
    run_train(TrainConfig(dataset="sim", steps=40, codewords=64), out, progress=False)
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pipeline_settings(kafka_bootstrap, redis_url, prefix, tmp_path, sim_checkpoint):
    return _pipeline_settings(kafka_bootstrap, redis_url, prefix, tmp_path, sim_checkpoint)


@pytest.fixture
def secure_settings(secure, prefix, tmp_path, sim_checkpoint):
    """``pipeline_settings`` against the SASL_SSL Kafka listener and the TLS + password Redis."""
    return secure.settings(_pipeline_settings("unused:1", "redis://unused", prefix, tmp_path, sim_checkpoint))


def _pipeline_settings(kafka_bootstrap, redis_url, prefix, tmp_path, sim_checkpoint):
    from streams.settings import Settings

    return Settings(
        bootstrap_servers=kafka_bootstrap,
        redis_url=redis_url,
        prefix=prefix,
        app_id=f"{prefix}-app",
        datadir=str(tmp_path / "faust"),
        web_port=free_port(),
        checkpoint=str(sim_checkpoint),
        partitions=3,
        refine_wait_ms=50,
        refine_debounce_ms=0,
        batch_wait_ms=20,
        park_timeout_s=5.0,
    )
