"""A failed test takes its processes with it.

pytest-timeout (pyproject: `timeout`, method "signal") fails a hung test by raising in it; what
that test started may still be running: torchrun's workers sit in sessions of their own, a
world's ranks are children of the forkserver, and either would go on holding cores, ports and
run directories while the next tests run. Every test therefore runs with a variable of its own
in the environment that its subprocesses inherit, and after a failed test every process that
still carries it, and every rank the forkserver still holds, is killed. After a passed test
nothing is touched: the processes it leaves are the shared helpers (the forkserver,
multiprocessing's resource tracker, a compile pool), which later tests use.
"""

from __future__ import annotations

import itertools
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import signal
import time

import pytest

pytest_plugins = ["pytester"]

TEST_ID_VARIABLE = "REPLICA_DIST_TEST_ID"
"""Names, in a process's environment, the test (of this pytest process) that started it."""

_test_ids = itertools.count()


def _environment(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return environ.read().split(b"\0")
    except OSError:  # ended meanwhile, or another user's
        return []


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as children:
            return [int(child) for child in children.read().split()]
    except OSError:
        return []


def _shared_helpers() -> set[int]:
    pids = {
        multiprocessing.forkserver._forkserver._forkserver_pid,
        multiprocessing.resource_tracker._resource_tracker._pid,
    }
    return {pid for pid in pids if pid is not None}


def _left_behind(test_id: str) -> set[int]:
    """The processes of one test that are still running: those that inherited its variable, and
    the forkserver's children (the ranks of a world that has not ended)."""
    marker = f"{TEST_ID_VARIABLE}={test_id}".encode()
    pids = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
    carrying = {pid for pid in pids if marker in _environment(pid)}
    ranks = {child for helper in _shared_helpers() for child in _children(helper)}
    return (carrying | ranks) - _shared_helpers() - {os.getpid()}


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # Reap this process's own children among them; the others have parents (or init) of their own.
    deadline = time.monotonic() + 5
    own = {pid for pid in pids if os.path.exists(f"/proc/{pid}") and pid in _children(os.getpid())}
    while own and time.monotonic() < deadline:
        for pid in list(own):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    own.discard(pid)
            except ChildProcessError:  # a Popen object reaped it
                own.discard(pid)
        time.sleep(0.05)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if outcome.get_result().failed:
        item._replica_dist_failed = True


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    test_id = f"{os.getpid()}-{next(_test_ids)}"
    previous = os.environ.get(TEST_ID_VARIABLE)
    os.environ[TEST_ID_VARIABLE] = test_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TEST_ID_VARIABLE, None)
        else:
            os.environ[TEST_ID_VARIABLE] = previous
        if getattr(item, "_replica_dist_failed", False):
            _kill(_left_behind(test_id))
