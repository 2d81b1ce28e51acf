"""Interrupted runs resume from their newest complete checkpoint and end as if never stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import REPO, replica_weights, torchrun_command, train_losses
from worlds import COLLECTIVE_TIMEOUT_S, fail_at_batch, run_world

from replica_dist import loop
from replica_dist.config import load_config
from replica_dist.data import ReplicaBatches
from replica_dist.experiments.startup import worker_pid

OVERRIDES = [
    "train.steps=20",
    "train.batch_size=16",
    "model.hidden=[16]",
    "log.every=1",
    "eval.every=5",
    "checkpoint.every=5",
    "checkpoint.keep=3",
    "optim.momentum=0.9",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def _train(rank: int, world_size: int, run_dir: str, fail_at_step: int = 0) -> None:
    if fail_at_step:
        fail_at_batch(ReplicaBatches, fail_at_step)
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_world(_train, 2, str(run_dir))
    return run_dir


def _assert_same_run(resumed: Path, reference: Path) -> None:
    for got, expected in zip(replica_weights(resumed, 2), replica_weights(reference, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        assert train_losses(resumed, replica) == train_losses(
            reference, replica
        )  # no step twice, same values


def _crash_at_step_13(run_dir: Path) -> None:
    # Every rank raises at step 13; which one the parent reports first, and whether a peer's
    # teardown dies of the other's exit, is a race, so check what is on disk instead.
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_train, 2, str(run_dir), 13)
    assert (run_dir / "checkpoints" / "step-00000010" / "manifest.json").exists()
    assert not (run_dir / "checkpoints" / "step-00000015").exists()
    assert not (run_dir / "summary.json").exists()


def test_a_crashed_run_resumes_bit_for_bit(tmp_path, uninterrupted):
    _crash_at_step_13(tmp_path)
    run_world(_train, 2, str(tmp_path))
    _assert_same_run(tmp_path, uninterrupted)


def test_a_truncated_newest_checkpoint_is_skipped(tmp_path, uninterrupted):
    _crash_at_step_13(tmp_path)
    newest = tmp_path / "checkpoints" / "step-00000010" / "replica-1.pt"
    newest.write_bytes(newest.read_bytes()[:-100])
    run_world(_train, 2, str(tmp_path))  # resumes from step 5, warns about step 10
    _assert_same_run(tmp_path, uninterrupted)


def test_resuming_with_another_world_size_is_refused(tmp_path):
    _crash_at_step_13(tmp_path)
    with pytest.raises(ProcessRaisedException, match="written by 2 replicas, this run has 3"):
        run_world(_train, 3, str(tmp_path))


def _train_fewer_steps(rank: int, world_size: int, run_dir: str) -> None:
    cfg, _ = load_config(OVERRIDES + ["train.steps=10", f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


def test_resuming_with_fewer_steps_than_the_checkpoint_is_refused(tmp_path):
    _crash_at_step_13(tmp_path)
    with pytest.raises(ProcessRaisedException, match=r"train\.steps=10 ends before the checkpoint"):
        run_world(_train_fewer_steps, 2, str(tmp_path))


def test_a_finished_run_is_not_overwritten(uninterrupted):
    before = (uninterrupted / "summary.json").read_text()
    with pytest.raises(ProcessRaisedException, match="already holds a finished run"):
        run_world(_train, 2, str(uninterrupted))
    assert (uninterrupted / "summary.json").read_text() == before


# ---- a worker SIGKILLed under torchrun --max-restarts=1


def _torchrun(run_dir: Path, *extra: str) -> subprocess.Popen:
    command = torchrun_command(
        2,
        f"hydra.run.dir={run_dir}",
        "train.steps=1500",
        "model.hidden=[64]",
        "log.every=100",
        "eval.every=500",
        "checkpoint.every=100",
        *extra,
        extra_torchrun_args=("--max-restarts=1",),
    )
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    reference = _torchrun(run_dir)
    out, _ = reference.communicate(timeout=240)
    assert reference.returncode == 0, out[-3000:]
    return run_dir


def _signal_rank_1_after_step_300(run_dir: Path, signum: int) -> str:
    """Start the run, send `signum` to rank 1 once step 300's checkpoint is complete, and
    return what torchrun printed by the time it exits."""
    process = _torchrun(run_dir)
    try:
        deadline = time.monotonic() + 120
        manifest = run_dir / "checkpoints" / "step-00000300" / "manifest.json"
        while not manifest.exists():
            assert time.monotonic() < deadline and process.poll() is None, "no checkpoint at step 300"
            time.sleep(0.02)
        pid = worker_pid(process.pid, rank=1)
        assert pid is not None
        os.kill(pid, signum)
        assert not (run_dir / "summary.json").exists()  # mid-run, not after
        out, _ = process.communicate(timeout=240)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, out[-3000:]
    return out


def _assert_same_final_weights(run_dir: Path, reference: Path) -> None:
    for got, expected in zip(replica_weights(run_dir, 2), replica_weights(reference, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 1500


@pytest.mark.e2e
@pytest.mark.slow
def test_sigkill_of_one_worker_under_torchrun_restart_ends_bit_for_bit(tmp_path, reference_run):
    out = _signal_rank_1_after_step_300(tmp_path / "killed", signal.SIGKILL)
    assert "resuming from" in out
    _assert_same_final_weights(tmp_path / "killed", reference_run)


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_the_run_resumes_bit_for_bit(tmp_path, reference_run, signum):
    run_dir = tmp_path / "preempted"
    out = _signal_rank_1_after_step_300(run_dir, signum)  # SIGHUP: the worker's terminal closed
    stopped = re.search(r"stopped on request after step (\d+): checkpoint saved", out)
    assert stopped, out[-3000:]
    step = int(stopped.group(1))
    assert 300 < step < 1500 and "resuming from" not in out  # a clean stop, not a restart
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").exists()
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    resumed = _torchrun(run_dir)
    out, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0 and f"step-{step:08d}" in out, out[-3000:]
    _assert_same_final_weights(run_dir, reference_run)


# ---- checkpoint.remap: resuming with another number of replicas, on request


def _resume_remapped(rank: int, world_size: int, run_dir: str) -> None:
    from replica_dist import run_state

    original = run_state.restore

    def keep_restored(run_dir_, start, model, *parts):
        original(run_dir_, start, model, *parts)
        torch.save(model.state_dict(), Path(run_dir_) / f"restored.rank{rank}.pt")

    run_state.restore = keep_restored
    cfg, _ = load_config(OVERRIDES + ["checkpoint.remap=true", f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.parametrize("world_size", [3, 1])
def test_remap_continues_saved_replicas_and_starts_new_ones_from_their_mean(tmp_path, world_size):
    _crash_at_step_13(tmp_path)
    folder = tmp_path / "checkpoints" / "step-00000010"
    saved = [torch.load(folder / f"replica-{r}.pt", weights_only=True)["model"] for r in range(2)]
    run_world(_resume_remapped, world_size, str(tmp_path))
    for rank in range(world_size):
        restored = torch.load(tmp_path / f"restored.rank{rank}.pt")
        for name, value in restored.items():
            expected = saved[rank][name] if rank < 2 else (saved[0][name] + saved[1][name]) / 2
            assert torch.equal(value, expected), (rank, name)
    assert json.loads((tmp_path / "summary.json").read_text())["world_size"] == world_size
