"""A refiner call that kills the refiner process: the batch is split until the user that kills it is alone
(``streams.refinement.isolate_deaths``), first on a stand-in call, then on a real process."""

from __future__ import annotations

import asyncio
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import torch
from refiner_faults import DiesOnOneUser

from models.user_model import Checkpoint
from state.users import UserRow
from streams.refinement import Refresher, isolate_deaths
from streams.settings import Settings


def _dies_on(bad: set[str], calls: list[list[str]]):
    async def call(rows: list[UserRow]):
        calls.append([r.user for r in rows])
        if any(r.user in bad for r in rows):
            raise BrokenProcessPool("died")
        return [np.full((1, 1, 2), int(r.user[1:]), np.float32) for r in rows], {}, {}

    return call


def _rows(n: int) -> list[UserRow]:
    return [UserRow(f"u{i}") for i in range(n)]


async def _lives() -> None:  # a call that refines nobody, and the process survives it
    return None


async def _dies() -> None:  # the process dies even so: the worker's fault, not a user's
    raise BrokenProcessPool("died")


def test_a_user_that_kills_the_process_fails_alone_and_the_rest_refine() -> None:
    calls: list[list[str]] = []
    vectors, failed, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u5"}, calls), _dies))
    assert [None if v is None else int(v[0, 0, 0]) for v in vectors] == [0, 1, 2, 3, 4, None, 6, 7]
    assert failed == {} and list(errors) == ["u5"] and "died refining this user" in errors["u5"]
    # the whole batch, its halves, then the half of the half that died, then the user alone beside its pair
    halves = [["u0", "u1", "u2", "u3"], ["u4", "u5", "u6", "u7"]]
    assert calls == [[f"u{i}" for i in range(8)], *halves, ["u4", "u5"], ["u6", "u7"], ["u4"], ["u5"]]


def test_two_such_users_in_one_half_each_fail_alone() -> None:
    vectors, _, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u0", "u1"}, []), _dies))
    assert [v is None for v in vectors] == [True, True] + [False] * 6 and sorted(errors) == ["u0", "u1"]


def test_such_users_in_both_halves_each_fail_alone_when_an_empty_call_survives() -> None:
    """Both halves kill the process; a call that refines nobody does not, so the deaths are the users':
    both halves are split further and the other six users refine."""
    vectors, _, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u1", "u6"}, []), _lives))
    assert [v is None for v in vectors] == [i in (1, 6) for i in range(8)] and sorted(errors) == ["u1", "u6"]


def test_deaths_the_empty_call_shares_or_of_one_user_are_not_pinned_on_a_user() -> None:
    """Every call dies (the worker's fault), or a one-user batch dies: it raises and the batch stays dirty."""
    with pytest.raises(BrokenProcessPool):
        asyncio.run(isolate_deaths(_rows(8), _dies_on({f"u{i}" for i in range(8)}, []), _dies))
    with pytest.raises(BrokenProcessPool):
        asyncio.run(isolate_deaths(_rows(1), _dies_on({"u0"}, []), _lives))
    calls: list[list[str]] = []
    assert asyncio.run(isolate_deaths(_rows(3), _dies_on(set(), calls), _dies))[2] == {} and len(calls) == 1


@pytest.fixture(scope="module")
def refresher_of(sim_checkpoint):
    """A refresher in process mode with a refiner computation that dies on user ``bad``."""
    made: list[Refresher] = []

    def make(ckpt: Checkpoint) -> Refresher:
        settings = Settings(checkpoint=str(sim_checkpoint), refine_threads=1)
        r = Refresher(settings, ckpt, None, None, None, rows=DiesOnOneUser(ckpt, 100), process=True)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def test_a_real_refiner_process_killed_by_one_user(sim_checkpoint, refresher_of) -> None:
    """The process really dies (``os._exit``) on the batch holding ``bad``; the others get the vectors the
    same computation gives in a thread, ``bad`` gets an error (it stays dirty)."""
    ckpt = Checkpoint.load(sim_checkpoint)
    rows = [UserRow(u) for u in ("a", "b", "bad", "c")]
    vectors, failed, errors = asyncio.run(refresher_of(ckpt).run(rows, {}))
    assert vectors[2] is None and failed == {} and list(errors) == ["bad"]
    alone = DiesOnOneUser(ckpt, 100).vectors([rows[i] for i in (0, 1, 3)], {})
    for got, want in zip([vectors[i] for i in (0, 1, 3)], alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_refiner_process_with_other_weights_under_the_same_version_is_refused(sim_checkpoint, refresher_of) -> None:
    """The worker's checkpoint and the process's differ in one weight, not in ``VERSION``: refused."""
    ckpt = Checkpoint.load(sim_checkpoint)
    with torch.no_grad():
        next(ckpt.model.parameters()).add_(1e-3)
    assert ckpt.version == Checkpoint.load(sim_checkpoint).version
    with pytest.raises(RuntimeError, match="changed; restart"):
        asyncio.run(refresher_of(ckpt).run([UserRow("a")], {}))
