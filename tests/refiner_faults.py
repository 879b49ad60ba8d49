"""Refiner computations with faults, for tests: importable by name, so a refiner process can build them."""

from __future__ import annotations

import os

from streams.refinement import RowRefiner


class DiesOnOneUser(RowRefiner):
    """The refiner's code in a process that dies (as a crash or the OOM killer ends it) whenever its call
    holds user ``bad``."""

    def vectors(self, rows, books):
        if any(r.user == "bad" for r in rows):
            os._exit(9)
        return super().vectors(rows, books)


class DiesOnEveryCall(RowRefiner):
    """A fault of the worker, not of any user's data: the process dies on every call that runs the model
    (as a broken kernel would), while a call that only asks whether it is up succeeds."""

    def vectors(self, rows, books):
        os._exit(9)


class RaisesOnOneUser(RowRefiner):
    """A fault that follows user ``bad`` as an exception (not on its data), in a process that survives it."""

    def vectors(self, rows, books):
        if any(r.user == "bad" for r in rows):
            raise RuntimeError("a fault that follows user bad")
        return super().vectors(rows, books)
