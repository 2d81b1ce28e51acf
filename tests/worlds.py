"""Run a function in N real gloo processes on CPU (started by a forkserver, FileStore rendezvous)."""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from replica_dist import dist

COLLECTIVE_TIMEOUT_S = 30.0
"""Every collective in a test fails after this long instead of hanging."""


class InjectedFailure(RuntimeError):
    """The crash a test injects into a worker (fail_at_batch)."""


def fail_at_batch(batches_class: type, call: int) -> None:
    """Make this process's `batches_class.next` raise InjectedFailure at its `call`-th call (the
    step of that number, without gradient accumulation): a worker that crashes mid-run."""
    original, calls = batches_class.next, [0]

    def failing_next(self):
        calls[0] += 1
        if calls[0] == call:
            raise InjectedFailure(f"injected failure at step {call}")
        return original(self)

    batches_class.next = failing_next


def _entry(rank: int, fn, world_size: int, store_path: str, collective_timeout_s: float, args: tuple) -> None:
    torch.set_num_threads(1)  # N processes share 2 cores
    store = tdist.FileStore(store_path, world_size)
    tdist.init_process_group(
        "gloo", store=store, rank=rank, world_size=world_size, timeout=timedelta(seconds=collective_timeout_s)
    )
    try:
        fn(rank, world_size, *args)
    finally:
        # As the trainer's own teardown does: objects in reference cycles that hold the process
        # group would otherwise be freed during interpreter exit, after it is destroyed, which
        # once aborted a child here ("terminate called without an active exception").
        dist.teardown()


# Each rank is forked from one server process that has imported these once, instead of being
# spawned and importing torch, the package and tensorboard again (seconds per rank, on every
# world of every test). The server is a fresh interpreter that has run nothing: the ranks start
# as clean as spawned ones. Optional modules are preloaded only where this process imported
# them (a torchvision built for another torch raises RuntimeError, which would end the server).
_PRELOAD = ["torch", "numpy", "replica_dist.loop", "replica_dist.train"]
_PRELOAD_IF_IMPORTED = ["pytest", "runs", "torchvision"]


def _start_method() -> str:
    mp.set_forkserver_preload(_PRELOAD + [m for m in _PRELOAD_IF_IMPORTED if m in sys.modules])
    return "forkserver"


def run_world(
    fn, world_size: int, *args, timeout_s: float = 240.0, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S
) -> None:
    """Call fn(rank, world_size, *args) in `world_size` processes; re-raise a child's error.
    The ranks see the environment and working directory of the first call (the server's)."""
    store_dir = tempfile.mkdtemp(prefix="replica_dist_store_")
    context = mp.start_processes(
        _entry,
        args=(fn, world_size, os.path.join(store_dir, "store"), collective_timeout_s, args),
        nprocs=world_size,
        join=False,
        start_method=_start_method(),
    )
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"world of {world_size} processes did not finish in {timeout_s} s")
