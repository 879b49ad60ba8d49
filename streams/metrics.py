"""Prometheus metrics of a worker, served at ``GET /metrics`` by the Faust web server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry()
EVENTS = Counter("mirstream_events_total", "events applied to user state", ["scenario"], registry=REGISTRY)
DUPLICATES = Counter(
    "mirstream_duplicates_total", "redelivered events skipped by the watermark", ["scenario"], registry=REGISTRY
)
DEADLETTER = Counter(
    "mirstream_deadletter_total", "messages sent to the dead-letter topic", ["source"], registry=REGISTRY
)
PARKED = Counter("mirstream_parked_total", "events parked until their item arrives", registry=REGISTRY)
ITEMS = Counter("mirstream_items_total", "items encoded and stored", registry=REGISTRY)
ITEMS_RECODED = Counter(
    "mirstream_items_recoded_total", "item codes re-encoded from another codebook", registry=REGISTRY
)
USERS_REBUILT = Counter(
    "mirstream_users_rebuilt_total",
    "user states rebuilt for this checkpoint (codebook or model change)",
    registry=REGISTRY,
)
REFINEMENTS = Counter("mirstream_refinements_total", "user refinements written", registry=REGISTRY)
CONFLICTS = Counter("mirstream_cas_conflicts_total", "per-user compare-and-set retries", registry=REGISTRY)
HANDOFFS = Counter(
    "mirstream_handoffs_total",
    "fetched messages handed to the streams (streams.consumer): at once, or after waiting (a full stream buffer)",
    ["path"],
    registry=REGISTRY,
)
FRESHNESS = Histogram(
    "mirstream_freshness_seconds",
    "event produced to Kafka → its user's vectors written",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60),
    registry=REGISTRY,
)
BATCH = Histogram("mirstream_batch_seconds", "time to apply one agent batch", ["agent"], registry=REGISTRY)
REFINE_BATCH = Histogram("mirstream_refine_batch_seconds", "time of one refiner call", registry=REGISTRY)
LAG = Gauge(
    "mirstream_consumer_lag", "high-water mark minus next offset to process", ["topic", "partition"], registry=REGISTRY
)
AGENT_ERRORS = Counter(
    "mirstream_agent_errors_total",
    "errors an agent met: transient ones it retried, poison users it isolated, fatal ones that stopped it",
    ["agent", "reason"],
    registry=REGISTRY,
)
QUARANTINED = Gauge(
    "mirstream_quarantined_users", "users whose refinement failed, set aside until retried", registry=REGISTRY
)
LAST_PROGRESS = Gauge(
    "mirstream_last_progress_timestamp_seconds",
    "when an agent last finished a batch (unix time)",
    ["agent"],
    registry=REGISTRY,
)
