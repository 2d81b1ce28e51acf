"""examples/own_loop.py under torchrun, as a user runs it: it trains, and a loop stopped at a step
and resumed (explicitly, with --resume) from the coupling's state_dict ends bit for bit equal to
one that never stopped; a checkpoint is never resumed unasked, and a run resumed at its last
step ends cleanly. examples/own_loop_amp.py trains in fp16 with a GradScaler."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from trainer_runs import REPO, user_env

pytestmark = pytest.mark.e2e


def run_example(
    tmp_path, example: str, *args: str, fails: bool = False, nproc: int = 2
) -> subprocess.CompletedProcess:
    """Run an example under torchrun (`nproc` workers) in `tmp_path`; it must succeed, or with
    `fails` exit non-zero (torchrun's own status, whatever its workers' were)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    done = subprocess.run(
        command + [str(REPO / "examples" / example), *args],
        cwd=tmp_path,
        env=user_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert (done.returncode != 0) == fails, done.stderr[-3000:]
    return done


def own_loop(tmp_path, name: str, *args: str, fails: bool = False) -> subprocess.CompletedProcess:
    return run_example(
        tmp_path, "own_loop.py", "--steps", "120", "--checkpoint", str(tmp_path / name), *args, fails=fails
    )


@pytest.mark.slow
def test_own_loop_trains_and_resumes_bit_for_bit(tmp_path):
    straight = own_loop(tmp_path, "straight")
    assert straight.stdout.startswith("step 120: loss ")
    assert float(straight.stdout.split("loss ")[1]) < 0.1  # sin(x @ w) is learnt
    stopped = own_loop(tmp_path, "stopped", "--stop-at", "50")
    assert stopped.stdout.startswith("step 50: ")
    assert not list(tmp_path.glob("stopped.final.*"))
    # The same command without --resume does not start over the checkpoint: it says so.
    refused = own_loop(tmp_path, "stopped", fails=True)
    assert "stopped.rank0.pt exists (left by --stop-at): add --resume to continue from it" in refused.stderr
    own_loop(tmp_path, "stopped", "--resume")
    for rank in range(2):
        a = torch.load(tmp_path / f"straight.final.rank{rank}.pt")
        b = torch.load(tmp_path / f"stopped.final.rank{rank}.pt")
        assert all(torch.equal(a[k], b[k]) for k in a), rank
    # A finished run has used up its checkpoint: the same command starts afresh, and equals.
    assert not list(tmp_path.glob("stopped.rank*.pt"))
    missing = own_loop(tmp_path, "stopped", "--resume", fails=True)
    assert "--resume: there is no checkpoint" in missing.stderr


@pytest.mark.slow
def test_own_loop_resumed_at_its_last_step_ends_cleanly(tmp_path):
    own_loop(tmp_path, "ended", "--stop-at", "50")
    done = run_example(
        tmp_path, "own_loop.py", "--steps", "50", "--checkpoint", str(tmp_path / "ended"), "--resume"
    )
    assert done.stdout.startswith("step 50: no step left to train")
    saved = torch.load(tmp_path / "ended.final.rank1.pt")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_own_loops_checkpoints_are_ignored_by_git(tmp_path):
    names = ["own_loop_checkpoint.rank0.pt", "own_loop_checkpoint.final.rank1.pt"]
    done = subprocess.run(["git", "check-ignore", *names], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == names


@pytest.mark.slow
def test_own_loop_amp_skips_an_overflow_in_one_replica_only(tmp_path):
    done = run_example(tmp_path, "own_loop_amp.py", "--steps", "120", "--overflow-at", "3")
    lines = sorted(done.stdout.splitlines())
    assert [line.split(": loss")[0] for line in lines] == ["replica 0: step 120", "replica 1: step 120"]
    assert lines[0].endswith("0 overflowed, scale 65536")
    assert lines[1].endswith("1 overflowed, scale 32768")
    assert all(float(line.split("loss ")[1].split(",")[0]) < 0.1 for line in lines)  # it learns


@pytest.mark.slow
def test_own_loop_sharded_learns_and_equals_its_replicas_on_one_rank_each(tmp_path):
    """2 replicas of 2 shards (4 processes) against the same 2 replicas each on one rank."""
    runs = {
        shards: run_example(
            tmp_path,
            "own_loop_sharded.py",
            "--steps",
            "120",
            "--shards",
            str(shards),
            "--out",
            str(tmp_path / f"shards{shards}"),
            nproc=2 * shards,
        )
        for shards in (1, 2)
    }
    for done in runs.values():
        lines = sorted(done.stdout.splitlines())
        assert [line.split(": loss")[0] for line in lines] == ["replica 0: step 120", "replica 1: step 120"]
        assert all(float(line.split("loss ")[1]) < 0.1 for line in lines), lines  # sin(x @ w) is learnt
    for replica in range(2):
        one = torch.load(tmp_path / f"shards1.final.replica{replica}.pt")
        two = torch.load(tmp_path / f"shards2.final.replica{replica}.pt")
        for name in one:
            torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0)
