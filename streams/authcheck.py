"""Checks the credentials before a worker or a tool starts, so a wrong password is one clear line.

Why not let the clients say it: a Kafka broker answers a failed SASL authentication by closing the
connection (over TLS its error response is usually lost with the close), and both aiokafka and
kafka-python then report a plain "connection closed" and retry it like a broker restart, forever or until
a 30 s bootstrap timeout.  So this module speaks the few requests of the SASL exchange itself (SaslHandshake
v1, SaslAuthenticate v1, PLAIN or SCRAM per RFC 5802) to the first broker that answers: a broker that
negotiates the mechanism and then closes the connection at our credentials has refused them.

A broker or a Redis that does not answer at all is not an auth failure: the check passes and the worker's
usual retries wait for it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import ssl
import struct

from streams.security import AuthFailure, auth_failure, kafka_uses_sasl, kafka_uses_ssl, redis_sync, ssl_context
from streams.settings import Settings, redact_url

_SASL_HANDSHAKE, _SASL_AUTHENTICATE = 17, 36


class _Closed(Exception):
    """The broker closed the connection."""


def _frame(api_key: int, correlation: int, body: bytes) -> bytes:
    client = b"mirstream-authcheck"
    header = struct.pack(">hhih", api_key, 1, correlation, len(client)) + client
    return struct.pack(">i", len(header) + len(body)) + header + body


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise _Closed
        buf += chunk
    return buf


def _call(s: socket.socket, api_key: int, correlation: int, body: bytes) -> bytes:
    s.sendall(_frame(api_key, correlation, body))
    size = struct.unpack(">i", _recv_exact(s, 4))[0]
    return _recv_exact(s, size)[4:]  # past the correlation id


def _string(raw: bytes, at: int) -> tuple[str | None, int]:
    (n,) = struct.unpack_from(">h", raw, at)
    if n < 0:
        return None, at + 2
    return raw[at + 2 : at + 2 + n].decode(errors="replace"), at + 2 + n


class _Scram:
    """The client side of SCRAM-SHA-256/512 (RFC 5802, no channel binding), as Kafka uses it."""

    def __init__(self, mechanism: str, user: str, password: str) -> None:
        self.hash = hashlib.sha256 if mechanism.endswith("256") else hashlib.sha512
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        name = user.replace("=", "=3D").replace(",", "=2C")
        self.first_bare = f"n={name},r={self.nonce}"

    def first(self) -> bytes:
        return f"n,,{self.first_bare}".encode()

    def final(self, server_first: bytes) -> bytes:
        fields = dict(part.split("=", 1) for part in server_first.decode().split(","))
        if not fields.get("r", "").startswith(self.nonce):
            raise AuthFailure("Kafka SCRAM exchange failed: the broker's nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac(self.hash().name, self.password, base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.new(salted, b"Client Key", self.hash).digest()
        without_proof = f"c=biws,r={fields['r']}"
        message = f"{self.first_bare},{server_first.decode()},{without_proof}".encode()
        signature = hmac.new(self.hash(client_key).digest(), message, self.hash).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def _sasl(s: socket.socket, settings: Settings) -> None:
    """Handshake and authenticate; raises AuthFailure when the broker refuses."""
    mechanism, user = settings.kafka_sasl_mechanism, settings.kafka_sasl_username
    reply = _call(s, _SASL_HANDSHAKE, 1, struct.pack(">h", len(mechanism)) + mechanism.encode())
    (error,) = struct.unpack_from(">h", reply, 0)
    if error:
        (count,) = struct.unpack_from(">i", reply, 2)
        at, offered = 6, []
        for _ in range(max(count, 0)):
            name, at = _string(reply, at)
            offered.append(name)
        raise AuthFailure(f"Kafka does not offer SASL mechanism {mechanism} (it offers {', '.join(map(str, offered))})")
    if mechanism == "PLAIN":
        tokens = [f"\0{user}\0{settings.kafka_sasl_password}".encode()]
        scram = None
    else:
        scram = _Scram(mechanism, user, settings.kafka_sasl_password)
        tokens = [scram.first()]
    correlation = 2
    while tokens:
        token = tokens.pop()
        try:
            reply = _call(s, _SASL_AUTHENTICATE, correlation, struct.pack(">i", len(token)) + token)
        except _Closed:
            raise AuthFailure(
                f"Kafka authentication failed for user {user!r} ({mechanism}): the broker closed the connection "
                "at the credentials (wrong username or password?)"
            ) from None
        (error,) = struct.unpack_from(">h", reply, 0)
        message, at = _string(reply, 2)
        if error:
            raise AuthFailure(f"Kafka authentication failed for user {user!r} ({mechanism}): {message}")
        # The server's final SCRAM message (its signature) is not checked: this is a credentials check,
        # the real clients that follow verify the broker themselves.
        if scram is not None and correlation == 2:
            (n,) = struct.unpack_from(">i", reply, at)
            tokens.append(scram.final(reply[at + 4 : at + 4 + n]))
        correlation += 1


def check_kafka(settings: Settings, timeout: float = 10.0) -> None:
    """Raises AuthFailure when the first broker that answers refuses the TLS set-up or the credentials."""
    if not (kafka_uses_ssl(settings) or kafka_uses_sasl(settings)):
        return
    for server in settings.bootstrap_servers.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            raw = socket.create_connection((host, int(port)), timeout=timeout)
        except OSError:
            continue  # down or unreachable: try the next one, or leave it to the clients' retries
        with raw:
            try:
                s: socket.socket = raw
                if kafka_uses_ssl(settings):
                    s = ssl_context(settings).wrap_socket(raw, server_hostname=host)
                if kafka_uses_sasl(settings):
                    _sasl(s, settings)
            except ssl.SSLCertVerificationError as exc:
                why = getattr(exc, "verify_message", None) or exc
                raise AuthFailure(f"Kafka at {server}: TLS certificate not trusted: {why}") from None
            except ssl.SSLError as exc:
                raise AuthFailure(f"Kafka at {server}: TLS handshake failed: {exc.reason or exc}") from None
            except _Closed:
                raise AuthFailure(
                    f"Kafka at {server} closed the connection during the {settings.kafka_security_protocol} set-up "
                    "(is that listener's protocol the one configured?)"
                ) from None
            except (OSError, struct.error):
                continue
        return


def check_redis(settings: Settings) -> None:
    """Raises AuthFailure when Redis refuses the password or its certificate is not trusted."""
    try:
        client = redis_sync(settings)
        client.ping()
        client.close()
    except Exception as exc:
        why = auth_failure(exc)
        if why is not None:
            raise AuthFailure(f"{why} ({redact_url(settings.redis_url)})") from None


def preflight(settings: Settings, kafka: bool = True, redis: bool = True) -> None:
    if kafka:
        check_kafka(settings)
    if redis:
        check_redis(settings)
