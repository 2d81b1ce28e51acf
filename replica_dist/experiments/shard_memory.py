"""What each rank holds and sends with sharded replicas (parallel.shard = S, issue 26), per rank.

    python -m replica_dist.experiments.shard_memory [--shards 1,2,4] [--replicas 2] [--steps 6]
        [--hidden 1024,1024] [--batch 64] [--report FILE.md] [overrides...]

For each S, one torchrun job of replicas x S gloo processes trains the same model (the
benchmark's mlp on digits) through the trainer itself (`loop.train`) for `--steps` steps, and
each rank reports:

    params, grads, optimizer   bytes of the tensors the rank holds at the end of each step:
                               the local shard (`to_local()`) of each parameter, of its gradient
                               and of each tensor of its optimizer state (momentum; Adam's two
                               moments), counted exactly; the most over the steps
    peak RSS                   the process's peak resident set over the steps that neither
                               start (building the whole model before sharding it) nor end the
                               run (logging, evaluation, the gathered weights), with the
                               benchmark's probe (bench._memory_probe: reset every step, glibc's
                               mmap threshold fixed so that freed tensors leave the resident set)
    ru_maxrss                  the process's peak resident set over its whole life
    sent / step                the bytes the rank handed to the coupling's collectives per step
                               (summary.json's comm.bytes_sent_per_rank over the steps: the
                               coupling's own count, the diagnostics' exchanges left out)

The trainer is not changed: the benchmark keeps a reference to the optimizer that
`loop.build_optimizer` returns (whose parameter groups hold the model's parameters) and counts
at the end of each step through the StepTimer that `loop.train` already takes.
Extra arguments are trainer overrides applied to every job (e.g. coupling=average).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.tensor import DTensor

from replica_dist import dist, loop
from replica_dist.config import load_config
from replica_dist.experiments.bench import _memory_probe
from replica_dist.experiments.commands import REPO, run_job, shell_line, torchrun_command
from replica_dist.report import ReportError
from replica_dist.timing import StepTimer

HELD = ("params", "grads", "optimizer")


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _nbytes(tensors) -> int:
    return sum(_local(t).numel() * _local(t).element_size() for t in tensors)


def held_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of the parameters, gradients and optimizer state that this rank holds: of each
    DTensor its local shard only (FSDP2's padding of the last shards is not counted: it is
    storage, not a value)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = [v for p in params for v in optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return {
        "params": _nbytes(params),
        "grads": _nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": _nbytes(state),
    }


@contextlib.contextmanager
def _keeping_the_optimizer(kept: list):
    """loop.build_optimizer (which loop.train looks up in its module) appending what it
    returns to `kept`; otherwise the same."""
    original = loop.build_optimizer

    def keeping(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        kept.append(optimizer)
        return optimizer

    loop.build_optimizer = keeping
    try:
        yield
    finally:
        loop.build_optimizer = original


class _HeldCounter(StepTimer):
    """A StepTimer that also counts, at the end of each step, what the kept optimizer's
    parameters hold (the step's gradients are still there: zero_grad runs at the next step)."""

    def __init__(self, device: torch.device, peak_memory, kept: list):
        super().__init__(device, peak_memory)
        self._kept = kept
        self.held: list[dict[str, int]] = []

    def end_step(self) -> None:
        super().end_step()
        self.held.append(held_bytes(self._kept[-1]))


def rank_memory(overrides: list[str], run_dir: Path, device: torch.device) -> dict:
    """Train the run `overrides` describe in `run_dir` through loop.train on this rank (the
    process group already joined) and return what this rank held, its peaks and its bytes
    sent per step."""
    cfg, _ = load_config(overrides)
    steps = cfg.train.steps
    if steps < 3:
        raise ReportError(
            f"train.steps must be at least 3 (the first and last are not measured); got {steps}"
        )
    kept = []
    timer = _HeldCounter(device, _memory_probe(device), kept)
    with _keeping_the_optimizer(kept):
        summary = loop.train(cfg, run_dir, device, timer=timer)
    held = {kind: max(step[kind] for step in timer.held) for kind in HELD}
    return {
        "rank": dist.rank(),
        "world": dist.world_size(),
        "shard": cfg.parallel.shard,
        **held,
        "sum": sum(held.values()),
        # The first step's peak covers everything since the process started; the last logs and evaluates.
        "peak_rss": max(timer.peak_bytes[1:-1]),
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # Linux: KiB
        "sent_per_step": summary["comm"]["bytes_sent_per_rank"] / steps,
    }


def _trainer_overrides(args, shard: int, run_dir: Path, overrides: list[str]) -> list[str]:
    return [
        f"model.hidden=[{args.hidden}]",
        f"train.batch_size={args.batch}",
        f"train.steps={args.steps}",
        "log.every=1000000",
        "eval.every=1000000",
        "checkpoint.every=0",
        f"parallel.shard={shard}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]


def table(rows: list[dict]) -> list[str]:
    """The markdown table of every rank's numbers, by S then rank."""
    mib = 2**20
    lines = [
        "| S | rank | params B | grads B | optimizer B | sum B | sum x S / sum at S=1 | peak RSS MiB | ru_maxrss MiB | sent / step B |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    whole = next((r["sum"] for r in rows if r["shard"] == 1), None)
    for r in sorted(rows, key=lambda r: (r["shard"], r["rank"])):
        ratio = f"{r['sum'] * r['shard'] / whole:.4f}" if whole else "-"
        lines.append(
            f"| {r['shard']} | {r['rank']} | {r['params']:,} | {r['grads']:,} | {r['optimizer']:,} | "
            f"{r['sum']:,} | {ratio} | {r['peak_rss'] / mib:.1f} | {r['ru_maxrss'] / mib:.1f} | "
            f"{r['sent_per_step']:,.0f} |"
        )
    return lines


@record
def _worker(args, overrides: list[str]) -> int:
    """One rank of one job (under torchrun): its numbers to --rank-out/rank_<rank>.json."""
    cfg, _ = load_config(overrides)
    device = dist.init(cfg.dist)
    try:
        numbers = rank_memory(overrides, args.run_dir, device)
        (args.rank_out / f"rank_{dist.rank()}.json").write_text(json.dumps(numbers) + "\n")
    finally:
        dist.teardown()
    return 0


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="replica_dist.experiments.shard_memory", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--shards", default="1,2,4", help="comma-separated values of parallel.shard")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", default="1024,1024", help="widths of the mlp's hidden layers")
    parser.add_argument(
        "--batch",
        type=int,
        default=64,
        help="train.batch_size (the S ranks of a replica read the same batches)",
    )
    parser.add_argument("--report", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "shard_memory")
    # A job's rank (under torchrun): where to write its numbers, and the run directory.
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    try:
        args.shard_values = [int(s) for s in args.shards.split(",")]
    except ValueError:
        parser.error(f"--shards: comma-separated positive integers; got {args.shards!r}")
    if any(s < 1 for s in args.shard_values):
        parser.error(f"--shards: comma-separated positive integers; got {args.shards!r}")
    if args.replicas < 1:
        parser.error(f"--replicas must be at least 1; got {args.replicas}")
    if args.steps < 3:
        parser.error(f"--steps must be at least 3 (the first and last are not measured); got {args.steps}")
    return args, overrides


def main(argv: list[str]) -> int:
    args, overrides = _parse(argv)
    if args.rank_out:
        return _worker(args, overrides)
    work = args.work / time.strftime("%Y-%m-%d_%H-%M-%S")
    rows, commands = [], []
    for shard in args.shard_values:
        run_dir, out = work / f"shard_{shard}", work / f"shard_{shard}_ranks"
        out.mkdir(parents=True)
        job = [
            f"--rank-out={out}",
            f"--run-dir={run_dir}",
            *_trainer_overrides(args, shard, run_dir, overrides),
        ]
        command = torchrun_command(args.replicas * shard, job, module="replica_dist.experiments.shard_memory")
        commands.append(shell_line(command))
        print(f"S={shard}: {args.replicas * shard} processes", file=sys.stderr, flush=True)
        run_job(command, f"parallel.shard={shard}")
        rows += [json.loads(path.read_text()) for path in sorted(out.glob("rank_*.json"))]
    text = "\n".join(
        [
            f"{args.replicas} replicas, mlp {args.hidden} on digits, batch {args.batch}, {args.steps} steps "
            f"per job; rank = replica x S + shard index.",
            "",
            *table(rows),
        ]
    )
    print(text)
    if args.report:
        args.report.write_text(text + "\n")
    shutil.rmtree(work)  # the runs' weights and summaries: every number is in the table
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
