"""Kafka message parsing. Anything that fails here goes to the dead-letter topic with the reason.

The fields and their checks are ``models.schema`` (shared with the file readers); this module adds what
only Kafka has: the byte limit, the topic a scenario belongs to, the worker's clock (no far-future
dates), the parking origin and its signature.

Event (``<prefix>.events.<scenario>``, key = user_id):
    {"event_id": "e1", "user_id": "42", "item_id": "n7", "scenario": "feed", "action": "click",
     "ts": 1700000000.0, "query": "optional search text"}
Item (``<prefix>.items``, key = item_id):
    {"item_id": "n7", "text": "title and content", "vector": [0.1, ...]}   (text and/or vector)
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import orjson

from models.schema import MAX_VECTOR_VALUE, Rejected, check_item, event_fields

__all__ = [
    "MAX_VECTOR_VALUE",
    "Event",
    "Item",
    "Limits",
    "Message",
    "Rejected",
    "origin_signature",
    "parse_event",
    "parse_item",
]

_ORIGIN = re.compile(r"[A-Za-z0-9._-]{1,249}:[0-9]{1,9}:[0-9]{1,19}")


@dataclass(frozen=True)
class Limits:
    """Bounds an event must fall in (``Settings``: ``max_message_bytes``, ``max_future_s``, ``max_age_s``).
    Replays of old logs are normal, so the age bound is off by default; a date ahead of the clock is not."""

    max_bytes: int = 65536
    max_future_s: float = 86400.0  # ts at most this far ahead of the worker's clock
    max_age_s: float = 0.0  # ts at most this far behind it (0: no bound)


def origin_signature(key: bytes, origin: str, event_id: str, user_id: str) -> str:
    """What the parking path writes next to ``_origin`` (``_sig``): only a holder of the deployment's key
    (kept in Redis, ``state.store.StreamStore.origin_key``) can make a producer's message look like a
    re-produced parked event, whose copy the planner would otherwise trust."""
    mac = hmac.new(key, f"{origin}|{event_id}|{user_id}".encode(), hashlib.sha256)
    return mac.hexdigest()[:32]


class Message(NamedTuple):
    """A raw Kafka message as the agents see it (a named tuple: immutable, and built per message at a
    fraction of a frozen dataclass's cost)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float  # producer time, seconds


class Event(NamedTuple):
    """A parsed event, with the checkpoint's scenario and action ids (a named tuple, as ``Message``)."""

    event_id: str
    user_id: str
    item_id: str
    scenario: int
    action: int
    ts: float
    query: str = ""
    #: Set on an event re-produced from the parking list: "topic:partition:offset" of its first delivery.
    origin: str | None = None


@dataclass(frozen=True)
class Item:
    item_id: str
    text: str | None
    vector: np.ndarray | None


def _object(raw: bytes, max_bytes: int) -> dict:
    if len(raw) > max_bytes:
        raise Rejected(f"message of {len(raw)} bytes is over the {max_bytes}-byte limit")
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Rejected(f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejected("message must be a JSON object")
    return data


def parse_event(
    raw: bytes,
    topic_scenario: str,
    scenarios: tuple[str, ...],
    actions: tuple[str, ...],
    limits: Limits,
    origin_key: bytes | None = None,
    now: float | None = None,
) -> Event:
    """A valid event, or ``Rejected`` with the reason.  ``origin_key``: the key re-produced parked events
    are signed with (None: no event may carry ``_origin``); ``now``: the worker's clock."""
    data = _object(raw, limits.max_bytes)
    # the shared schema (models.schema), its fields as a tuple: one object per message, the Event
    event_id, user_id, item_id, scenario, action, ts, query = event_fields(data, scenarios, actions, require_id=True)
    if scenario != topic_scenario:
        raise Rejected(f"scenario {scenario!r} sent to the {topic_scenario!r} topic")
    now = time.time() if now is None else now
    if ts > now + limits.max_future_s:
        raise Rejected(f"field 'ts' ({ts:.6g}) is more than {limits.max_future_s:g} s ahead of the worker's clock")
    if limits.max_age_s and ts < now - limits.max_age_s:
        raise Rejected(f"field 'ts' ({ts:.6g}) is more than {limits.max_age_s:g} s old (max_age_s)")
    origin = data.get("_origin")
    if origin is not None:
        if not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
            raise Rejected("field '_origin' must be 'topic:partition:offset' (set only by the parking path)")
        sig = data.get("_sig")
        want = origin_signature(origin_key, origin, event_id, user_id) if origin_key is not None else None
        if want is None or not (isinstance(sig, str) and hmac.compare_digest(sig, want)):
            raise Rejected("field '_origin' is set only by the parking path (missing or wrong '_sig')")
    return Event(event_id, user_id, item_id, scenarios.index(scenario), actions.index(action), ts, query, origin)


def parse_item(raw: bytes, dim: int, max_bytes: int) -> Item:
    rec = check_item(_object(raw, max_bytes), dim)
    return Item(rec.item_id, rec.text, rec.vector)
