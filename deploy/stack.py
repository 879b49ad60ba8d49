#!/usr/bin/env python3
"""Start, stop and inspect a local Kafka (KRaft) + Redis stack without Docker.

Standard library only, so it runs before the project's virtualenv exists.  Kafka comes from its
Maven Central jars (deploy/kafka/pom.xml), Redis from Debian's ``redis-server`` package.  Every
file it writes (jars, data, logs, pid files) lives under ``$MIRSTREAM_HOME`` (default
``~/.cache/mirstream``), never in the repository.

    python3 deploy/stack.py up       # idempotent: reuses jars, data and running processes
    python3 deploy/stack.py status
    python3 deploy/stack.py down [--wipe]
    python3 deploy/stack.py down --only redis && python3 deploy/stack.py up --only redis   # restart one

``up`` prints ``KAFKA_BOOTSTRAP_SERVERS=...`` and ``REDIS_URL=...`` lines that a shell can eval.

Secured, opt-in (what a company cluster asks for; certificates self-signed with ``openssl``):

    python3 deploy/stack.py up --kafka-sasl-port 9094 --redis-tls --tls-dir DIR --password PW

adds a SASL_SSL listener to Kafka (PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for one user) and serves Redis
over TLS only, with ``requirepass``; ``up`` then prints the ``MIRSTREAM_KAFKA_*`` / ``MIRSTREAM_REDIS_*``
settings to reach them.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

KAFKA_VERSION = "3.9.2"
SCRAM = ("SCRAM-SHA-256", "SCRAM-SHA-512")
REPO_DEPLOY = Path(__file__).resolve().parent
HOME = Path(os.environ.get("MIRSTREAM_HOME", Path.home() / ".cache" / "mirstream"))
LIBS = HOME / f"kafka-{KAFKA_VERSION}" / "libs"
RUN = HOME / "stack"


class StackError(RuntimeError):
    """A one-line, user-facing reason the stack could not be brought up."""


# --------------------------------------------------------------------------- small helpers


def _port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; read its state to tell.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _read_pid(pidfile: Path) -> int | None:
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _wait(predicate, timeout: float, what: str, logfile: Path | None = None, pid: int | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if pid is not None and not _pid_alive(pid):
            tail = _tail(logfile) if logfile else ""
            raise StackError(f"{what} exited during start-up; last log lines:\n{tail}")
        time.sleep(0.25)
    raise StackError(f"{what} not ready after {timeout:.0f}s" + (f"; see {logfile}" if logfile else ""))


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _spawn(cmd: list[str], logfile: Path, pidfile: Path) -> int:
    logfile.parent.mkdir(parents=True, exist_ok=True)
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
    pidfile.write_text(str(proc.pid))
    return proc.pid


def _stop(pidfile: Path, name: str, timeout: float = 30.0) -> bool:
    pid = _read_pid(pidfile)
    if pid is None:
        pidfile.unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _pid_alive(pid):
        print(f"{name} did not stop in {timeout:.0f}s; killing it", file=sys.stderr)
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)
    pidfile.unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


# --------------------------------------------------------------------------- TLS + credentials


@dataclass(frozen=True)
class Secure:
    """The opt-in security of a stack: certificates in ``tls_dir`` (made when missing), one user and
    password for Kafka SASL and Redis ``requirepass``."""

    tls_dir: Path
    user: str
    password: str

    @property
    def ca(self) -> Path:
        return self.tls_dir / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.tls_dir / "server.pem"

    @property
    def key(self) -> Path:
        return self.tls_dir / "server.key"

    @property
    def keystore(self) -> Path:
        """Key + certificate in one PEM file, the form of Kafka's PEM key store."""
        return self.tls_dir / "server-keystore.pem"


