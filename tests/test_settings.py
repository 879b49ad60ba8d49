from __future__ import annotations

import pytest

from streams.settings import Settings
from streams.workerproc import settings_env


def test_env_then_overrides():
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "a:1,b:2",
        "MIRSTREAM_SCENARIOS": "feed, ads",
        "MIRSTREAM_PARTITIONS": "8",
        "MIRSTREAM_REFINE": "false",
    }
    s = Settings.from_env(env, partitions=2, prefix=None)
    assert s.bootstrap_servers == "a:1,b:2"
    assert s.kafka_url == "kafka://a:1;kafka://b:2"
    assert s.scenarios == ("feed", "ads")
    assert s.partitions == 2  # explicit override beats env
    assert s.refine is False
    assert s.events_topic("ads") == "mir.events.ads"


def test_settings_env_round_trips():
    s = Settings(prefix="x", scenarios=("a", "b"), partitions=5, refine=False, park_timeout_s=1.5, refine_threads=1)
    assert Settings.from_env(settings_env(s)) == s


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MIRSTREAM_PARTITIONS": "zero"}, "MIRSTREAM_PARTITIONS"),
        ({"MIRSTREAM_PARTITIONS": "0"}, "partitions"),
        ({"MIRSTREAM_SCENARIOS": "feed,bad name"}, "scenario"),
        ({"MIRSTREAM_REFINE_THREADS": "-1"}, "refine_threads"),
        ({"MIRSTREAM_MAX_POLL_RECORDS": "-1"}, "max_poll_records"),
        ({"MIRSTREAM_STREAM_BUFFER": "0"}, "stream_buffer"),
    ],
)
def test_bad_settings_are_clear(env, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env)


@pytest.mark.parametrize("bind", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_loopback_bind_needs_no_token(bind):
    assert Settings.from_env({"MIRSTREAM_WEB_BIND": bind}).web_token == ""


@pytest.mark.parametrize("bind", ["0.0.0.0", "10.1.2.3", "::", "worker-1.example"])
def test_bind_beyond_loopback_needs_a_token(bind):
    with pytest.raises(ValueError, match="MIRSTREAM_WEB_TOKEN"):
        Settings.from_env({"MIRSTREAM_WEB_BIND": bind})
    s = Settings.from_env({"MIRSTREAM_WEB_BIND": bind, "MIRSTREAM_WEB_TOKEN": "s3cret"})
    assert s.web_token == "s3cret" and "s3cret" not in repr(s)  # the token never reaches a log line
    assert Settings.from_env(settings_env(s)) == s
