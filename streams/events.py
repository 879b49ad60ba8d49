"""Kafka message parsing. Anything that fails here goes to the dead-letter topic with the reason.

The fields and their checks are ``models.schema`` (shared with the file readers); this module adds what
only Kafka has: the byte limit, the topic a scenario belongs to, the parking origin.

Event (``<prefix>.events.<scenario>``, key = user_id):
    {"event_id": "e1", "user_id": "42", "item_id": "n7", "scenario": "feed", "action": "click",
     "ts": 1700000000.0, "query": "optional search text"}
Item (``<prefix>.items``, key = item_id):
    {"item_id": "n7", "text": "title and content", "vector": [0.1, ...]}   (text and/or vector)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import orjson

from models.schema import Rejected, check_event, check_item

__all__ = ["Event", "Item", "Message", "Rejected", "parse_event", "parse_item"]

_ORIGIN = re.compile(r"[A-Za-z0-9._-]{1,249}:[0-9]{1,9}:[0-9]{1,19}")


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
    raw: bytes, topic_scenario: str, scenarios: tuple[str, ...], actions: tuple[str, ...], max_bytes: int
) -> Event:
    data = _object(raw, max_bytes)
    rec = check_event(data, scenarios, actions, require_id=True)  # the shared schema (models.schema)
    if rec.scenario != topic_scenario:
        raise Rejected(f"scenario {rec.scenario!r} sent to the {topic_scenario!r} topic")
    origin = data.get("_origin")
    if origin is not None and not (isinstance(origin, str) and _ORIGIN.fullmatch(origin)):
        raise Rejected("field '_origin' must be 'topic:partition:offset' (set only by the parking path)")
    return Event(
        rec.event_id,
        rec.user_id,
        rec.item_id,
        scenarios.index(rec.scenario),
        actions.index(rec.action),
        rec.ts,
        rec.query,
        origin,
    )


def parse_item(raw: bytes, dim: int, max_bytes: int) -> Item:
    rec = check_item(_object(raw, max_bytes), dim)
    return Item(rec.item_id, rec.text, rec.vector)
