"""Turns the security settings into each client's arguments, in one place so no path forgets them.

Three Kafka clients and two Redis flavours meet the same brokers and servers: Faust (aiokafka, through
``broker_credentials``), kafka-python (the admin client, the replay / bench producers, the tests'
consumers) and redis-py (sync and asyncio, single server or cluster).  Each gets its arguments from a
function here, built from one ``Settings``; the connect helpers of ``state.store`` do the Redis part.

Auth failures are not transient: ``auth_failure`` recognises them (and TLS certificate failures) so the
worker can stop with one line instead of retrying a password that will never work.
"""

from __future__ import annotations

import ssl
from typing import Any

import redis
import redis.asyncio as aioredis

from state.store import AsyncInterestReader, InterestReader, RedisTLS, connect_async, connect_sync
from streams.settings import Settings, redact_url


def kafka_uses_ssl(settings: Settings) -> bool:
    return settings.kafka_security_protocol in ("SSL", "SASL_SSL")


def kafka_uses_sasl(settings: Settings) -> bool:
    return settings.kafka_security_protocol.startswith("SASL_")


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """A client TLS context that verifies the brokers against the CA file (or the system store)."""
    ctx = ssl.create_default_context(cafile=settings.kafka_ssl_ca_file or None)
    if settings.kafka_ssl_cert_file:
        ctx.load_cert_chain(settings.kafka_ssl_cert_file, settings.kafka_ssl_key_file)
    return ctx


def kafka_python_config(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for kafka-python's ``KafkaProducer`` / ``KafkaConsumer`` / ``KafkaAdminClient``
    (``bootstrap_servers`` included)."""
    config: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
    }
    if kafka_uses_ssl(settings):
        config["ssl_context"] = ssl_context(settings)
    if kafka_uses_sasl(settings):
        config["sasl_mechanism"] = settings.kafka_sasl_mechanism
        config["sasl_plain_username"] = settings.kafka_sasl_username
        config["sasl_plain_password"] = settings.kafka_sasl_password
    return config


def faust_credentials(settings: Settings) -> Any:
    """Faust's ``broker_credentials`` (None for PLAINTEXT); Faust hands them to every aiokafka client."""
    import faust

    protocol = settings.kafka_security_protocol
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    return faust.SASLCredentials(
        username=settings.kafka_sasl_username,
        password=settings.kafka_sasl_password,
        mechanism=settings.kafka_sasl_mechanism,
        # SASL_SSL when a context is given, SASL_PLAINTEXT when not (faust.auth.SASLCredentials).
        ssl_context=ssl_context(settings) if protocol == "SASL_SSL" else None,
    )


def redis_tls(settings: Settings) -> RedisTLS:
    return RedisTLS(settings.redis_ca_file, settings.redis_cert_file, settings.redis_key_file)


def redis_sync(settings: Settings) -> redis.Redis:
    """A blocking client (``RedisCluster`` for ``+cluster`` URLs) with the settings' TLS files."""
    return connect_sync(settings.redis_url, redis_tls(settings))


def redis_async(settings: Settings) -> aioredis.Redis:
    """An asyncio client (``RedisCluster`` for ``+cluster`` URLs) with the settings' TLS files."""
    return connect_async(settings.redis_url, redis_tls(settings))


def interest_reader(settings: Settings) -> InterestReader:
    return InterestReader(settings.redis_url, settings.prefix, redis_tls(settings))


def async_interest_reader(settings: Settings) -> AsyncInterestReader:
    return AsyncInterestReader(settings.redis_url, settings.prefix, redis_tls(settings))


# --------------------------------------------------------------------------- failures


class AuthFailure(RuntimeError):
    """Credentials or certificates the server refused: retrying cannot help."""


def auth_failure(exc: BaseException) -> str | None:
    """What went wrong, as one line, when ``exc`` (or what caused it) is an authentication, authorisation
    or TLS certificate failure of Kafka or Redis; None for anything else."""
    import kafka.errors as kx
    import redis.exceptions as rx
    from aiokafka import errors as ax

    kafka_auth = (
        kx.SaslAuthenticationFailedError,
        kx.UnsupportedSaslMechanismError,
        ax.AuthenticationFailedError,
        ax.SaslAuthenticationFailed,
        ax.UnsupportedSaslMechanismError,
        ax.AuthenticationMethodNotSupported,
    )
    kafka_denied = (
        kx.AuthorizationError,
        ax.TopicAuthorizationFailedError,
        ax.GroupAuthorizationFailedError,
        ax.ClusterAuthorizationFailedError,
    )
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, AuthFailure):
            return str(cur)
        if isinstance(cur, (rx.AuthenticationError, rx.AuthenticationWrongNumberOfArgsError)):
            return f"Redis authentication failed: {cur}"
        if isinstance(cur, (rx.AuthorizationError, rx.NoPermissionError)):
            return f"Redis refused a command to this user: {cur}"
        if isinstance(cur, kafka_auth):
            return f"Kafka authentication failed: {cur}"
        if isinstance(cur, kafka_denied):
            return f"Kafka refused an operation to this user: {cur}"
        if isinstance(cur, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted: {getattr(cur, 'verify_message', None) or cur}"
        if isinstance(cur, ssl.SSLError) and "CERTIFICATE_VERIFY_FAILED" in str(cur):
            return f"TLS certificate not trusted: {cur}"
        cur = cur.__cause__ or cur.__context__
    return None


def describe(settings: Settings) -> str:
    """Where the worker connects, without secrets (for the start-up log line)."""
    kafka = f"kafka {settings.bootstrap_servers} ({settings.kafka_security_protocol}"
    if kafka_uses_sasl(settings):
        kafka += f", {settings.kafka_sasl_mechanism} as {settings.kafka_sasl_username}"
    return f"{kafka}), redis {redact_url(settings.redis_url)}"
