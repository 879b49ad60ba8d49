"""Security settings without services: what each client is handed, what stays secret, how refusals read."""

from __future__ import annotations

import ssl

import faust
import kafka.errors as kx
import pytest
import redis.exceptions as rx

from state.store import RedisTLS, _split_url
from streams.authcheck import _Scram
from streams.retry import is_transient
from streams.security import auth_failure, faust_credentials, kafka_python_config
from streams.settings import Settings, redact_url
from streams.workerproc import settings_env


@pytest.fixture
def ca_file(tmp_path):
    """A real CA bundle (the system's), so the TLS contexts load it."""
    path = ssl.get_default_verify_paths().cafile
    if not path:
        pytest.skip("no system CA bundle to load")
    return path


def test_password_is_never_in_repr():
    s = Settings(kafka_sasl_password="hunter2", redis_url="rediss://app:pw-redis@h:6380/0")
    shown = repr(s)
    assert "hunter2" not in shown and "pw-redis" not in shown
    assert "rediss://app:***@h:6380/0" in shown and "kafka_sasl_username" in shown
    assert str(s) == shown


def test_redact_url_keeps_everything_but_the_password():
    assert redact_url("redis://:p%40ss@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss+cluster://u:x@h:1") == "rediss+cluster://u:***@h:1"
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def test_security_settings_from_env_round_trip(ca_file):
    env = {
        "MIRSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "MIRSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "MIRSTREAM_KAFKA_SASL_USERNAME": "app",
        "MIRSTREAM_KAFKA_SASL_PASSWORD": "secret",
        "MIRSTREAM_KAFKA_SSL_CA_FILE": ca_file,
        "REDIS_URL": "rediss://:pw@h:6380/0",
        "MIRSTREAM_REDIS_CA_FILE": ca_file,
    }
    s = Settings.from_env(env)
    assert (s.kafka_sasl_mechanism, s.kafka_sasl_password, s.redis_ca_file) == ("SCRAM-SHA-512", "secret", ca_file)
    assert Settings.from_env(settings_env(s)) == s  # a worker child process gets the same settings


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MIRSTREAM_KAFKA_SECURITY_PROTOCOL": "TLS"}, "kafka_security_protocol must be one of"),
        ({"MIRSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "MIRSTREAM_KAFKA_SASL_USERNAME": "a"}, "needs"),
        (
            {"MIRSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "MIRSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"},
            "kafka_sasl_mechanism",
        ),
        ({"MIRSTREAM_KAFKA_SSL_CA_FILE": "/nonexistent/ca.pem"}, "no such file"),
        ({"MIRSTREAM_REDIS_CERT_FILE": "x"}, "go together"),
        ({"REDIS_URL": "http://:pw@h"}, r"redis_url must start .*http://:\*\*\*@h"),
    ],
)
def test_bad_security_settings_are_one_clear_line(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


def test_plaintext_hands_no_security_to_any_client():
    s = Settings(bootstrap_servers="a:1,b:2")
    assert kafka_python_config(s) == {"bootstrap_servers": "a:1,b:2", "security_protocol": "PLAINTEXT"}
    assert faust_credentials(s) is None


def test_sasl_ssl_reaches_kafka_python_and_faust(ca_file):
    s = Settings(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="SCRAM-SHA-256",
        kafka_sasl_username="app",
        kafka_sasl_password="secret",
        kafka_ssl_ca_file=ca_file,
    )
    config = kafka_python_config(s)
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (config["sasl_plain_username"], config["sasl_plain_password"]) == ("app", "secret")
    assert config["ssl_context"].verify_mode == ssl.CERT_REQUIRED and config["ssl_context"].check_hostname
    creds = faust_credentials(s)
    assert isinstance(creds, faust.SASLCredentials) and creds.protocol.value == "SASL_SSL"
    assert creds.mechanism.value == "SCRAM-SHA-256" and "secret" not in repr(creds)
    plain = faust_credentials(s.with_(kafka_security_protocol="SASL_PLAINTEXT"))
    assert plain.protocol.value == "SASL_PLAINTEXT" and plain.ssl_context is None
    tls = faust_credentials(s.with_(kafka_security_protocol="SSL"))
    assert isinstance(tls, faust.SSLCredentials) and "sasl_mechanism" not in kafka_python_config(
        s.with_(kafka_security_protocol="SSL")
    )


@pytest.mark.parametrize(
    ("url", "cluster", "parsed"),
    [
        ("redis://h:1/0", False, "redis://h:1/0"),
        ("rediss://:pw@h:1/0", False, "rediss://:pw@h:1/0"),
        ("redis+cluster://:pw@h:1", True, "redis://:pw@h:1"),
        ("rediss+cluster://u:pw@h:1", True, "rediss://u:pw@h:1"),
    ],
)
def test_redis_url_schemes(url, cluster, parsed):
    tls = RedisTLS(ca_file="ca.pem")
    got_cluster, got_url, kwargs = _split_url(url, tls)
    assert (got_cluster, got_url) == (cluster, parsed)
    assert kwargs == ({"ssl_ca_certs": "ca.pem"} if parsed.startswith("rediss") else {})


def test_refusals_are_recognised_and_never_retried():
    cases = [
        (rx.AuthenticationError("invalid username-password pair"), "Redis authentication failed"),
        (rx.NoPermissionError("NOPERM this user has no permissions"), "Redis refused"),
        (kx.SaslAuthenticationFailedError("bad"), "Kafka authentication failed"),
        (kx.TopicAuthorizationFailedError(), "Kafka refused"),
    ]
    for exc, words in cases:
        assert words in (auth_failure(exc) or ""), exc
        assert not is_transient(exc)
    # A certificate failure arrives wrapped in a connection error, which is otherwise transient.
    wrapped = rx.ConnectionError("Error 1 connecting")
    wrapped.__context__ = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert "TLS certificate not trusted" in auth_failure(wrapped)
    assert not is_transient(wrapped)
    assert auth_failure(rx.ConnectionError("refused")) is None and is_transient(rx.ConnectionError("refused"))


def test_scram_client_final_matches_rfc7677():
    """The SCRAM-SHA-256 example exchange of RFC 7677, section 3."""
    scram = _Scram("SCRAM-SHA-256", "user", "pencil")
    scram.nonce = "rOprNGfwEbeRWgbNEkqO"
    scram.first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO"
    assert scram.first() == b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
    server_first = b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    assert scram.final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
