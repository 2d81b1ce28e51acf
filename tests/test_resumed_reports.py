"""A resumed run reports what an uninterrupted one reports: summary.json (its warnings
included) and every TensorBoard scalar, for a worker SIGKILLed under torchrun --max-restarts
in a run whose loss jumps after the resume point, judged against a loss from before it; and
its wall_seconds counts the segments before the resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import REPO, events, torchrun_command
from worlds import COLLECTIVE_TIMEOUT_S, fail_at_batch, run_world

from replica_dist import checkpoint, loop
from replica_dist.config import load_config
from replica_dist.data import ReplicaBatches

# A learning rate that warms up to 2 over the whole run: the loss falls to its best near step
# 110, then climbs back toward the untrained loss, a jump the detector reports (at step 430
# here, on CPU), long after the checkpoint the killed run resumes from (step 200).
CHECKPOINT_EVERY, LOG_EVERY = 100, 10
JUMPING = [
    "train.steps=600",
    f"log.every={LOG_EVERY}",
    "eval.every=100",
    "model.hidden=[32]",
    "optim.lr=2",
    "optim.warmup_steps=599",
    f"checkpoint.every={CHECKPOINT_EVERY}",
    "coupling.eta_growth=0.004",  # a pull that stays weak up to the jump: per step, not relative to the run
]


def kill_and_resume_steps(best_at: int, jumped_at: int) -> tuple[int, int]:
    """(the logging step to kill at, the checkpoint it resumes from) that put the resume point
    after the loss the jump is judged from and the kill before the jump, as the test needs.
    Where the jump falls is the chaotic run's own, and differs by a step or two dozen from one
    CPU's vector code to another's, so the steps are chosen from the uninterrupted run."""
    resumed_from = (jumped_at - 1) // CHECKPOINT_EVERY * CHECKPOINT_EVERY
    kill_at = (jumped_at - 1) // LOG_EVERY * LOG_EVERY
    assert best_at < resumed_from < kill_at < jumped_at, (best_at, resumed_from, kill_at, jumped_at)
    return kill_at, resumed_from


# Runs in every worker through PYTHONPATH: rank 1 of the first attempt SIGKILLs itself at the
# logging step KILL_AT_STEP, between two checkpoints; torchrun restarts the group.
HOOK = textwrap.dedent(
    """
    import os, signal
    if os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        from replica_dist import diagnostics
        log_step = diagnostics.Diagnostics.log_step
        def killing_log_step(self, step, *args, **kwargs):
            if step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return log_step(self, step, *args, **kwargs)
        diagnostics.Diagnostics.log_step = killing_log_step
    """
)


def _run(run_dir: Path, env: dict | None = None) -> str:
    command = torchrun_command(
        2, f"hydra.run.dir={run_dir}", *JUMPING, extra_torchrun_args=("--max-restarts=1",)
    )
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    return done.stdout + done.stderr


def _all_scalars(run_dir: Path) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{tb run: {tag: [(step, value), ...]}} as TensorBoard reads them back, in file order."""
    runs = {}
    for log_dir in sorted((run_dir / "tb").iterdir()):
        accumulator = events(log_dir)
        runs[log_dir.name] = {
            tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]
        }
    return runs


def _summary_without_wall(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.pop("wall_seconds") > 0
    return summary


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_worker_killed_mid_run_resumes_to_the_same_summary_and_scalars(tmp_path):
    reference = tmp_path / "uninterrupted"
    _run(reference)
    expected = _summary_without_wall(reference)
    (jump,) = [w for w in expected["warnings"] if "minibatch loss jumped" in w]
    jumped_at, best_at = map(int, re.search(r"at step (\d+) from \S+ at step (\d+)", jump).groups())
    # The run this test needs: the jump after the resume point, judged from a loss before it.
    kill_at, resumed_from = kill_and_resume_steps(best_at, jumped_at)

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(HOOK)
    env = dict(os.environ, KILL_AT_STEP=str(kill_at))
    env["PYTHONPATH"] = os.pathsep.join([str(hooks), str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    killed = tmp_path / "killed"
    out = _run(killed, env)
    assert f"resuming from {killed / 'checkpoints' / f'step-{resumed_from:08d}'}" in out, out[-3000:]

    assert _summary_without_wall(killed) == expected
    got, want = _all_scalars(killed), _all_scalars(reference)
    assert sorted(got) == ["center", "ensemble", "replica_0", "replica_1"]
    assert got.keys() == want.keys()
    for run in want:
        assert got[run].keys() == want[run].keys(), run
        for tag in want[run]:
            assert got[run][tag] == want[run][tag], (run, tag)


# ---- wall_seconds across a resume

OVERRIDES = [
    "train.steps=20",
    "train.batch_size=16",
    "model.hidden=[16]",
    "log.every=5",
    "eval.every=10",
    "checkpoint.every=10",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]
SLOW_DRAW_S = 0.05


def _train(rank: int, world_size: int, run_dir: str, slow_then_crash_at: int = 0) -> None:
    if slow_then_crash_at:
        fail_at_batch(ReplicaBatches, slow_then_crash_at)
        draw = ReplicaBatches.next

        def slow_draw(self):
            time.sleep(SLOW_DRAW_S)
            return draw(self)

        ReplicaBatches.next = slow_draw
    cfg, _ = load_config(OVERRIDES + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


def test_wall_seconds_of_a_resumed_run_counts_the_first_segment(tmp_path):
    # A slow first segment (every draw sleeps) crashes at step 13, after step 10's checkpoint.
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_train, 2, str(tmp_path), 13)
    saved = checkpoint.load_replica(tmp_path / "checkpoints", 10, 0)["recipe"]["progress"]["wall_seconds"]
    assert saved >= 10 * SLOW_DRAW_S  # ten slow steps up to the checkpoint
    run_world(_train, 2, str(tmp_path))  # the same command, at full speed
    assert json.loads((tmp_path / "summary.json").read_text())["wall_seconds"] > saved