def make_certs(tls_dir: Path) -> None:
    """A self-signed CA and a server certificate for 127.0.0.1 / localhost signed by it (idempotent)."""
    if (tls_dir / "server-keystore.pem").exists():
        return
    if shutil.which("openssl") is None:
        raise StackError("openssl is needed to make the test certificates; install it (apt-get install openssl)")
    tls_dir.mkdir(parents=True, exist_ok=True)
    ext = tls_dir / "server.ext"
    ext.write_text(
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
    )
    ca = "req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650".split()
    ca += ["-subj", "/CN=mirstream local CA", "-addext", "basicConstraints=critical,CA:TRUE"]
    ca += ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    csr = "req -newkey rsa:2048 -nodes -keyout server.key -out server.csr -subj /CN=localhost".split()
    sign = "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out server.pem -days 3650".split()
    steps = [ca, csr, [*sign, "-extfile", "server.ext"]]
    for step in steps:
        out = subprocess.run(["openssl", *step], cwd=tls_dir, capture_output=True, text=True)
        if out.returncode != 0:
            raise StackError(f"openssl {step[0]} failed: {out.stderr.strip()[-300:]}")
    for name in ("ca.key", "server.key"):
        (tls_dir / name).chmod(0o600)
    keystore = tls_dir / "server-keystore.pem"
    keystore.write_text((tls_dir / "server.key").read_text() + (tls_dir / "server.pem").read_text())
    keystore.chmod(0o600)


def _stack_password(create: bool) -> str:
    """The stack's password when none is given: one made once (by ``up``) and kept under the stack dir."""
    path = RUN / "password"
    if not path.exists():
        if not create:
            return ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(base64.urlsafe_b64encode(os.urandom(18)).decode())
        path.chmod(0o600)
    return path.read_text().strip()


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(text)


# --------------------------------------------------------------------------- Kafka


def kafka_metadata_ok(port: int, host: str = "127.0.0.1") -> bool:
    """True when the broker answers a Metadata (v1) request listing at least one broker."""
    client = b"mirstream-stack"
    body = struct.pack(">i", -1)  # v1: null topic array = all topics
    header = struct.pack(">hhih", 3, 1, 7, len(client)) + client
    request = header + body
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(struct.pack(">i", len(request)) + request)
            size = struct.unpack(">i", _recv_exact(s, 4))[0]
            payload = _recv_exact(s, size)
    except (OSError, struct.error):
        return False
    correlation, n_brokers = struct.unpack(">ii", payload[:8])
    return correlation == 7 and n_brokers >= 1


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise OSError("connection closed")
        buf += chunk
    return buf


def ensure_kafka_jars() -> None:
    if (LIBS / f"kafka_2.13-{KAFKA_VERSION}.jar").exists():
        return
    if shutil.which("mvn") is None:
        raise StackError(
            "Maven ('mvn') is needed to fetch the Kafka jars from Maven Central; install it (apt-get install maven)"
        )
    print(f"fetching Apache Kafka {KAFKA_VERSION} jars from Maven Central into {LIBS} ...", file=sys.stderr)
    tmp = LIBS.with_name("libs.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [
        "mvn",
        "-q",
        "-B",
        "-f",
        str(REPO_DEPLOY / "kafka" / "pom.xml"),
        "dependency:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={tmp}",
    ]
    # Maven's output goes to stderr: stdout carries only the eval-able KAFKA_/REDIS_ lines.
    if subprocess.run(cmd, stdout=sys.stderr).returncode != 0:
        raise StackError("mvn could not resolve the Kafka jars (see its output above)")
    shutil.rmtree(LIBS, ignore_errors=True)
    tmp.rename(LIBS)


