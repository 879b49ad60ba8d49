"""How the workers' asyncio Redis client packs commands: hiredis's C packer, not redis-py's Python loop.

redis-py's blocking client packs with hiredis when it is installed; its asyncio client packs every
argument in Python (an encode and a bytes join each).  A bulk script call (``StreamStore._bulk``) carries
thousands of arguments, so that loop was the largest part of a batch's Redis cost: 4,000 arguments take
1.3 ms to pack in Python and 0.27 ms with hiredis, byte for byte the same command
(``tests/test_wire.py`` holds the two equal; ``redis_pack`` is the reference).
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection


def split_name(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """A command name with spaces (``"SCRIPT LOAD"``) sent as separate arguments, as redis-py does."""
    first = args[0]
    if isinstance(first, str):
        return (*first.encode().split(), *args[1:])
    if isinstance(first, bytes) and b" " in first:
        return (*first.split(), *args[1:])
    return args


class HiredisPacking:
    """Mixed into a redis-py asyncio connection class: ``pack_command`` through hiredis.  An argument type
    hiredis does not pack (a memoryview, a bool, None) goes to redis-py's packer, with its errors."""

    def pack_command(self, *args: Any) -> list[bytes]:
        try:
            return [hiredis.pack_command(split_name(args))]
        except TypeError:
            return super().pack_command(*args)  # type: ignore[misc]


_PACKED: dict[type, type] = {}


def packed(cls: type[AbstractConnection]) -> type[AbstractConnection]:
    """``cls`` with ``HiredisPacking`` (one subclass per class, made once)."""
    if issubclass(cls, HiredisPacking):
        return cls
    if cls not in _PACKED:
        _PACKED[cls] = type(f"Packed{cls.__name__}", (HiredisPacking, cls), {})
    return _PACKED[cls]


def redis_pack(conn: AbstractConnection, *args: Any) -> bytes:
    """The command as redis-py's own packer writes it (the reference ``HiredisPacking`` is held to)."""
    return b"".join(AbstractConnection.pack_command(conn, *args))
