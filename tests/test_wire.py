"""The asyncio client's hiredis packing (``state.wire``) against redis-py's own packer."""

from __future__ import annotations

import pytest
from redis.asyncio.connection import Connection, SSLConnection
from redis.exceptions import DataError

from state import wire
from state.store import connect_async

COMMANDS = [
    ("EVALSHA", "a" * 40, 3, "k:1", b"k:\xff", "\u00e9t\u00e9", 0, -7, 2**70, 1.5, 0.1, 1e-20, 1 / 3, float("inf")),
    ("SCRIPT LOAD", "return 1"),  # a name with a space: two arguments
    (b"CLIENT SETNAME", b"w"),
    ("SET", "k", b"x" * 100_000),  # past redis-py's buffer cutoff
    ("HSET", "k", "f", memoryview(b"bytes")),  # hiredis refuses a memoryview: redis-py packs it
    ("EVALSHA", "s", 2000, *[f"u:{i}" for i in range(2000)], *[str(i).encode() * 3 for i in range(2000)]),
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: str(a[0]))
@pytest.mark.parametrize("base", [Connection, SSLConnection])
def test_hiredis_packing_writes_what_redis_py_writes(args: tuple, base: type) -> None:
    conn = wire.packed(base)()
    assert isinstance(conn, base)
    assert b"".join(conn.pack_command(*args)) == wire.redis_pack(conn, *args)
    assert b"".join(conn.pack_commands([args, ("PING",)])) == wire.redis_pack(conn, *args) + wire.redis_pack(
        conn, "PING"
    )


def test_arguments_redis_py_refuses_are_still_refused() -> None:
    conn = wire.packed(Connection)()
    for bad in (True, None):
        with pytest.raises(DataError):
            conn.pack_command("SET", "k", bad)


def test_the_workers_client_packs_with_hiredis_for_plain_and_tls_urls() -> None:
    for url, base in (("redis://127.0.0.1:1/0", Connection), ("rediss://127.0.0.1:1/0", SSLConnection)):
        cls = connect_async(url).connection_pool.connection_class
        assert issubclass(cls, wire.HiredisPacking) and issubclass(cls, base)
    assert wire.packed(wire.packed(Connection)) is wire.packed(Connection)
