"""The read-only pages on the worker's own Faust web server: ``/ui`` (the stream) and ``/ui/users/{id}``.

One static HTML shell (``static/ui.html`` + ``ui.js`` + ``ui.css``, no CDN) renders both views from two
JSON documents it polls every second: ``/ui/api/users/{id}`` (``streams.web.userview``) and
``/ui/api/stream`` (``streams.web.samples``).  Polling rather than server-sent events: it survives a worker
restart and a proxy without configuration, and a second of delay is below what the page shows.

Redis unreachable is a state of the page (HTTP 503 with ``status: redis_down``), never an error of the
worker: the handlers catch the transient Redis errors and nothing else.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import quote

import faust

from models.user_model import Checkpoint
from state.store import AsyncInterestReader, StreamStore
from streams.retry import is_transient
from streams.settings import Settings
from streams.web.catalogue import Catalogue
from streams.web.samples import EVERY_S, StreamSamples
from streams.web.userview import user_view

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
TYPES = {"ui.html": "text/html", "ui.js": "text/javascript", "ui.css": "text/css"}
REDIS_TIMEOUT_S = 2.0


def _static(name: str) -> bytes:
    return (STATIC / name).read_bytes()


def _down(exc: BaseException) -> bool:
    """An outage of Redis (answered as a page state), as opposed to a bug (raised)."""
    return isinstance(exc, asyncio.TimeoutError) or is_transient(exc)


def register(
    app: faust.App, settings: Settings, ckpt: Checkpoint, store: StreamStore, reader: AsyncInterestReader
) -> StreamSamples:
    """Adds the pages and the sampling timer to ``app``; returns the sampler (it also keeps dead letters)."""
    samples = StreamSamples(settings, store)
    catalogue = Catalogue(reader, trend_tau_s=ckpt.model.trend_tau_s)
    shell = {"content_type": "text/html", "headers": {"Cache-Control": "no-store"}}

    @app.timer(interval=EVERY_S)
    async def ui_sample() -> None:
        await samples.sample()

    @app.page("/ui")
    async def ui_stream(web, request):
        return web.bytes(_static("ui.html"), **shell)

    @app.page("/ui/users")
    async def ui_find_user(web, request):  # the search box without JavaScript: /ui/users?id=7
        user = request.query.get("id", "").strip()
        target = f"/ui/users/{quote(user, safe='')}" if user else "/ui"
        return web.text("", status=303, headers={"Location": target})

    @app.page("/ui/users/{user_id}")
    async def ui_user(web, request, user_id: str):
        return web.bytes(_static("ui.html"), **shell)

    @app.page("/ui/static/{name}")
    async def ui_static(web, request, name: str):
        if name not in TYPES:
            return web.text(f"no static file {name!r}\n", status=404)
        return web.bytes(_static(name), content_type=TYPES[name], headers={"Cache-Control": "no-cache"})

    @app.page("/ui/api/users/{user_id}")
    async def ui_api_user(web, request, user_id: str):
        try:
            status, body = await asyncio.wait_for(user_view(ckpt, reader, catalogue, user_id), REDIS_TIMEOUT_S)
        except Exception as exc:
            if not _down(exc):
                raise
            log.warning("user page of %s: Redis unreachable (%s: %s)", user_id, type(exc).__name__, exc)
            message = f"Redis unreachable: {exc or type(exc).__name__}"
            body = {"user": user_id, "status": "redis_down", "message": message}
            return web.json(body, status=503)
        return web.json(body, status=status)

    @app.page("/ui/api/stream")
    async def ui_api_stream(web, request):
        return web.json(samples.series())

    return samples
