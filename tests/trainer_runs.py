"""Start `torchrun -m replica_dist.train` in a subprocess and read a run back from disk."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist.experiments.commands import torchrun_command as experiment_command

REPO = Path(__file__).resolve().parent.parent
"""The repository root: the working directory of every subprocess."""


def torchrun_command(nproc: int, *overrides: str, extra_torchrun_args: tuple[str, ...] = ()) -> list[str]:
    """`torchrun --standalone` with `nproc` workers of replica_dist.train, collectives bounded in time."""
    return experiment_command(
        nproc, [f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}", *overrides], extra=extra_torchrun_args
    )


def torchrun(nproc: int, *overrides: str, timeout_s: float = 240) -> subprocess.CompletedProcess:
    """Run torchrun_command to the end in REPO, its stdout and stderr captured as text."""
    return subprocess.run(
        torchrun_command(nproc, *overrides), cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )


def events(log_dir: Path) -> EventAccumulator:
    """All scalars of one TensorBoard log directory, loaded."""
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return accumulator


def scalar(log_dir: Path, tag: str) -> dict[int, float]:
    """{step: value} of one scalar tag."""
    return {e.step: e.value for e in events(log_dir).Scalars(tag)}


def train_losses(run_dir: Path, replica: int) -> list[tuple[int, float]]:
    """(step, train/loss) of one replica, in the order its event file holds them: a resumed
    run that logged a step twice, or lost one, differs from the uninterrupted run's."""
    return [(e.step, e.value) for e in events(run_dir / "tb" / f"replica_{replica}").Scalars("train/loss")]


def replica_weights(run_dir: Path, world_size: int) -> list[dict[str, torch.Tensor]]:
    """The final weights/replica_<r>.pt of every replica, in rank order."""
    return [torch.load(run_dir / "weights" / f"replica_{r}.pt") for r in range(world_size)]


RUN_SH = str(REPO / "launch" / "run.sh")
"""launch/run.sh, the README's command."""


def user_env(**extra: str) -> dict[str, str]:
    """A user's shell: this venv's python first on PATH, the package of this checkout."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RUN_DIR", None)
    env.pop("NPROC", None)
    return env | extra


def run_sh(
    *args: str, cwd: Path, env: dict | None = None, timeout: float = 240
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RUN_SH, *args], cwd=cwd, env=env or user_env(), capture_output=True, text=True, timeout=timeout
    )


def assert_refused_launch(args: list[str], key: str, cwd: Path) -> None:
    """`launch/run.sh --nproc 2 *args`, run in the empty folder `cwd`, is refused the way every
    bad input is: one line `replica_dist: error: ...` matching the regex `key`, exit status 2,
    and no run directory left behind."""
    done = run_sh("--nproc", "2", *args, cwd=cwd, timeout=180)
    output = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert len(output) == 1, output
    assert re.match(r"replica_dist: error: .*" + key, output[0]), output[0]
    assert list(cwd.iterdir()) == [], "a refused launch left a directory behind"
