"""The web view's one access rule: with a token set, every page but ``/metrics`` and ``/health`` needs it.

Why a middleware: Faust's own pages (``/router/``, ``/stats/``, ...) are served by the same aiohttp app as
ours, so one check in front of all of them covers pages we did not write.  A worker bound beyond loopback
must have a token (``Settings.validate``); on loopback it is optional.  The token is accepted as
``Authorization: Bearer <token>`` (services), ``?token=<token>`` (a link for a browser; the answer then sets
the ``mirstream_token`` cookie so the page's own requests carry it) or that cookie.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

OPEN_PATHS = ("/metrics", "/health")  # scrapers and load balancers; they show no user data
COOKIE = "mirstream_token"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _given(request: web.Request) -> tuple[str | None, bool]:
    """The token the request carries and whether it came as ``?token=``."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), False
    if "token" in request.query:
        return request.query["token"], True
    return request.cookies.get(COOKIE), False


def token_middlewares(token: str) -> list:
    """The aiohttp middlewares for ``token``: none when it is empty (loopback without a token)."""
    if not token:
        return []
    expected = token.encode()

    @web.middleware
    async def require_token(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.rstrip("/") in OPEN_PATHS:
            return await handler(request)
        given, in_query = _given(request)
        if given is None or not hmac.compare_digest(given.encode(), expected):
            raise web.HTTPUnauthorized(
                text="this page needs the worker's token: Authorization: Bearer <token>, ?token=<token> "
                "or the mirstream_token cookie\n",
                headers={"WWW-Authenticate": 'Bearer realm="mirstream"'},
            )
        response = await handler(request)
        if in_query:
            response.set_cookie(COOKIE, given, httponly=True, samesite="Strict", path="/")
        return response

    return [require_token]
