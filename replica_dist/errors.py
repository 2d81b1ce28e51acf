"""Failures that end a run with one line instead of a traceback.

`ConfigError` (exit status 2; replica_dist.config re-exports it) is a bad setting or input,
found before anything is written. `RunError` (exit status 1) is a failure during the run that the user can
act on: a diverged run, a full disk. Every rank raises it together, in the same step, so that
all stop at once; the entry point prints its message once, from rank 0, as
`replica_dist: error: <message>`, and exits with `exit_status` on every rank.
"""

from __future__ import annotations


def one_line(err: BaseException, with_type: bool = False) -> str:
    """An exception's message folded onto one line (the type's name where it is empty, or
    before it with `with_type`), to quote inside our own one-line messages."""
    text = " ".join(str(err).split())
    if with_type:
        return f"{type(err).__name__}: {text}"
    return text or type(err).__name__


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the offending key."""


class RunError(RuntimeError):
    """A run-time failure with a one-line message (what, where, what to try)."""

    exit_status = 1


class CouplingError(ValueError):
    """ReplicaCoupling (or a coupling form) was used wrongly: calls out of order, an argument
    it cannot take, a model that differs across replicas, a process group that does not fit."""
