"""Message schemas and validation. Anything that fails here goes to the dead-letter topic with the reason.

Event (``<prefix>.events.<scenario>``, key = user_id):
    {"event_id": "e1", "user_id": "42", "item_id": "n7", "scenario": "feed", "action": "click",
     "ts": 1700000000.0, "query": "optional search text"}
Item (``<prefix>.items``, key = item_id):
    {"item_id": "n7", "text": "title and content", "vector": [0.1, ...]}   (text and/or vector)
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from dataclasses import dataclass

import numpy as np
import orjson

_ORIGIN = re.compile(r"[A-Za-z0-9._-]{1,249}:[0-9]{1,9}:[0-9]{1,19}")
#: Largest absolute value accepted in an item vector (float32 math downstream must stay finite).
MAX_VECTOR_VALUE = 1e4


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


class Rejected(ValueError):
    """A message that cannot be applied; ``str(exc)`` is the reason written to the dead-letter topic."""


@dataclass(frozen=True)
class Message:
    """A raw Kafka message as the agents see it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: float  # producer time, seconds


@dataclass(frozen=True)
class Event:
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


def _ident(value: object, name: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Rejected(f"field {name!r} must be a non-empty string or integer")
    text = str(value)
    if len(text) > 128 or any(c in text for c in "{}") or not text.isprintable():
        raise Rejected(f"field {name!r} is too long or has characters not allowed in ids (braces, control, bidi)")
    return text


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
    missing = [f for f in ("event_id", "user_id", "item_id", "scenario", "action", "ts") if f not in data]
    if missing:
        raise Rejected(f"missing fields: {', '.join(missing)}")
    scenario = data["scenario"]
    if scenario not in scenarios:
        raise Rejected(f"unknown scenario {scenario!r}; known: {', '.join(scenarios)}")
    if scenario != topic_scenario:
        raise Rejected(f"scenario {scenario!r} sent to the {topic_scenario!r} topic")
    action = data["action"]
    if action not in actions:
        raise Rejected(f"unknown action {action!r}; known: {', '.join(actions)}")
    ts = data["ts"]
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
        raise Rejected("field 'ts' must be a positive, finite number of seconds")
    now = time.time() if now is None else now
    if ts > now + limits.max_future_s:
        raise Rejected(f"field 'ts' ({ts:.6g}) is more than {limits.max_future_s:g} s ahead of the worker's clock")
    if limits.max_age_s and ts < now - limits.max_age_s:
        raise Rejected(f"field 'ts' ({ts:.6g}) is more than {limits.max_age_s:g} s old (max_age_s)")
    query = data.get("query") or ""
    if not isinstance(query, str):
        raise Rejected("field 'query' must be a string")
    event_id, user_id = _ident(data["event_id"], "event_id"), _ident(data["user_id"], "user_id")
    origin = data.get("_origin")
    if origin is not None:
        if not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
            raise Rejected("field '_origin' must be 'topic:partition:offset' (set only by the parking path)")
        sig = data.get("_sig")
        if origin_key is None or not (
            isinstance(sig, str) and hmac.compare_digest(sig, origin_signature(origin_key, origin, event_id, user_id))
        ):
            raise Rejected("field '_origin' is set only by the parking path (missing or wrong '_sig')")
    return Event(
        event_id,
        user_id,
        _ident(data["item_id"], "item_id"),
        scenarios.index(scenario),
        actions.index(action),
        float(ts),
        query,
        origin,
    )


def parse_item(raw: bytes, dim: int, max_bytes: int) -> Item:
    data = _object(raw, max_bytes)
    if "item_id" not in data:
        raise Rejected("missing fields: item_id")
    text, vector = data.get("text"), data.get("vector")
    if text is None and vector is None:
        raise Rejected("an item needs 'text' or 'vector'")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise Rejected("field 'text' must be a non-empty string")
    vec = None
    if vector is not None:
        if not isinstance(vector, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector
        ):
            raise Rejected("field 'vector' must be a list of numbers")
        if len(vector) != dim:
            raise Rejected(f"vector has {len(vector)} dimensions, the model expects {dim}")
        if not all(math.isfinite(x) for x in vector):
            raise Rejected("vector contains NaN or infinite values")
        if max((abs(x) for x in vector), default=0.0) > MAX_VECTOR_VALUE:
            raise Rejected(f"vector has values beyond ±{MAX_VECTOR_VALUE:g} (not a normalised embedding?)")
        vec = np.asarray(vector, dtype=np.float32)
        if float(np.linalg.norm(vec)) == 0.0:
            raise Rejected("vector is all zeros")
    return Item(_ident(data["item_id"], "item_id"), text, vec)
