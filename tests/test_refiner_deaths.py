"""A refiner call that kills the refiner process: the batch is split until the user that kills it is alone
(``streams.refinement.isolate_deaths``), and that user is blamed only when a known-good call right after
its death survives; first on a stand-in call, then on a real process."""

from __future__ import annotations

import asyncio
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest
import torch
from refiner_faults import DiesOnEveryCall, DiesOnOneUser, RaisesOnOneUser

from models.user_model import Checkpoint
from state.users import UserRow
from streams import metrics
from streams.refinement import DIED_ALONE, Refresher, isolate_deaths
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


async def _lives() -> None:  # the probe: a known-good row refines, the process survives it
    return None


async def _dies() -> None:  # the process dies on the known-good row too: the worker's fault, not a user's
    raise BrokenProcessPool("died")


def test_a_user_that_kills_the_process_fails_alone_and_the_rest_refine() -> None:
    calls: list[list[str]] = []
    vectors, failed, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u5"}, calls), _lives))
    assert [None if v is None else int(v[0, 0, 0]) for v in vectors] == [0, 1, 2, 3, 4, None, 6, 7]
    assert failed == {} and errors == {"u5": DIED_ALONE}
    # the whole batch, its halves, then the half of the half that died, then the user alone beside its pair
    halves = [["u0", "u1", "u2", "u3"], ["u4", "u5", "u6", "u7"]]
    assert calls == [[f"u{i}" for i in range(8)], *halves, ["u4", "u5"], ["u6", "u7"], ["u4"], ["u5"]]


def test_two_such_users_in_one_half_each_fail_alone() -> None:
    vectors, _, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u0", "u1"}, []), _lives))
    assert [v is None for v in vectors] == [True, True] + [False] * 6 and sorted(errors) == ["u0", "u1"]


def test_such_users_in_both_halves_each_fail_alone_when_the_probe_survives() -> None:
    """Both halves kill the process; the probe does not, so the deaths are the users': both halves are
    split further and the other six users refine."""
    vectors, _, errors = asyncio.run(isolate_deaths(_rows(8), _dies_on({"u1", "u6"}, []), _lives))
    assert [v is None for v in vectors] == [i in (1, 6) for i in range(8)] and sorted(errors) == ["u1", "u6"]


def test_a_death_the_probe_shares_is_pinned_on_no_user() -> None:
    """The probe dies too (the worker's fault): it raises and the batch stays dirty, whether every call
    dies, one user's call did (a fault that began mid-bisection), or the batch holds one user."""
    with pytest.raises(BrokenProcessPool):
        asyncio.run(isolate_deaths(_rows(8), _dies_on({f"u{i}" for i in range(8)}, []), _dies))
    with pytest.raises(BrokenProcessPool):
        asyncio.run(isolate_deaths(_rows(8), _dies_on({"u5"}, []), _dies))
    with pytest.raises(BrokenProcessPool):
        asyncio.run(isolate_deaths(_rows(1), _dies_on({"u0"}, []), _dies))
    calls: list[list[str]] = []
    assert asyncio.run(isolate_deaths(_rows(3), _dies_on(set(), calls), _dies))[2] == {} and len(calls) == 1


def test_a_one_user_batch_that_kills_the_process_fails_alone_when_the_probe_survives() -> None:
    assert asyncio.run(isolate_deaths(_rows(1), _dies_on({"u0"}, []), _lives)) == ([None], {}, {"u0": DIED_ALONE})


@pytest.fixture(scope="module")
def refresher_of(sim_checkpoint):
    """A refresher in process mode whose refiner computation has a fault (default: it dies on user ``bad``)."""
    made: list[Refresher] = []

    def make(ckpt: Checkpoint, kind: type = DiesOnOneUser) -> Refresher:
        settings = Settings(checkpoint=str(sim_checkpoint), refine_threads=1)
        r = Refresher(settings, ckpt, None, None, None, rows=kind(ckpt, 100), process=True)  # type: ignore[arg-type]
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def _deaths() -> float:
    return metrics.AGENT_ERRORS.labels("refine", "process_died")._value.get()


