"""Builds Faust apps with the settings every worker of this project shares.

Raw codecs only (we parse JSON ourselves with orjson, so a malformed message reaches our
validation instead of crashing Faust's decoder), no Tables (state lives in Redis), earliest
offset for new groups, the cheaper per-message hand-off of ``streams.consumer`` (``eager_handoff``).
The web server binds to ``settings.web_bind`` (loopback by default) and asks for ``settings.web_token``
on every page but ``/metrics`` and ``/health`` when one is set.
"""

from __future__ import annotations

import faust

from streams.consumer import EagerTransport
from streams.security import faust_credentials
from streams.settings import Settings
from streams.web.auth import token_middlewares


def make_faust_app(settings: Settings, app_id: str | None = None) -> faust.App:
    app = faust.App(
        app_id or settings.app_id,
        broker=settings.kafka_url,
        broker_credentials=faust_credentials(settings),
        store="memory://",
        key_serializer="raw",
        value_serializer="raw",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication,
        consumer_auto_offset_reset="earliest",
        datadir=settings.datadir,
        web_enabled=settings.web_port > 0,
        web_port=settings.web_port or 6066,
        web_host=settings.web_host,
        web_bind=settings.web_bind,
        # Every page but /metrics and /health asks for the bearer token when one is set (streams.web.auth).
        web_application_options={"middlewares": token_middlewares(settings.web_token)},
        # Faust's own pages (/router/, /table/, /graph, the stats index) show internals: off unless asked for.
        web_router_enabled=settings.web_debug_pages,
        web_tables_enabled=settings.web_debug_pages,
        web_graph_enabled=settings.web_debug_pages,
        web_stats_enabled=settings.web_debug_pages,
        # Refinement runs in an executor; give slow batches room before Faust calls the worker stuck.
        broker_commit_livelock_soft_timeout=120.0,
        stream_wait_empty=False,
        broker_max_poll_records=settings.max_poll_records or None,
        stream_buffer_maxsize=settings.stream_buffer,
        # How long the group waits for a member that vanished (a crash) before giving its partitions away.
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=max(1.0, settings.session_timeout_s / 4),
    )
    if settings.eager_handoff:  # before anything asks for the transport (``app.topic`` does)
        app.transport = EagerTransport(app.conf.broker_consumer, app)
    return app
