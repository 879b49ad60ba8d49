"""Message validation: every rejection has a reason a person can act on."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.events import Limits, Rejected, origin_signature, parse_event, parse_item

SCEN, ACTS = ("feed", "search", "ads"), ("click", "like", "skip")
GOOD = {"event_id": "e1", "user_id": 42, "item_id": "n7", "scenario": "feed", "action": "like", "ts": 1.7e9}
L, KEY, NOW = Limits(65536), b"k" * 32, 1.8e9
SIG = origin_signature(KEY, "t:1:5", "e1", "42")


def test_good_event_and_replayed_origin():
    e = parse_event(orjson.dumps(GOOD), "feed", SCEN, ACTS, L, KEY, NOW)
    assert (e.user_id, e.item_id, e.scenario, e.action, e.origin) == ("42", "n7", 0, 1, None)
    e = parse_event(orjson.dumps(dict(GOOD, _origin="t:1:5", _sig=SIG)), "feed", SCEN, ACTS, L, KEY, NOW)
    assert e.origin == "t:1:5"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"scenario": "ads"}, "sent to the 'feed' topic"),
        ({"user_id": "a{b}"}, "not allowed"),
        ({"user_id": True}, "user_id"),
        ({"ts": -1}, "'ts'"),
        ({"query": 5}, "'query'"),
        ({"_origin": "x"}, "'_origin'"),
        ({"_origin": "a:b:c"}, "'_origin'"),
        ({"_origin": 7}, "'_origin'"),
        ({"_origin": "t:1:5"}, "only by the parking path"),  # a producer cannot claim to be a parked copy
        ({"_origin": "t:1:5", "_sig": SIG[:-1] + "0"}, "wrong '_sig'"),
        ({"_origin": "t:1:5", "_sig": SIG, "event_id": "e2"}, "wrong '_sig'"),  # signed for another event
        ({"ts": 1e300}, "ahead of the worker's clock"),
        ({"ts": 4.1e9}, "ahead of the worker's clock"),  # the year 2099
        ({"user_id": "a\u202eb"}, "bidi"),  # right-to-left override: log injection
        ({"item_id": "a\x1b[31mb"}, "control"),
        ({"event_id": "a\nb"}, "control"),
    ],
)
def test_bad_events(change, reason):
    with pytest.raises(Rejected, match=reason):
        parse_event(orjson.dumps(dict(GOOD, **change)), "feed", SCEN, ACTS, L, KEY, NOW)


def test_age_bound_is_off_by_default_and_applies_when_set():
    old = orjson.dumps(dict(GOOD, ts=8.9e8))  # a 1998 log line: replays of old logs are normal
    assert parse_event(old, "feed", SCEN, ACTS, L, KEY, NOW).ts == 8.9e8
    with pytest.raises(Rejected, match="old"):
        parse_event(old, "feed", SCEN, ACTS, Limits(65536, max_age_s=86400.0 * 365), KEY, NOW)


def test_items():
    assert parse_item(orjson.dumps({"item_id": "n1", "text": "a title"}), 4, 65536).vector is None
    assert parse_item(orjson.dumps({"item_id": "n1", "vector": [1, 0, 0, 0]}), 4, 65536).vector.shape == (4,)
    with pytest.raises(Rejected, match="all zeros"):
        parse_item(orjson.dumps({"item_id": "n1", "vector": [0, 0, 0, 0]}), 4, 65536)
    with pytest.raises(Rejected, match="beyond"):
        parse_item(orjson.dumps({"item_id": "n1", "vector": [1e38, 0, 0, 0]}), 4, 65536)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.dictionaries(
            st.text(max_size=10),
            st.none() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=10) | st.floats(),
            max_size=8,
        ).map(orjson.dumps),
    )
)
def test_arbitrary_bytes_are_parsed_or_rejected_never_crash(raw):
    for parse in (lambda r: parse_event(r, "feed", SCEN, ACTS, Limits(256), KEY, NOW), lambda r: parse_item(r, 4, 256)):
        try:
            parse(raw)
        except Rejected as exc:
            assert str(exc)