@dataclass(frozen=True)
class KafkaNode:
    """One KRaft node acting as broker and controller on loopback; ``size`` nodes form one cluster.

    Node n (1-based) of a cluster based at ``base`` listens on base + 2(n-1) and its controller on the
    port after; every node votes in the controller quorum, so losing one of three keeps a majority.
    """

    base: int
    node: int = 1
    size: int = 1
    #: With a port: a SASL_SSL listener there too (node n at sasl_base + n - 1), for ``secure``'s user.
    sasl_base: int = 0
    secure: Secure | None = None

    @property
    def port(self) -> int:
        return self.base + 2 * (self.node - 1)

    @property
    def controller_port(self) -> int:
        return self.port + 1

    @property
    def sasl_port(self) -> int:
        return self.sasl_base + self.node - 1 if self.sasl_base else 0

    @property
    def peers(self) -> list[KafkaNode]:
        return [KafkaNode(self.base, n, self.size, self.sasl_base, self.secure) for n in range(1, self.size + 1)]

    @property
    def dir(self) -> Path:
        return RUN / f"kafka-{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.dir / "kafka.pid"

    @property
    def logfile(self) -> Path:
        return self.dir / "kafka.out"

    def properties(self) -> str:
        voters = ",".join(f"{p.node}@127.0.0.1:{p.controller_port}" for p in self.peers)
        rf = min(3, self.size)
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        if self.sasl_port:
            listeners += f",SECURE://127.0.0.1:{self.sasl_port}"
            advertised += f",SECURE://127.0.0.1:{self.sasl_port}"
            protocols += ",SECURE:SASL_SSL"
        return "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={self.node}",
                f"controller.quorum.voters={voters}",
                f"listeners={listeners}",
                f"advertised.listeners={advertised}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=PLAINTEXT",
                f"listener.security.protocol.map={protocols}",
                *self._secure_properties(),
                f"log.dirs={self.dir / 'data'}",
                "num.partitions=1",
                f"default.replication.factor={rf}",
                f"min.insync.replicas={max(1, rf - 1)}",
                f"offsets.topic.replication.factor={rf}",
                "offsets.topic.num.partitions=8",
                f"transaction.state.log.replication.factor={rf}",
                f"transaction.state.log.min.isr={max(1, rf - 1)}",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=true",
                "message.max.bytes=1048588",
                "log.retention.hours=24",
                "",
            ]
        )

    def _secure_properties(self) -> list[str]:
        """The SASL_SSL listener: TLS from a PEM key store, PLAIN users from the JAAS line, SCRAM users from
        the cluster metadata (``add_scram_user``).  Secrets go in server.properties, which is 0600."""
        if not self.sasl_port or self.secure is None:
            return []
        s, scram = self.secure, "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="{s.user}" password="{s.password}" user_{s.user}="{s.password}";'
        )
        return [
            "listener.name.secure.sasl.enabled.mechanisms=PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
            f"listener.name.secure.plain.sasl.jaas.config={plain}",
            f"listener.name.secure.scram-sha-256.sasl.jaas.config={scram}",
            f"listener.name.secure.scram-sha-512.sasl.jaas.config={scram}",
            "listener.name.secure.ssl.keystore.type=PEM",
            f"listener.name.secure.ssl.keystore.location={s.keystore}",
            "listener.name.secure.ssl.client.auth=none",
        ]

    def scram_format_args(self) -> list[str]:
        """``StorageTool format`` arguments that put the secure user's SCRAM credentials in fresh metadata."""
        if not self.sasl_port or self.secure is None:
            return []
        s = self.secure
        return [a for m in SCRAM for a in ("--add-scram", f"{m}=[name={s.user},password={s.password}]")]

    def add_scram_user(self) -> None:
        """Creates (or resets) the secure user's SCRAM credentials in a running cluster whose metadata was
        formatted without them (one ConfigCommand per mechanism: one request cannot alter both)."""
        if not self.sasl_port or self.secure is None:
            return
        for mechanism in SCRAM:
            out = subprocess.run(
                self._java(
                    "kafka.admin.ConfigCommand",
                    *("--bootstrap-server", f"127.0.0.1:{self.port}", "--alter"),
                    *("--add-config", f"{mechanism}=[password={self.secure.password}]"),
                    *("--entity-type", "users", "--entity-name", self.secure.user),
                ),
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                error = (out.stderr or out.stdout).strip().splitlines()
                raise StackError(f"could not add the SCRAM user {self.secure.user}: {error[-1] if error else '?'}")

    @property
    def formatted(self) -> bool:
        return (self.dir / "data" / "meta.properties").exists()

    @property
    def cluster_id_file(self) -> Path:
        return RUN / f"kafka-{self.base}-x{self.size}.cluster-id"

    def cluster_id(self) -> str:
        """One id for every node of the cluster, kept next to the nodes' data."""
        path = self.cluster_id_file
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            cluster_id = "-"
            while cluster_id.startswith("-"):  # the storage tool would read a leading dash as an option
                cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            path.write_text(cluster_id)
        return path.read_text().strip()

    def _java(self, main: str, *args: str) -> list[str]:
        log4j = self.dir / "log4j.properties"
        return [
            "java",
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j.configuration=file:{log4j}",
            f"-Dkafka.logs.dir={self.dir}",
            "-cp",
            f"{LIBS}/*",
            main,
            *args,
        ]

    def up(self) -> None:
        self.wait_ready(self.start())

    def start(self) -> int | None:
        """Spawns the node (nodes of a cluster must all be spawned before any can be ready)."""
        pid = _read_pid(self.pidfile)
        if pid is not None and kafka_metadata_ok(self.port):
            print(f"kafka already running (pid {pid}) on 127.0.0.1:{self.port}", file=sys.stderr)
            return None
        if pid is None and (_port_open(self.port) or _port_open(self.controller_port)):
            if kafka_metadata_ok(self.port):
                raise StackError(
                    f"a Kafka broker not started by this script answers on 127.0.0.1:{self.port}; "
                    f"use it with KAFKA_BOOTSTRAP_SERVERS=127.0.0.1:{self.port} or pick another --kafka-port"
                )
            raise StackError(f"port {self.port} or {self.controller_port} is busy; pick another --kafka-port")
        if pid is not None:
            return pid  # spawned, still starting
        if shutil.which("java") is None:
            raise StackError(
                "Java 17+ ('java') is needed to run Kafka; install it (apt-get install openjdk-17-jre-headless)"
            )
        ensure_kafka_jars()
        self.dir.mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        _write_secret(props, self.properties())
        (self.dir / "log4j.properties").write_text(
            "log4j.rootLogger=INFO, file\n"
            "log4j.appender.file=org.apache.log4j.FileAppender\n"
            f"log4j.appender.file.File={self.dir / 'server.log'}\n"
            "log4j.appender.file.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.file.layout.ConversionPattern=[%d] %p %m (%c)%n\n"
            "log4j.logger.kafka.request.logger=WARN\n"
            "log4j.logger.state.change.logger=WARN\n"
        )
        if not self.formatted:
            fmt = subprocess.run(
                self._java(
                    "kafka.tools.StorageTool",
                    *("format", "-t", self.cluster_id(), "-c", str(props), *self.scram_format_args()),
                ),
                capture_output=True,
                text=True,
            )
            if fmt.returncode != 0:
                raise StackError(f"kafka storage format failed: {fmt.stderr.strip() or fmt.stdout.strip()}")
        return _spawn(self._java("kafka.Kafka", str(props)), self.logfile, self.pidfile)

    def wait_ready(self, pid: int | None) -> None:
        if pid is None:
            return
        _wait(lambda: kafka_metadata_ok(self.port), 90, f"kafka on 127.0.0.1:{self.port}", self.dir / "server.log", pid)
        print(f"kafka {KAFKA_VERSION} up (pid {pid}) on 127.0.0.1:{self.port}", file=sys.stderr)
        if self.sasl_port:
            _wait(lambda: _port_open(self.sasl_port), 30, f"kafka SASL_SSL on 127.0.0.1:{self.sasl_port}")
            print(f"kafka SASL_SSL listener on 127.0.0.1:{self.sasl_port}", file=sys.stderr)

    def down(self) -> None:
        if _stop(self.pidfile, "kafka", timeout=40):
            print(f"kafka on 127.0.0.1:{self.port} stopped", file=sys.stderr)

    def status(self) -> str:
        pid = _read_pid(self.pidfile)
        if pid is None:
            return "stopped"
        return f"running (pid {pid}, {'ready' if kafka_metadata_ok(self.port) else 'not answering'})"


# --------------------------------------------------------------------------- Redis


def _resp(*words: str) -> bytes:
    out = f"*{len(words)}\r\n".encode()
    for w in words:
        raw = w.encode()
        out += b"$%d\r\n%s\r\n" % (len(raw), raw)
    return out


def redis_ping(port: int, host: str = "127.0.0.1", secure: Secure | None = None) -> bool:
    """True when the server answers PING (over TLS and after AUTH when ``secure``)."""
    try:
        with socket.create_connection((host, port), timeout=1) as raw:
            s: socket.socket = raw
            if secure is not None:
                s = ssl.create_default_context(cafile=str(secure.ca)).wrap_socket(raw, server_hostname=host)
                s.sendall(_resp("AUTH", secure.password))
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(_resp("PING"))
            return s.recv(64).startswith(b"+PONG")
    except (OSError, ssl.SSLError):
        return False


def ensure_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise StackError("redis-server is missing; install Debian's package: sudo apt-get install redis-server")
    print("installing redis-server from Debian's packages ...", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "redis-server"]):
        if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise StackError(f"'{' '.join(cmd)}' failed")
    found = shutil.which("redis-server")
    if not found:
        raise StackError("redis-server still not found after apt-get install")
    return found


