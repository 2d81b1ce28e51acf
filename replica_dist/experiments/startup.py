"""How long a launch takes to train, and what a restart costs, as a user sees them.

    python -m replica_dist.experiments.startup [--nproc 4] [--repeats 3] [overrides ...]

Each repeat runs two launches of `launch/run.sh` (python -m replica_dist.launch) in a fresh
temporary run directory, with `overrides` added (default: none, the default job):

    first step   a 1-step run: from the launch to its progress line of step 1 (imports,
                 config composition, rendezvous, data, model, TensorBoard writers, the step),
                 and to the launcher's exit; the CPU seconds of all its processes together
                 (the launcher, torchrun's agent inside it, the workers)
    restart      --max-restarts 1, checkpoint.every=20, log.every=1: once step 20's checkpoint
                 is complete, the last rank is SIGKILLed; from the kill to the progress line of the
                 first step after the resume (torchrun noticing, the group's teardown and new
                 start, loading the checkpoint)

Times are wall seconds on this machine, measured from outside by when a line arrives on the
launcher's stdout; the median over the repeats is printed with the range. On a machine shared
with other work the CPU seconds vary less than the wall times.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from replica_dist.experiments.commands import REPO, shell_line

RESTART_CHECKPOINT = 20
"""The step whose checkpoint the restart measurement resumes from."""


def launch_command(nproc: int, overrides: list[str], max_restarts: int = 0) -> list[str]:
    return [
        sys.executable,
        "-m",
        "replica_dist.launch",
        "--nproc",
        str(nproc),
        "--max-restarts",
        str(max_restarts),
        *overrides,
    ]


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def first_step(nproc: int, overrides: list[str], run_dir: Path) -> dict[str, float]:
    """Seconds from the launch to step 1's progress line and to the exit; CPU seconds."""
    command = launch_command(nproc, [*overrides, "train.steps=1", f"hydra.run.dir={run_dir}"])
    cpu_before = _children_cpu()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    lines = []
    for line in process.stdout:
        lines.append(line)
        if first is None and re.search(r"\] step 1/1 ", line):
            first = time.perf_counter() - start
    process.wait()
    done = time.perf_counter() - start
    if process.returncode != 0 or first is None:
        raise RuntimeError(f"{shell_line(command)} failed:\n{''.join(lines[-15:])}")
    return {"first_step_s": first, "exit_s": done, "cpu_s": _children_cpu() - cpu_before}


def worker_pid(parent: int, rank: int) -> int | None:
    """The worker of `rank` among the children of `parent` (torchrun's agent; the launcher runs
    one inside itself), found by the RANK in its environment; None if there is none yet."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def restart(nproc: int, overrides: list[str], run_dir: Path) -> float:
    """Seconds from SIGKILLing the last rank (after step RESTART_CHECKPOINT's checkpoint) to
    the progress line of the first step after the resume."""
    steps = 10 * RESTART_CHECKPOINT
    command = launch_command(
        nproc,
        [
            *overrides,
            f"train.steps={steps}",
            f"checkpoint.every={RESTART_CHECKPOINT}",
            "log.every=1",
            f"hydra.run.dir={run_dir}",
        ],
        max_restarts=1,
    )
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    manifest = run_dir / "checkpoints" / f"step-{RESTART_CHECKPOINT:08d}" / "manifest.json"
    killed_at, resumed, cost, lines = None, False, None, []
    try:
        for line in process.stdout:
            lines.append(line)
            if killed_at is None and manifest.exists():
                pid = worker_pid(process.pid, rank=nproc - 1)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    killed_at = time.perf_counter()
            elif killed_at is not None and "resuming from" in line:
                resumed = True
            elif resumed and cost is None and re.search(r"\] step \d+/", line):
                cost = time.perf_counter() - killed_at
        process.wait()  # the resumed run goes on to its end
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if process.returncode != 0 or cost is None:
        raise RuntimeError(f"{shell_line(command)}: no resumed run to its end:\n{''.join(lines[-15:])}")
    return cost


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m replica_dist.experiments.startup", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--nproc", type=int, default=4, help="processes (default 4, the default job)")
    parser.add_argument("--repeats", type=int, default=3, help="launches of each kind (default 3)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every launch")
    args = parser.parse_args(argv)
    firsts, restarts = [], []
    with tempfile.TemporaryDirectory(prefix="replica_dist_startup_") as scratch:
        for repeat in range(args.repeats):
            firsts.append(first_step(args.nproc, args.overrides, Path(scratch) / f"first_{repeat}"))
            restarts.append(restart(args.nproc, args.overrides, Path(scratch) / f"restart_{repeat}"))
    print(
        f"{args.nproc} processes, {args.repeats} repeats, overrides: {' '.join(args.overrides) or '(none)'}"
    )
    print(f"launch to step 1               {_summary([f['first_step_s'] for f in firsts])}")
    print(f"launch to exit (1-step run)    {_summary([f['exit_s'] for f in firsts])}")
    print(f"CPU of the 1-step run          {_summary([f['cpu_s'] for f in firsts])}")
    print(f"restart: kill to resumed step  {_summary(restarts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
