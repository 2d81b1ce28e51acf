"""Every ATen operation of the trainer's steps, counted with its size: where a step's work is.

    torchrun --standalone --nproc_per_node=2 replica_dist/experiments/step_ops.py [--first 21]
        [--last 60] [--json FILE] [trainer overrides...]

Runs the trainer itself (replica_dist.train's main, the overrides as on its command line) with
a dispatch mode on from the start of step --first to the start of step --last + 1, so that it
sees everything the loop does between steps too, and prints rank 0's operations per step:
name, the largest tensor it touched (elements), calls per step and their time per step (each
call timed around itself; the dispatch mode's own cost is outside those times, so the sum is
less than the step). Operations over tensors of a model's size are the ones that cost on a
CPU (each a pass over memory); their count is exact where times are noisy. With
--clocks-only nothing is counted: the main thread's CPU time and the wall time per step.

It imports only what every commit of the trainer since its StepTimer has (replica_dist.train's
main, replica_dist.timing.NO_TIMER), so that it runs as a file with another commit's Python in
that commit's tree: that is how docs/benchmark.md compares a coupled step before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class OperationCount(TorchDispatchMode):
    """Calls and seconds per (operation, largest tensor's elements), of the steps in [first, last]."""

    def __init__(self, first: int, last: int):
        super().__init__()
        self.first, self.last, self.step = first, last, 0
        self.calls: dict[tuple[str, int], list] = defaultdict(lambda: [0, 0.0])
        self.clocks: dict[str, float] = {}
        """The main thread's CPU seconds and the wall seconds over the steps, when not counting."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        began = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        seconds = time.perf_counter() - began
        tensors = [t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        entry = self.calls[(str(func), max((t.numel() for t in tensors), default=0))]
        entry[0] += 1
        entry[1] += seconds
        return out

    def rows(self) -> list[dict]:
        steps = self.last - self.first + 1
        return sorted(
            (
                {
                    "op": op,
                    "numel": numel,
                    "calls_per_step": calls / steps,
                    "ms_per_step": seconds / steps * 1e3,
                }
                for (op, numel), (calls, seconds) in self.calls.items()
            ),
            key=lambda row: -row["ms_per_step"],
        )


def count_steps(first: int, last: int, overrides: list[str], count: bool = True) -> OperationCount:
    """Train with `overrides`, counting the operations of steps first..last (the counter is
    entered and left by the trainer's StepTimer, whose start_step every step calls); with
    count=False only the clocks run over those steps, with nothing in the way of the step."""
    from replica_dist import timing, train

    counter = OperationCount(first, last)
    no_timer = type(timing.NO_TIMER)
    original = no_timer.start_step

    def start_step(self):
        counter.step += 1
        if counter.step in (first, last + 1):
            now = {"cpu": time.thread_time(), "wall": time.perf_counter()}
            if counter.step == first:
                counter.clocks = now
            else:
                counter.clocks = {clock: now[clock] - began for clock, began in counter.clocks.items()}
            if count:
                counter.__enter__() if counter.step == first else counter.__exit__(None, None, None)
        original(self)

    no_timer.start_step = start_step
    try:
        status = train.main(overrides)
    finally:
        no_timer.start_step = original
    if status:
        raise SystemExit(status)
    return counter


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", type=int, default=21, help="first step counted (after warm-up)")
    parser.add_argument("--last", type=int, default=60, help="last step counted (train.steps must exceed it)")
    parser.add_argument("--json", type=Path, help="also write the rows (JSON) here")
    parser.add_argument(
        "--min-numel", type=int, default=0, help="print only operations on tensors this large"
    )
    parser.add_argument(
        "--clocks-only",
        action="store_true",
        help="count nothing: the main thread's CPU time and the wall time per step (CPU time "
        "is what other processes on a loaded machine disturb least)",
    )
    args, overrides = parser.parse_known_args(argv)
    counter = count_steps(args.first, args.last, overrides, count=not args.clocks_only)
    if os.environ.get("RANK", "0") != "0":  # the process group is gone: torchrun's rank
        return 0
    if args.clocks_only:
        steps = args.last - args.first + 1
        cpu, wall = (counter.clocks[k] / steps * 1e3 for k in ("cpu", "wall"))
        print(f"steps {args.first}-{args.last}: main thread CPU {cpu:.2f} ms, wall {wall:.2f} ms, per step")
        return 0
    rows = counter.rows()
    total_calls = sum(r["calls_per_step"] for r in rows)
    total_ms = sum(r["ms_per_step"] for r in rows)
    print(
        f"steps {args.first}-{args.last}: {total_calls:.1f} operations, {total_ms:.2f} ms inside them, per step"
    )
    print(f"{'operation':48s} {'largest':>10s} {'calls':>7s} {'ms':>8s}")
    for r in rows:
        if r["numel"] >= args.min_numel:
            print(f"{r['op']:48s} {r['numel']:10d} {r['calls_per_step']:7.2f} {r['ms_per_step']:8.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