@dataclass(frozen=True)
class RedisNode:
    """A redis-server with AOF persistence (appendfsync everysec) in a data dir this script owns;
    with ``cluster`` it runs in cluster mode, one master of a Redis Cluster (see ``form_redis_cluster``)."""

    port: int
    cluster: bool = False
    #: TLS only (no plain port) and ``requirepass`` with this stack's password.
    secure: Secure | None = None

    @property
    def dir(self) -> Path:
        return RUN / f"redis-{self.port}"

    @property
    def pidfile(self) -> Path:
        return self.dir / "redis.pid"

    def command(self, binary: str) -> list[str]:
        conf: list[str] = []
        if self.secure is not None:
            # Secrets in a 0600 file, not on the command line (``ps`` shows that to every user).
            s, path = self.secure, self.dir / "secure.conf"
            lines = [f"tls-port {self.port}", f"tls-cert-file {s.cert}", f"tls-key-file {s.key}"]
            lines += [f"tls-ca-cert-file {s.ca}", "tls-auth-clients no", f'requirepass "{s.password}"']
            if self.cluster:
                lines += ["tls-cluster yes", "tls-replication yes", f'masterauth "{s.password}"']
            _write_secret(path, "\n".join(lines) + "\n")
            conf = [str(path)]
        return [
            binary,
            *conf,
            "--port",
            "0" if self.secure is not None else str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir / "data"),
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "no",
            "--logfile",
            str(self.dir / "redis.log"),
            *(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"] if self.cluster else []),
        ]

    def up(self) -> None:
        pid = _read_pid(self.pidfile)
        if pid is not None and redis_ping(self.port, secure=self.secure):
            print(f"redis already running (pid {pid}) on 127.0.0.1:{self.port}", file=sys.stderr)
            return
        if _port_open(self.port):
            raise StackError(
                f"port {self.port} is busy (not a redis started by this script); pick another --redis-port"
            )
        binary = ensure_redis_server()
        (self.dir / "data").mkdir(parents=True, exist_ok=True)
        pid = _spawn(self.command(binary), self.dir / "redis.out", self.pidfile)
        ready = lambda: redis_ping(self.port, secure=self.secure)  # noqa: E731
        _wait(ready, 20, f"redis on 127.0.0.1:{self.port}", self.dir / "redis.log", pid)
        print(f"redis up (pid {pid}) on 127.0.0.1:{self.port}", file=sys.stderr)

    def down(self) -> None:
        if _stop(self.pidfile, "redis", timeout=20):
            print(f"redis on 127.0.0.1:{self.port} stopped", file=sys.stderr)

    def status(self) -> str:
        pid = _read_pid(self.pidfile)
        if pid is None:
            return "stopped"
        return f"running (pid {pid}, {'ready' if redis_ping(self.port, secure=self.secure) else 'not answering'})"

    def cli(self) -> tuple[list[str], dict[str, str]]:
        """``redis-cli`` flags and environment to reach this node (the password via REDISCLI_AUTH)."""
        if self.secure is None:
            return [], dict(os.environ)
        return ["--tls", "--cacert", str(self.secure.ca)], {**os.environ, "REDISCLI_AUTH": self.secure.password}


