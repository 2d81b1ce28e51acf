"""A run whose first checkpoint does not fit the disk leaves a directory with no checkpoint
and no finished run: the same command starts it over, says so, and runs to the end. What
still refuses: a directory in use, and checkpoints that checkpoint.resume=false declines."""

from __future__ import annotations

import logging
import re

import pytest
import test_disk
import test_run_lock
import torch
from test_disk import PAGE, _mounts_work, _pages, _run, _save_step
from trainer_runs import replica_weights, train_losses

from replica_dist import dist, run_lock, run_state
from replica_dist.config import ConfigError, load_config

# test_disk's real mounts and its uninterrupted run; test_run_lock's live holder of a lock.
mounts, uninterrupted, holder = test_disk.mounts, test_disk.uninterrupted, test_run_lock.holder


def test_a_first_checkpoint_that_did_not_fit_is_started_over_by_the_same_command(
    tmp_path, mounts, uninterrupted
):
    real = _mounts_work()
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints"
    if real:  # half of the first checkpoint fits
        step_bytes = _pages(uninterrupted / "checkpoints" / "step-00000010")  # as large as step 5's; kept
        assert step_bytes > 0
        mounts.tmpfs(ckpt, step_bytes // 2 // PAGE * PAGE)
    message = _run(run_dir, None if real else ("full_on_replace", 1, "step-00000005/replica-1.pt"))
    assert re.fullmatch(
        rf"cannot write checkpoint {re.escape(str(ckpt / 'step-00000005'))}/replica-[01]\.pt: No space left "
        r"on device \(errno 28\); free space and run the same command to start the run over \(no complete "
        r"checkpoint to resume from\)",
        message,
    ), message
    assert (run_dir / "tb").is_dir() and not (run_dir / "summary.json").exists()
    assert not ckpt.exists() or not any(ckpt.iterdir())

    if real:
        mounts.resize(ckpt, 64 * step_bytes)
    assert _run(run_dir) is None  # the same command, space again: to the end
    for got, expected in zip(replica_weights(run_dir, 2), replica_weights(uninterrupted, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):  # the first attempt's steps are gone, none is there twice
        assert train_losses(run_dir, replica) == train_losses(uninterrupted, replica)


# ---- rank 0's decision, in a world of one


@pytest.fixture
def world_of_one():
    cfg, _ = load_config([])
    dist.init(cfg.dist)
    yield
    run_lock.release()
    dist.teardown()


def _left_without_a_checkpoint(run_dir) -> None:
    """What a first attempt whose first checkpoint failed leaves: events, a config, no step."""
    (run_dir / "tb" / "replica_0").mkdir(parents=True)
    (run_dir / "tb" / "replica_0" / "events.out.tfevents.1.host").write_bytes(b"old")
    (run_dir / "checkpoints").mkdir()
    (run_dir / "config.yaml").write_text("old")


def test_the_start_over_is_said_and_the_old_events_go(tmp_path, world_of_one, caplog):
    _left_without_a_checkpoint(tmp_path)
    cfg, _ = load_config([f"hydra.run.dir={tmp_path}"])
    with caplog.at_level(logging.WARNING, logger="replica_dist.run_state"):
        start = run_state.decide_start(cfg, tmp_path)
    assert start == run_state.Start(0, 1)
    assert f"{tmp_path} holds no checkpoint and no finished run: starting the run over" in caplog.text
    assert not (tmp_path / "tb").exists()


def test_checkpoints_that_resume_false_declines_are_still_refused(tmp_path, world_of_one):
    _left_without_a_checkpoint(tmp_path)
    _save_step(tmp_path / "checkpoints", 5)  # complete (manifest and sizes), whatever its config
    cfg, _ = load_config([f"hydra.run.dir={tmp_path}", "checkpoint.resume=false"])
    with pytest.raises(
        ConfigError, match=r"already holds a run with checkpoints and checkpoint\.resume=false"
    ):
        run_state.decide_start(cfg, tmp_path)
    assert (tmp_path / "tb" / "replica_0").is_dir()  # nothing was removed


def test_a_directory_in_use_is_still_refused(tmp_path, holder, world_of_one):
    _left_without_a_checkpoint(tmp_path)
    cfg, _ = load_config([f"hydra.run.dir={tmp_path}"])
    with pytest.raises(
        ConfigError, match=rf"hydra\.run\.dir={re.escape(str(tmp_path))} is in use by another run"
    ):
        run_state.decide_start(cfg, tmp_path)
    assert (tmp_path / "tb" / "replica_0").is_dir()
