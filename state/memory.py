"""The reference implementation of the users' Lua scripts, in plain Python and in memory.

``state.scripts`` runs these steps atomically inside Redis; this class does the same steps the slow,
obvious way so the planner's race cases can be unit-tested without a server, and
``tests/test_state_parity_integration.py`` checks that both give the same bytes for the same calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from state.users import (
    COARSE_IN_STATE,
    MARKS,
    MARKS_CAP,
    ROW_FIELDS,
    Applied,
    UserRow,
    UserUpdate,
    applied_mark,
    parked_mark,
    parse_row,
    read_args,
)


@dataclass
class MemoryUsers:
    state: dict[str, dict[str, bytes]] = field(default_factory=dict)  # user → state hash
    coarse: dict[str, bytes] = field(default_factory=dict)  # user → coarse state (a key of its own)
    history: dict[str, bytes] = field(default_factory=dict)
    parked_lists: dict[str, list[bytes]] = field(default_factory=dict)  # item → parked events

    def read(self, user: str, watermarks: list[str], origins: list[str]) -> UserRow:
        """``READ_USER``."""
        h = self.state.get(user, {})
        names = [*ROW_FIELDS, *read_args(watermarks, origins)]
        coarse = self.coarse.get(user, h.get(COARSE_IN_STATE))  # the hash field of a state from before
        return parse_row(user, [h.get(n) for n in names] + [coarse, self.history.get(user)], watermarks, origins)

    def _version_ok(self, user: str, version: int, state_id: str | None) -> bool:
        h = self.state.get(user, {})
        return int(h.get("ver", b"0")) == version and h.get("gen", b"").decode() == (state_id or "")

    def mark_parked(self, row: UserRow, origins: tuple[str, ...]) -> bool:
        """``MARK_PARKED``."""
        if not self._version_ok(row.user, row.version, row.state_id):
            return False
        h = self.state.setdefault(row.user, {})
        ver = int(h.get("ver", b"0")) + 1
        h["ver"] = str(ver).encode()
        for o in origins:
            _mark(h, parked_mark(o), ver)
        _prune(h)
        return True

    def apply(self, user: str, u: UserUpdate) -> Applied | None:
        """``APPLY_USER``."""
        if not self._version_ok(user, u.expected_version, u.expected_state_id):
            return None
        h = self.state.setdefault(user, {})
        seq, ver = int(h.get("seq", b"0")) + u.n_events, int(h.get("ver", b"0")) + 1
        h["ver"], h["seq"] = str(ver).encode(), str(seq).encode()
        if u.coarse is not None:
            self.coarse[user] = u.coarse
            h.pop(COARSE_IN_STATE, None)

        def raise_(name: str, value: float | int, text: str) -> None:
            if name not in h or float(value) > float(h[name]):
                h[name] = text.encode()

        if u.last_ts > 0:
            raise_("last_ts", u.last_ts, repr(float(u.last_ts)))
        if u.kts > 0:
            raise_("kts", u.kts, repr(float(u.kts)))
        if u.history is not None:
            self.history[user] = u.history
        if u.records:  # appended as given: the planner trims
            self.history[user] = self.history.get(user, b"") + u.records
        if self.history.get(user) == b"":
            del self.history[user]
        if u.state_id is not None:
            h["gen"], h["cb"] = u.state_id.encode(), (u.codebook or "").encode()
        if u.backfill is not None:
            h["bts"], h["bids"] = repr(float(u.backfill[0])).encode(), "\n".join(u.backfill[1]).encode()
        for name, offset in u.watermarks.items():
            raise_(name, offset, str(offset))
        for origin in u.applied:
            _mark(h, applied_mark(origin), ver)
            _unmark(h, parked_mark(origin))
        _prune(h)
        return Applied(seq, ver, int(h.get("refined_seq", b"0")))

    def park(self, item: str, body: bytes, max_parked: int) -> bool:
        """``PARK``."""
        lst = self.parked_lists.setdefault(item, [])
        if len(lst) >= max_parked:
            return False
        lst.append(body)
        return True

    def unpark(self, item: str, bodies: list[bytes]) -> int:
        """``UNPARK``: removes each body once, by value."""
        lst, removed = self.parked_lists.get(item, []), 0
        for b in bodies:
            if b in lst:
                lst.remove(b)
                removed += 1
        if not lst:
            self.parked_lists.pop(item, None)
        return removed


def _mark(h: dict[str, bytes], name: str, ver: int) -> None:
    if name not in h:
        h[MARKS] = str(int(h.get(MARKS, b"0")) + 1).encode()
    h[name] = str(ver).encode()


def _unmark(h: dict[str, bytes], name: str) -> None:
    if h.pop(name, None) is not None:
        h[MARKS] = str(int(h.get(MARKS, b"0")) - 1).encode()


def _prune(h: dict[str, bytes]) -> None:
    """Past ``MARKS_CAP`` marks, keep the newest half (by the version that wrote them, then by name)."""
    if int(h.get(MARKS, b"0")) <= MARKS_CAP:
        return
    marks = sorted((int(v), f) for f, v in h.items() if f[:2] in ("o:", "p:"))
    drop = len(marks) - MARKS_CAP // 2
    for _, f in marks[:drop]:
        del h[f]
    h[MARKS] = str(len(marks) - drop).encode()
