"""The web view's pieces that need no Kafka or Redis: the token rule (a real aiohttp server on loopback)
and the percentile the stream page draws from histogram buckets."""

from __future__ import annotations

import math

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from streams.web.auth import COOKIE, token_middlewares
from streams.web.samples import quantile


async def _page(request: web.Request) -> web.Response:
    return web.Response(text="page")


async def _client(token: str) -> TestClient:
    app = web.Application(middlewares=token_middlewares(token))
    for path in ("/metrics", "/health", "/ui", "/users/7/interests", "/router/"):
        app.router.add_get(path, _page)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    return client


async def test_with_a_token_every_page_but_metrics_and_health_needs_it():
    client = await _client("s3cret")
    try:
        for path in ("/ui", "/users/7/interests", "/router/"):
            denied = await client.get(path)
            assert denied.status == 401 and "token" in await denied.text()
            assert (await client.get(path, headers={"Authorization": "Bearer wrong"})).status == 401
            assert (await client.get(path, headers={"Authorization": "Bearer s3cret"})).status == 200
        for path in ("/metrics", "/health"):
            assert (await client.get(path)).status == 200
        linked = await client.get("/ui?token=s3cret")  # a browser link: the answer sets the cookie...
        assert linked.status == 200 and linked.cookies[COOKIE].value == "s3cret"
        assert (await client.get("/users/7/interests")).status == 200  # ...which later requests carry
    finally:
        await client.close()


async def test_without_a_token_nothing_is_asked():
    client = await _client("")
    try:
        assert (await client.get("/users/7/interests")).status == 200
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [(0.1, 0.0), (0.5, 10.0), (1.0, 10.0), (math.inf, 10.0)], 0.3),  # linear inside (0.1, 0.5]
        (0.99, [(0.1, 0.0), (0.5, 5.0), (1.0, 10.0), (math.inf, 10.0)], 0.99),
        (0.99, [(1.0, 1.0), (math.inf, 10.0)], 1.0),  # beyond the last bound: the bound
        (0.5, [(1.0, 0.0), (math.inf, 0.0)], None),  # no observations
    ],
)
def test_quantile_from_histogram_buckets(q, buckets, expected):
    got = quantile(q, buckets)
    assert got == expected if expected is None else got == pytest.approx(expected)


def test_faust_debug_pages_are_off_unless_asked_for():
    """/router/, /table/, /graph and the stats index show a worker's internals: not served by default."""
    from streams.faust_app import make_faust_app
    from streams.settings import Settings

    served = {
        dbg: [p for p, _ in make_faust_app(Settings(web_debug_pages=dbg)).web._enabled_blueprints()]
        for dbg in (False, True)
    }
    assert served[False] == [""]  # Faust's production index only
    assert {"/router", "/table", "/graph"} <= set(served[True])
