"""Typed settings for workers and tools, read from the environment (CLI flags override them).

One object, documented defaults, no globals: every process builds a ``Settings`` once and hands it down.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field, fields, replace
from urllib.parse import urlsplit, urlunsplit

from streams.events import Limits

KAFKA_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
REDIS_SCHEMES = ("redis://", "rediss://", "redis+cluster://", "rediss+cluster://", "unix://")


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (for logs, errors and ``repr``)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _split(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Settings:
    """Runtime configuration. Env var for each field: ``MIRSTREAM_<FIELD>`` (upper case)."""

    #: Kafka bootstrap servers, ``host:port[,host:port]`` (env ``KAFKA_BOOTSTRAP_SERVERS`` also works).
    bootstrap_servers: str = "127.0.0.1:9092"
    #: Redis URL (env ``REDIS_URL`` also works).
    redis_url: str = "redis://127.0.0.1:6379/0"
    #: Prefix of every topic and every Redis key; lets several deployments share one cluster.
    prefix: str = "mir"
    #: Scenarios; each gets the topic ``<prefix>.events.<scenario>``.
    scenarios: tuple[str, ...] = ("feed", "search", "ads")
    #: Partitions of every event topic (all co-partitioned by user_id); the ceiling on worker count.
    partitions: int = 4
    #: Replication factor of the topics this project creates.
    replication: int = 1
    #: Faust application id = consumer group.
    app_id: str = "mirstream"
    #: Faust web port (``/metrics``, ``/users/{id}/interests``, the ``/ui`` pages); 0 disables the web server.
    web_port: int = 6066
    #: Address the web server binds to.  Loopback by default; anything else needs ``web_token``.
    web_bind: str = "127.0.0.1"
    #: Bearer token for every page but ``/metrics`` and ``/health`` (``Authorization: Bearer``, ``?token=``
    #: or the ``mirstream_token`` cookie).  Required when ``web_bind`` is beyond loopback; empty: no check.
    web_token: str = field(default="", repr=False)
    #: Faust's own pages (``/router/``, ``/table/``, ``/graph``, the stats index): off by default.
    web_debug_pages: bool = False
    #: ``/metrics`` and ``/health`` also on this port of their own (0: only on ``web_port``), bound to
    #: ``metrics_bind``: a Prometheus on another host can scrape while the user pages stay on loopback.
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"
    #: Where the worker keeps Faust's local data (no tables are used; only bookkeeping).
    datadir: str = field(default_factory=lambda: os.path.join(os.path.expanduser("~"), ".cache", "mirstream", "faust"))
    #: Model checkpoint directory (``mirstream train`` writes one).
    checkpoint: str = "runs/demo"
    #: Events kept per user history (codes, a few bytes each).
    history_cap: int = 1000
    #: How long a model version's own copy of a user's vectors is kept (readers can pin a version).
    version_ttl_s: float = 7 * 86400.0
    #: Kafka consumer session timeout: a crashed worker's partitions move after this many seconds.
    session_timeout_s: float = 10.0
    #: Max events a scenario agent takes from its stream per batch, and how long a batch waits for more
    #: after its first event.  Faust hands an agent its events at its own pace, so under a backlog the
    #: wait, not the size, closes a batch.  A batch that received ``batch_grow_at`` events in its last
    #: ``batch_wait_ms`` (faster than a steady stream sends them) waits another ``batch_wait_ms``, up to
    #: ``batch_wait_max_ms``: larger batches hold fewer users per event and go faster, and at a steady
    #: rate each event waits only ``batch_wait_ms`` (``streams.batching``; README, Performance, ingest).
    #: ``batch_wait_max_ms`` = ``batch_wait_ms``: a fixed wait.
    batch_size: int = 2048
    batch_wait_ms: int = 50
    batch_wait_max_ms: int = 500
    batch_grow_at: int = 64
    #: Hand each fetched message to the streams eagerly (``streams.consumer``): Faust's own hand-off races
    #: every message against the rebalance flag with four tasks; off brings Faust's back unchanged.
    eager_handoff: bool = True
    #: Records one fetch hands the streams at most (Faust's ``broker_max_poll_records``; 0: no limit, its
    #: default), and events a stream buffers ahead of its agent (``stream_buffer_maxsize``).  A partition
    #: whose buffer is 80 % full is left out of the next fetches until it is down to 40 %, but what one
    #: fetch returned is handed over whatever it holds: unbounded, a backlog's fetch filled the buffer and
    #: then waited for room one message at a time (~40 µs each).  A fetch of at most 20 % of the buffer
    #: always fits (README, Performance, ingest: 2,000 / 16,384 was the fastest pair tried).
    max_poll_records: int = 2000
    stream_buffer: int = 16384
    #: Max items the item agent takes per batch: a text item costs milliseconds of the item tower, so its
    #: batches stay small enough to be applied (and committed) within a few seconds.
    item_batch_size: int = 256
    #: Refinement scheduler: users per refiner call, max wait to fill a batch, per-user debounce.
    refine_batch: int = 64
    refine_wait_ms: int = 100
    refine_debounce_ms: int = 200
    #: Torch threads of the refiner (0: one per core).  The event loop's own model calls (the
    #: coarse fold of a batch) run on one thread: see ``streams.refinement.refiner_threads``.
    refine_threads: int = 0
    #: Run the refiner in a process of its own (spawned at start, loads ``checkpoint``): its Python then
    #: shares no interpreter lock with the agents.  Off: a thread of the worker.
    refine_process: bool = True
    #: Turn the LLM refinement off (ingest only: codes, history, coarse state).
    refine: bool = True
    #: Unknown item: how long an event stays parked waiting for its item before it is dead-lettered.
    park_timeout_s: float = 60.0
    #: ``/health`` fails when a partition with lag made no progress, or refinement kept failing, this long.
    health_stall_s: float = 60.0
    #: Largest message accepted, bytes; larger ones go to the dead-letter topic.
    max_message_bytes: int = 65536
    #: Events dated more than this ahead of the worker's clock are dead-lettered (a far-future date would
    #: outweigh every later event in the time-decayed state).
    max_future_s: float = 86400.0
    #: Events older than this are dead-lettered; 0 (default) accepts any age, as replays of logs need.
    max_age_s: float = 0.0
    #: A user's keys expire this long after its last event (0: never).  Keep it above the topics' retention.
    user_ttl_s: float = 0.0

    @property
    def limits(self) -> Limits:
        return Limits(self.max_message_bytes, self.max_future_s, self.max_age_s)

    # ---- security (see ``streams.security``, which turns these into each client's arguments) -------
    #: Kafka security protocol: ``PLAINTEXT``, ``SSL``, ``SASL_PLAINTEXT`` or ``SASL_SSL``.
    kafka_security_protocol: str = "PLAINTEXT"
    #: SASL mechanism with a ``SASL_*`` protocol: ``PLAIN``, ``SCRAM-SHA-256`` or ``SCRAM-SHA-512``.
    kafka_sasl_mechanism: str = "PLAIN"
    kafka_sasl_username: str = ""
    #: Never logged, never in ``repr``.
    kafka_sasl_password: str = field(default="", repr=False)
    #: CA bundle (PEM) that signed the brokers' certificates; empty: the system's trust store.
    kafka_ssl_ca_file: str = ""
    #: Client certificate and key (PEM), for brokers that ask for one (mutual TLS).
    kafka_ssl_cert_file: str = ""
    kafka_ssl_key_file: str = ""
    #: CA bundle (PEM) for ``rediss://`` URLs; empty: the system's trust store.  The Redis password goes
    #: in the URL (``rediss://user:password@host:port/0``).
    redis_ca_file: str = ""
    #: Client certificate and key (PEM), for a Redis with ``tls-auth-clients yes``.
    redis_cert_file: str = ""
    redis_key_file: str = ""

    # ---- topic names ----------------------------------------------------------------------------
    def events_topic(self, scenario: str) -> str:
        return f"{self.prefix}.events.{scenario}"

    @property
    def items_topic(self) -> str:
        return f"{self.prefix}.items"

    @property
    def interests_topic(self) -> str:
        return f"{self.prefix}.interests"

    @property
    def deadletter_topic(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def kafka_url(self) -> str:
        """The broker list as Faust wants it (``kafka://h1:p1;kafka://h2:p2``)."""
        return ";".join(f"kafka://{hp}" for hp in _split(self.bootstrap_servers))

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, **overrides: object) -> Settings:
        """Defaults ← environment ← explicit overrides (None values in overrides are ignored)."""
        env = dict(os.environ if env is None else env)
        values: dict[str, object] = {}
        aliases = {"bootstrap_servers": "KAFKA_BOOTSTRAP_SERVERS", "redis_url": "REDIS_URL"}
        for f in fields(cls):
            raw = env.get(f"MIRSTREAM_{f.name.upper()}", env.get(aliases.get(f.name, "")))
            if raw is not None:
                values[f.name] = _parse(f.type, raw, f.name)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings.validate()
        return settings

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)

    def __repr__(self) -> str:
        """Every field but the secrets: the SASL password is left out and the Redis URL's masked."""
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.repr and f.name != "redis_url"]
        shown.insert(1, f"redis_url={redact_url(self.redis_url)!r}")
        return f"Settings({', '.join(shown)})"

    def validate(self) -> None:
        if self.refine_threads < 0:
            raise ValueError("refine_threads must be 0 (one per core) or more")
        if not self.scenarios:
            raise ValueError("at least one scenario is needed")
        for name in self.scenarios:
            if not name.isidentifier():
                raise ValueError(f"scenario name {name!r} must be a simple identifier")
        for name in (
            "partitions",
            "replication",
            "history_cap",
            "batch_size",
            "batch_wait_ms",
            "batch_grow_at",
            "stream_buffer",
            "item_batch_size",
            "refine_batch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_poll_records < 0:
            raise ValueError(f"max_poll_records must be >= 0 (0: no limit), got {self.max_poll_records}")
        if self.batch_wait_max_ms < self.batch_wait_ms:
            raise ValueError(
                f"batch_wait_max_ms ({self.batch_wait_max_ms}) must be >= batch_wait_ms ({self.batch_wait_ms})"
            )
        if self.kafka_security_protocol not in KAFKA_PROTOCOLS:
            raise ValueError(
                f"kafka_security_protocol must be one of {', '.join(KAFKA_PROTOCOLS)}, "
                f"got {self.kafka_security_protocol!r}"
            )
        if self.kafka_security_protocol.startswith("SASL_"):
            if self.kafka_sasl_mechanism not in SASL_MECHANISMS:
                raise ValueError(
                    f"kafka_sasl_mechanism must be one of {', '.join(SASL_MECHANISMS)}, "
                    f"got {self.kafka_sasl_mechanism!r}"
                )
            if not self.kafka_sasl_username or not self.kafka_sasl_password:
                raise ValueError(f"{self.kafka_security_protocol} needs kafka_sasl_username and kafka_sasl_password")
        if bool(self.kafka_ssl_cert_file) != bool(self.kafka_ssl_key_file):
            raise ValueError("kafka_ssl_cert_file and kafka_ssl_key_file go together")
        if bool(self.redis_cert_file) != bool(self.redis_key_file):
            raise ValueError("redis_cert_file and redis_key_file go together")
        for name in (
            "kafka_ssl_ca_file",
            "kafka_ssl_cert_file",
            "kafka_ssl_key_file",
            "redis_ca_file",
            "redis_cert_file",
            "redis_key_file",
        ):
            path = getattr(self, name)
            if path and not os.path.isfile(path):
                raise ValueError(f"{name}: no such file {path!r}")
        if not self.redis_url.startswith(REDIS_SCHEMES):
            schemes = ", ".join(REDIS_SCHEMES)
            raise ValueError(f"redis_url must start with one of {schemes}, got {redact_url(self.redis_url)!r}")
        if self.web_port and not is_loopback(self.web_bind) and not self.web_token:
            raise ValueError(
                f"web_bind {self.web_bind!r} is beyond loopback: set MIRSTREAM_WEB_TOKEN (the bearer token the "
                "user endpoints and the /ui pages then require)"
            )

    @property
    def web_host(self) -> str:
        """The host name this worker's pages are reached at (the bind address, unless it is a wildcard)."""
        return socket.gethostname() if self.web_bind in ("", "0.0.0.0", "::") else self.web_bind


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1); names are not resolved."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse(type_name: object, raw: str, name: str) -> object:
    kind = str(type_name)
    try:
        if "tuple" in kind:
            return _split(raw)
        if kind == "bool":
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError as exc:
        raise ValueError(f"MIRSTREAM_{name.upper()}={raw!r}: {exc}") from None
    return raw
