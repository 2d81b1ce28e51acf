"""What the experiment programs share: the torchrun commands they start and run, and the
directory their runs go to."""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from replica_dist.report import ReportError

REPO = Path(__file__).resolve().parents[2]
"""The repository root: jobs run here, so that `-m replica_dist...` imports this checkout."""


def torchrun_command(
    nproc: int,
    overrides: Iterable[str],
    module: str = "replica_dist.train",
    extra: Iterable[str] = (),
    python: str = sys.executable,
) -> list[str]:
    """The argv of one single-node torchrun job of `nproc` processes, each `python -m module
    *overrides` (for the trainer, Hydra overrides such as hydra.run.dir=DIR). `extra` are
    torchrun's own options (e.g. --max-restarts=1), placed before the module; `python` is the
    interpreter of another environment (another commit's, in against.py)."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra,
        "-m",
        module,
        *overrides,
    ]


def shell_line(command: list[str]) -> str:
    """The command as a line to paste into a shell: `python` for this interpreter's full path,
    which means nothing on another machine."""
    return shlex.join("python" if arg == sys.executable else arg for arg in command)


def run_job(command: list[str], name: str, cwd: Path = REPO) -> float:
    """Run one job to its end in `cwd` (REPO: this checkout), its output captured; returns its
    wall time, process start to exit. A job that fails raises ReportError with its name, exit status, command and the
    last 15 lines of its output (stderr last, where torchrun and the trainer report errors)."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise ReportError(f"{name} failed (exit {done.returncode}): {shlex.join(command)}\n{tail}")
    return wall


def add_runs_argument(parser: argparse.ArgumentParser, name: str, env: str) -> None:
    """--runs DIR, defaulting to $env (read when the parser is built)."""
    parser.add_argument(
        "--runs",
        type=Path,
        default=os.environ.get(env),
        help=f"directory of the run directories (default ${env}, else runs/{name}/<timestamp>)",
    )


def runs_directory(args: argparse.Namespace, name: str, env: str) -> Path:
    """The directory of the run directories: --runs, else runs/<name>/<timestamp> in REPO (a
    fresh one per launch). --plot-only reads finished runs, so it needs them named."""
    if args.runs:
        return Path(args.runs)
    if args.plot_only:
        raise ReportError(f"--plot-only needs --runs DIR (or {env})")
    return REPO / "runs" / name / time.strftime("%Y-%m-%d_%H-%M-%S")
