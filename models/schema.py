"""The one schema of events and items, for Kafka messages and for files alike.

It lives in ``models/`` (no Kafka, no Redis here) so training code reads user files with the same checks
the stream agents apply to messages: ``streams.events`` parses Kafka messages through ``check_event`` /
``check_item``, ``models.files`` parses JSONL / CSV / Parquet rows through them too.

Event (one behaviour of a user)::

    field      type                 required  notes
    user_id    string or integer    yes       ≤ 128 printable chars (no control/bidi), no ``{ }``
    item_id    string or integer    yes       must be in the item catalogue
    scenario   string               yes       e.g. feed, search, ads (training: every one found in the data)
    action     string               yes       e.g. click, like, skip (training: every one found in the data)
    ts         number (s)           yes       Unix seconds > 0; files also accept a numeric string or ISO-8601
    query      string               no        search text
    event_id   string or integer    Kafka: yes, files: no (then derived from the other fields, see below)

Item (the catalogue)::

    item_id    string or integer    yes
    text       string               one of    title and content; goes through the item tower
    vector     list of numbers      text or   used as is (finite, |x| ≤ 1e4, not all zeros, the model's dim)
    category   string or integer    no        a coarse label, for the diversity figure

An event from a file without ``event_id`` gets ``derived_event_id``: a hash of its user, item, scenario,
action and time, so a replay of a file and a backfill of the same file name each event alike (the stream
and backfill hand over by event time and id, ``streams.backfill``).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

EVENT_FIELDS = ("user_id", "item_id", "scenario", "action", "ts")
EVENT_OPTIONAL = ("query", "event_id")
ITEM_FIELDS = ("item_id",)
ITEM_OPTIONAL = ("text", "vector", "category")
#: Largest absolute value accepted in an item vector (float32 math downstream must stay finite).
MAX_VECTOR_VALUE = 1e4


class Rejected(ValueError):
    """A row or message that cannot be used; ``str(exc)`` is the reason (dead-letter topic, rejects file)."""


@dataclass(frozen=True)
class EventRecord:
    """A valid event with its names (the model's integer ids are assigned by whoever knows the model)."""

    event_id: str
    user_id: str
    item_id: str
    scenario: str
    action: str
    ts: float
    query: str = ""


@dataclass(frozen=True)
class ItemRecord:
    item_id: str
    text: str | None
    vector: np.ndarray | None
    category: str = ""


def ident(value: object, name: str) -> str:
    """An id as stored: a non-empty string or integer, short, without characters that break Redis keys."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise Rejected(f"field {name!r} must be a non-empty string or integer")
    text = str(value)
    if len(text) > 128 or "{" in text or "}" in text or not text.isprintable():
        raise Rejected(f"field {name!r} is too long or has characters not allowed in ids (braces, control, bidi)")
    return text


def parse_ts(value: object, lenient: bool = False) -> float:
    """Seconds since the epoch, positive and finite.  ``lenient`` (files): numeric strings and ISO-8601
    date-times too (no zone given: UTC)."""
    if lenient and isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            try:
                when = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise Rejected(f"unparsable ts: {text[:40]!r} is neither seconds nor an ISO-8601 date-time") from None
            value = (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise Rejected("field 'ts' must be a positive, finite number of seconds")
    return float(value)


def derived_event_id(user: str, item: str, scenario: str, action: str, ts: float) -> str:
    """The id of a file event that has none: the same for the same event in any file."""
    key = f"{user}\x1f{item}\x1f{scenario}\x1f{action}\x1f{ts!r}".encode()
    return "d" + hashlib.blake2b(key, digest_size=10).hexdigest()


def check_event(
    data: dict,
    scenarios: tuple[str, ...] | None = None,
    actions: tuple[str, ...] | None = None,
    lenient: bool = False,
    require_id: bool = False,
) -> EventRecord:
    """A row or message → a valid event, or ``Rejected`` with the reason.  ``scenarios`` / ``actions``: the
    known ones (None: any); ``lenient``: a file row (string numbers, ISO times, empty optional cells)."""
    return EventRecord(*event_fields(data, scenarios, actions, lenient, require_id))


def event_fields(
    data: dict,
    scenarios: tuple[str, ...] | None = None,
    actions: tuple[str, ...] | None = None,
    lenient: bool = False,
    require_id: bool = False,
) -> tuple[str, str, str, str, str, float, str]:
    """``check_event``'s fields in ``EventRecord`` order, without the record (the Kafka parser builds its
    own ``Event`` from them, once per message)."""
    needed = ("event_id", *EVENT_FIELDS) if require_id else EVENT_FIELDS
    missing = [f for f in needed if data.get(f) is None or (lenient and data.get(f) == "")]
    if missing:
        raise Rejected(f"missing fields: {', '.join(missing)}")
    scenario, action = data["scenario"], data["action"]
    if not isinstance(scenario, str) or (scenarios is not None and scenario not in scenarios):
        raise Rejected(f"unknown scenario {scenario!r}; known: {', '.join(scenarios or ())}")
    if not isinstance(action, str) or (actions is not None and action not in actions):
        raise Rejected(f"unknown action {action!r}; known: {', '.join(actions or ())}")
    ts = parse_ts(data["ts"], lenient)
    query = data.get("query") or ""
    if not isinstance(query, str):
        raise Rejected("field 'query' must be a string")
    user, item = ident(data["user_id"], "user_id"), ident(data["item_id"], "item_id")
    raw_id = data.get("event_id")
    event_id = (
        ident(raw_id, "event_id") if raw_id not in (None, "") else derived_event_id(user, item, scenario, action, ts)
    )
    return event_id, user, item, scenario, action, ts, query


def check_vector(vector: object, dim: int | None) -> np.ndarray:
    """A list of numbers (a file may give a JSON list as text) → float32, finite, non-zero, ``dim`` long."""
    if isinstance(vector, np.ndarray):
        vector = vector.tolist()
    if not isinstance(vector, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in vector):
        raise Rejected("field 'vector' must be a list of numbers")
    if dim is not None and len(vector) != dim:
        raise Rejected(f"vector has {len(vector)} dimensions, the model expects {dim}")
    if not all(math.isfinite(x) for x in vector):
        raise Rejected("vector contains NaN or infinite values")
    if max((abs(x) for x in vector), default=0.0) > MAX_VECTOR_VALUE:
        raise Rejected(f"vector has values beyond ±{MAX_VECTOR_VALUE:g} (not a normalised embedding?)")
    vec = np.asarray(vector, dtype=np.float32)
    if len(vec) == 0 or float(np.linalg.norm(vec)) == 0.0:
        raise Rejected("vector is all zeros")
    return vec


def check_item(data: dict, dim: int | None = None, lenient: bool = False) -> ItemRecord:
    """A row or message → a valid item, or ``Rejected``.  ``dim``: the model's item dimension (None: any)."""
    if data.get("item_id") in (None, ""):
        raise Rejected("missing fields: item_id")
    text, vector = data.get("text"), data.get("vector")
    if lenient:
        text = None if text == "" else text
        if vector == "":
            vector = None
        elif isinstance(vector, str):
            vector = _vector_text(vector)
    if text is None and vector is None:
        raise Rejected("an item needs 'text' or 'vector'")
    if text is not None and (not isinstance(text, str) or not text.strip()):
        raise Rejected("field 'text' must be a non-empty string")
    vec = None if vector is None else check_vector(vector, dim)
    category = data.get("category")
    return ItemRecord(ident(data["item_id"], "item_id"), text, vec, "" if category is None else str(category))


def _vector_text(text: str) -> list:
    """A vector in a CSV cell: a JSON list ``[0.1, 0.2]`` or numbers separated by spaces (``null``: NaN)."""
    body = text.strip().removeprefix("[").removesuffix("]").replace(",", " ")
    try:
        return [float("nan") if x.lower() in ("null", "none") else float(x) for x in body.split()]
    except ValueError:
        raise Rejected("field 'vector' must be a list of numbers") from None