def test_a_real_refiner_process_killed_by_one_user(sim_checkpoint, refresher_of) -> None:
    """The process really dies (``os._exit``) on the batch holding ``bad``; the others get the vectors the
    same computation gives in a thread, ``bad`` gets an error (it stays dirty)."""
    ckpt = Checkpoint.load(sim_checkpoint)
    rows = [UserRow(u) for u in ("a", "b", "bad", "c")]
    refresher = refresher_of(ckpt)
    vectors, failed, errors = asyncio.run(refresher.run(rows, {}))
    assert vectors[2] is None and failed == {} and list(errors) == ["bad"]
    alone = DiesOnOneUser(ckpt, 100).vectors([rows[i] for i in (0, 1, 3)], {})
    for got, want in zip([vectors[i] for i in (0, 1, 3)], alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)
    # On its next tick a user that failed alone (``retries``) is refined on its own, after the rest: one
    # death, not a bisection; the results keep the rows' order.
    refresher.retries["bad"] = (0, 1)
    before = _deaths()
    again = asyncio.run(refresher.run(rows, {}))
    assert _deaths() - before == 1 and again[2] == {"bad": DIED_ALONE} and again[0][2] is None
    for got, want in zip([again[0][i] for i in (0, 1, 3)], alone, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_a_refiner_process_that_dies_on_every_model_call_blames_no_user(sim_checkpoint, refresher_of) -> None:
    """A fault of the worker that a call refining nobody would not show: the probe refines a row, dies
    too, and the batch stays dirty (raised) instead of every user in it being blamed."""
    ckpt = Checkpoint.load(sim_checkpoint)
    with pytest.raises(BrokenProcessPool):
        asyncio.run(refresher_of(ckpt, DiesOnEveryCall).run([UserRow("a"), UserRow("b")], {}))


def test_a_refiner_process_with_other_weights_under_the_same_version_is_refused(sim_checkpoint, refresher_of) -> None:
    """The worker's checkpoint and the process's differ in one weight, not in ``VERSION``: refused."""
    ckpt = Checkpoint.load(sim_checkpoint)
    with torch.no_grad():
        next(ckpt.model.parameters()).add_(1e-3)
    assert ckpt.version == Checkpoint.load(sim_checkpoint).version
    with pytest.raises(RuntimeError, match="changed; restart"):
        asyncio.run(refresher_of(ckpt).run([UserRow("a")], {}))


def test_a_suspected_user_whose_call_raises_fails_alone_and_the_rest_are_kept(sim_checkpoint, refresher_of) -> None:
    """A user that failed alone before and now raises in its call of its own (one row: ``RowRefiner.refine``
    re-raises) fails alone once the probe survives; the rest of the batch keeps its vectors."""
    ckpt = Checkpoint.load(sim_checkpoint)
    refresher = refresher_of(ckpt, RaisesOnOneUser)
    rows = [UserRow(u) for u in ("a", "bad", "b")]
    first = asyncio.run(refresher.run(rows, {}))  # the batch fails, each row alone: ``bad`` fails alone
    assert first[0][1] is None and list(first[2]) == ["bad"]
    refresher.retries["bad"] = (0, 1)
    vectors, failed, errors = asyncio.run(refresher.run(rows, {}))
    assert failed == {} and errors == {"bad": "RuntimeError: a fault that follows user bad"}
    assert vectors[1] is None and all(v is not None for v in (vectors[0], vectors[2]))


def test_a_stop_during_the_probe_blames_nobody(sim_checkpoint, refresher_of) -> None:
    """The worker stops while the probe runs: the probe's call finishes, but no user is blamed on the way out."""
    ckpt = Checkpoint.load(sim_checkpoint)
    refresher = refresher_of(ckpt)
    submit = refresher._submit

    async def stop_at_the_probe(what, fn, *args):
        got = await submit(what, fn, *args)
        if what == "the probe":
            refresher._closed = True
        return got

    refresher._submit = stop_at_the_probe
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(refresher.run([UserRow("bad")], {}))
