"""examples/own_loop.py under torchrun, as a user runs it: it trains, and a loop stopped at a step
and resumed from the coupling's state_dict ends bit for bit equal to one that never stopped."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO, user_env

pytestmark = pytest.mark.e2e


def own_loop(tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += [
        str(REPO / "examples" / "own_loop.py"),
        "--steps",
        "120",
        "--checkpoint",
        str(tmp_path / name),
    ]
    done = subprocess.run(
        command + list(args), cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_own_loop_trains_and_resumes_bit_for_bit(tmp_path):
    straight = own_loop(tmp_path, "straight")
    assert straight.stdout.startswith("step 120: loss ")
    assert float(straight.stdout.split("loss ")[1]) < 0.1  # sin(x @ w) is learnt
    stopped = own_loop(tmp_path, "stopped", "--stop-at", "50")
    assert stopped.stdout.startswith("step 50: ")
    own_loop(tmp_path, "stopped")  # the same command, without --stop-at, resumes
    for rank in range(2):
        a = torch.load(tmp_path / f"straight.final.rank{rank}.pt")
        b = torch.load(tmp_path / f"stopped.final.rank{rank}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), rank