def _cluster_ok(node: RedisNode) -> bool:
    flags, env = node.cli()
    cmd = ["redis-cli", *flags, "-p", str(node.port), "cluster", "info"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return "cluster_state:ok" in out.stdout


def form_redis_cluster(nodes: list[RedisNode]) -> None:
    """Joins the nodes into one cluster, slots spread evenly, no replicas (idempotent)."""
    if all(_cluster_ok(n) for n in nodes):
        return
    if shutil.which("redis-cli") is None:
        raise StackError("redis-cli is missing; install Debian's package: sudo apt-get install redis-tools")
    flags, env = nodes[0].cli()
    cmd = ["redis-cli", *flags, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes)]
    try:  # redis-cli waits for the join without end when the nodes cannot reach each other's bus
        out = subprocess.run(
            [*cmd, "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, text=True, env=env, timeout=60
        )
    except subprocess.TimeoutExpired:
        raise StackError("redis-cli --cluster create: the nodes did not join in 60s (see their redis.log)") from None
    if out.returncode != 0:
        raise StackError(f"redis-cli --cluster create failed: {out.stdout.strip()[-400:]} {out.stderr.strip()}")
    for n in nodes:
        _wait(lambda n=n: _cluster_ok(n), 30, f"redis cluster state ok on 127.0.0.1:{n.port}")
    print(f"redis cluster of {len(nodes)} masters formed", file=sys.stderr)


# --------------------------------------------------------------------------- CLI


def env_lines(kafka: list[KafkaNode], redis: list[RedisNode]) -> str:
    """The settings that reach this stack, one ``NAME=value`` a line (secured parts when asked for)."""
    lines = []
    if kafka[0].sasl_port and kafka[0].secure is not None:
        s = kafka[0].secure
        lines += [
            "KAFKA_BOOTSTRAP_SERVERS=" + ",".join(f"127.0.0.1:{k.sasl_port}" for k in kafka),
            "MIRSTREAM_KAFKA_SECURITY_PROTOCOL=SASL_SSL",
            "MIRSTREAM_KAFKA_SASL_MECHANISM=SCRAM-SHA-256",
            f"MIRSTREAM_KAFKA_SASL_USERNAME={s.user}",
            f"MIRSTREAM_KAFKA_SASL_PASSWORD={s.password}",
            f"MIRSTREAM_KAFKA_SSL_CA_FILE={s.ca}",
        ]
    else:
        lines.append("KAFKA_BOOTSTRAP_SERVERS=" + ",".join(f"127.0.0.1:{k.port}" for k in kafka))
    first = redis[0]
    scheme = "rediss" if first.secure is not None else "redis"
    auth = f":{first.secure.password}@" if first.secure is not None else ""
    if first.cluster:
        lines.append(f"REDIS_URL={scheme}+cluster://{auth}127.0.0.1:{first.port}")
    else:
        lines.append(f"REDIS_URL={scheme}://{auth}127.0.0.1:{first.port}/0")
    if first.secure is not None:
        lines.append(f"MIRSTREAM_REDIS_CA_FILE={first.secure.ca}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy/stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--kafka-port", type=int, default=int(os.environ.get("MIRSTREAM_KAFKA_PORT", 9092)))
    parser.add_argument("--redis-port", type=int, default=int(os.environ.get("MIRSTREAM_REDIS_PORT", 6379)))
    parser.add_argument("--brokers", type=int, default=1, help="Kafka nodes (ports --kafka-port, +2, +4, ...)")
    parser.add_argument(
        "--redis-cluster", type=int, default=0, help="run a Redis Cluster of N masters (ports --redis-port, +1, ...)"
    )
    parser.add_argument("--wipe", action="store_true", help="with down: delete the data and logs too")
    parser.add_argument("--only", choices=["kafka", "redis"], help="act on one service (e.g. restart Redis alone)")
    parser.add_argument("--node", type=int, help="with --only: act on node N (1-based) of a multi-node service")
    sec = parser.add_argument_group("security (opt-in; self-signed certificates made with openssl)")
    sec.add_argument("--kafka-sasl-port", type=int, default=0, help="add a SASL_SSL listener (node n: port + n - 1)")
    sec.add_argument("--redis-tls", action="store_true", help="serve Redis over TLS only, with requirepass")
    sec.add_argument("--tls-dir", type=Path, default=RUN / "tls", help="certificates (made there when missing)")
    sec.add_argument("--user", default="mirstream", help="the Kafka SASL user (PLAIN and SCRAM)")
    sec.add_argument(
        "--password-env",
        default="MIRSTREAM_STACK_PASSWORD",
        help="environment variable holding the password (default: one made once under the stack dir)",
    )
    args = parser.parse_args(argv)
    secure = None
    if args.kafka_sasl_port or args.redis_tls:
        password = os.environ.get(args.password_env) or _stack_password(create=args.action == "up")
        if not re.fullmatch(r"[A-Za-z0-9_.~-]*", password) or not re.fullmatch(r"[A-Za-z0-9_.-]+", args.user):
            parser.error("user and password: letters, digits and _ . ~ - only (they go into JAAS and URL text)")
        secure = Secure(args.tls_dir.resolve(), args.user, password)
    kafka = KafkaNode(args.kafka_port, 1, args.brokers, args.kafka_sasl_port, secure).peers
    redis_secure = secure if args.redis_tls else None
    redis = [RedisNode(args.redis_port + i, True, redis_secure) for i in range(args.redis_cluster)] or [
        RedisNode(args.redis_port, secure=redis_secure)
    ]
    chosen: list = [*(redis if args.only in (None, "redis") else []), *(kafka if args.only in (None, "kafka") else [])]
    if args.node is not None:
        group = kafka if args.only == "kafka" else redis
        if not args.only or not 1 <= args.node <= len(group):
            parser.error("--node needs --only and a node number within the service's nodes")
        chosen = [group[args.node - 1]]
    try:
        if args.action == "up":
            if secure is not None:
                make_certs(secure.tls_dir)
            for node in [n for n in chosen if isinstance(n, RedisNode)]:  # up in a blink
                node.up()
            if args.redis_cluster and args.node is None and args.only in (None, "redis"):
                form_redis_cluster(redis)
            had_data = {node.node for node in chosen if isinstance(node, KafkaNode) and node.formatted}
            started = [(node, node.start()) for node in chosen if isinstance(node, KafkaNode)]
            for node, pid in started:  # a KRaft quorum needs its voters up before any node is ready
                node.wait_ready(pid)
            if args.kafka_sasl_port and any(pid is not None and node.node in had_data for node, pid in started):
                started[0][0].add_scram_user()  # data from an earlier run, formatted without the user
            print(env_lines(kafka, redis))
        elif args.action == "down":
            for node in reversed(chosen):
                node.down()
                if args.wipe:
                    shutil.rmtree(node.dir, ignore_errors=True)
            if args.wipe and args.only in (None, "kafka") and args.node is None:
                kafka[0].cluster_id_file.unlink(missing_ok=True)
        else:
            for k in kafka:
                print(f"kafka 127.0.0.1:{k.port}: {k.status()}")
            for r in redis:
                print(f"redis 127.0.0.1:{r.port}: {r.status()}")
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
