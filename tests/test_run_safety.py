"""A run's life through launch/run.sh, as a user lives it: SIGHUP (a closed terminal) is a stop
like SIGTERM, the launcher's last line claims only the checkpoint on disk, every ended run
leaves summary.json, and a resume may change the keys the README lists (a finished run is
extended by raising train.steps; train.init_from starts a new run from another's weights)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from test_launch import (
    OVERRIDES,
    assert_same_weights,
    hooked_env,
    no_traceback,
    reference,  # noqa: F401 (the uninterrupted run of OVERRIDES, a fixture)
    start_run_sh,
    wait_for_line,
)
from trainer_runs import replica_weights, run_sh, scalar, user_env
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist import launch

pytestmark = pytest.mark.e2e


# ---- SIGHUP, and the launcher's last line


@pytest.mark.slow
def test_sighup_to_the_launcher_saves_and_the_printed_command_resumes_bit_for_bit(tmp_path, reference):  # noqa: F811
    first = start_run_sh(
        "--nproc", "2", *OVERRIDES, cwd=tmp_path, env=hooked_env(tmp_path, SLOW_STEP_S="0.02")
    )
    wait_for_line(first, r"step 20/")
    first.send_signal(signal.SIGHUP)  # the terminal closed, the ssh session dropped
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    no_traceback(out, err)
    said = re.fullmatch(
        r"replica_dist: stopped after step (\d+), checkpoint saved\. Resume with: (.*)\n", err
    )
    assert said, err
    step, command = int(said.group(1)), said.group(2)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / f"step-{step:08d}" / "manifest.json").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["checkpoint"]) == ("stopped", step, step)

    second = subprocess.run(
        shlex.split(command), cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=240
    )
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {run_dir.relative_to(tmp_path)}/checkpoints/step-{step:08d}" in second.stdout
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "ok"
    assert_same_weights(run_dir, reference)


def _launch(run_dir: Path) -> launch.Launch:
    return launch.Launch("replica-dist", 2, 0, {}, run_dir, ["train.steps=600"])


def _checkpoint(run_dir: Path, step: int) -> None:
    folder = run_dir / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")


def test_the_stop_line_claims_only_a_checkpoint_the_workers_saved_at_the_stop(tmp_path):
    # Workers killed before they could save (the stop's checkpoint is missing): the newest one
    # on disk is named as what is left, not as saved at the stop; the exit status says so.
    _checkpoint(tmp_path, 750)
    status, line = launch._stop_message(_launch(tmp_path), "replica-dist train.steps=600")
    assert status == 1
    assert "without saving" in line and "step 750" in line and "checkpoint saved" not in line
    assert line.endswith(f"with: replica-dist --nproc 2 hydra.run.dir={tmp_path} train.steps=600")

    # The workers stopped after step 840 and saved it: that step, as summary.json and the manifest say.
    _checkpoint(tmp_path, 840)
    (tmp_path / "summary.json").write_text(json.dumps({"status": "stopped", "step": 840, "checkpoint": 840}))
    status, line = launch._stop_message(_launch(tmp_path), "replica-dist train.steps=600")
    assert (status, line.split(". Resume")[0]) == (
        0,
        "replica_dist: stopped after step 840, checkpoint saved",
    )

    # A summary that claims a step whose checkpoint is not the newest complete one is not believed.
    (tmp_path / "summary.json").write_text(json.dumps({"status": "stopped", "step": 900, "checkpoint": 900}))
    assert launch._stop_message(_launch(tmp_path), "x")[0] == 1


# ---- a run the guard stops: summary.json says "diverged", and a changed setting resumes it

SMALL = [
    "--nproc",
    "2",
    "train.steps=20",
    "train.batch_size=16",
    "model.hidden=[16]",
    "log.every=10",
    "eval.every=20",
    "checkpoint.every=4",
    "coupling=average",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]
"""A short run whose schedules do not depend on train.steps (average has no eta; constant lr),
so that a run extended from 20 steps must equal a run of the longer length."""

# NAN_AT_STEP: replica 1's batch of that step (counted in this process) is NaN, once.
# INIT_OUT: every rank saves its model's state_dict as the coupling first sees it (step 0).
HOOKS = textwrap.dedent(
    """
    import os
    import torch
    if os.environ.get("NAN_AT_STEP") and os.environ.get("RANK") == "1":
        from replica_dist import data
        draw, calls = data.ReplicaBatches.next, [0]
        def poisoned(self):
            calls[0] += 1
            x, y = draw(self)
            return (x * float("nan"), y) if calls[0] == int(os.environ["NAN_AT_STEP"]) else (x, y)
        data.ReplicaBatches.next = poisoned
    if os.environ.get("INIT_OUT"):
        from replica_dist import coupling
        build = coupling.ReplicaCoupling.from_config.__func__
        def saving(cls, cfg, mesh, model, *args, **kwargs):
            path = os.path.join(os.environ["INIT_OUT"], f"rank{os.environ['RANK']}.pt")
            torch.save({k: v.clone() for k, v in model.state_dict().items()}, path)
            return build(cls, cfg, mesh, model, *args, **kwargs)
        coupling.ReplicaCoupling.from_config = classmethod(saving)
    """
)


def _env(tmp_path: Path, **settings: str) -> dict[str, str]:
    return hooked_env(tmp_path, HOOKS, **settings)


@pytest.mark.slow
def test_a_run_the_guard_stops_writes_diverged_and_resumes_only_with_a_changed_setting(tmp_path):
    done = run_sh(*SMALL, "hydra.run.dir=run", cwd=tmp_path, env=_env(tmp_path, NAN_AT_STEP="7"))
    assert done.returncode == 1, done.stderr[-3000:]
    assert "non-finite loss in replica 1 at step 7" in done.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged"
    assert "non-finite loss in replica 1 at step 7" in summary["reason"]
    # The step the run stopped at: the guard's read back of step 7's decision, at the latest
    # at the next step that checkpoints (8); no step after it is applied or saved.
    assert summary["step"] in (7, 8)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004"]

    same = run_sh(*SMALL, "hydra.run.dir=run", cwd=tmp_path)
    assert same.returncode == 2
    lines = same.stderr.strip().splitlines()
    assert len(lines) == 1 and "diverged (stopped at step" in lines[0] and "optim.lr" in lines[0], same.stderr

    rescued = run_sh(*SMALL, "hydra.run.dir=run", "optim.lr=0.02", cwd=tmp_path)
    assert rescued.returncode == 0, rescued.stderr[-3000:]
    assert "resuming from run/checkpoints/step-00000004" in rescued.stdout
    assert "resuming with optim.lr changed from 0.05 to 0.02" in rescued.stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "ok"
    lr = scalar(tmp_path / "run" / "tb" / "replica_0", "optim/lr")
    assert [lr[s] for s in (4, 5, 20)] == pytest.approx([0.05, 0.02, 0.02])


# ---- resume with changed keys, extension of a finished run, warm start


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished run of 20 steps (the source of the tests below, each on its own copy)."""
    cwd = tmp_path_factory.mktemp("finished")
    done = run_sh(*SMALL, "hydra.run.dir=run", cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "run"


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.slow
def test_raising_train_steps_extends_a_finished_run_to_the_longer_run(tmp_path, finished):
    run_dir = _copy(finished, tmp_path)
    extended = run_sh(*SMALL, "hydra.run.dir=run", "train.steps=40", cwd=tmp_path)
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "resuming from run/checkpoints/step-00000020" in extended.stdout
    assert "resuming with train.steps changed from 20 to 40" in extended.stdout
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 40

    # With no schedule that depends on train.steps, the extended run is the run of 40 steps.
    longer = run_sh(*SMALL, "hydra.run.dir=longer", "train.steps=40", cwd=tmp_path)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert_same_weights(run_dir, tmp_path / "longer")

    again = run_sh(*SMALL, "hydra.run.dir=run", "train.steps=40", cwd=tmp_path)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr


def test_resuming_with_a_changed_lr_logs_it_and_trains_on_with_it(tmp_path, finished):
    run_dir = _copy(finished, tmp_path)
    done = run_sh(*SMALL, "hydra.run.dir=run", "train.steps=30", "optim.lr=0.01", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming with optim.lr changed from 0.05 to 0.01" in done.stdout
    lr = scalar(run_dir / "tb" / "replica_1", "optim/lr")
    assert [lr[s] for s in (20, 21, 30)] == pytest.approx([0.05, 0.01, 0.01])
    # The next resume compares with the settings of the latest segment.
    assert "lr: 0.01" in (run_dir / "config.yaml").read_text()


def test_a_change_that_may_not_happen_on_resume_is_refused_naming_the_key(tmp_path, finished):
    _copy(finished, tmp_path)
    done = run_sh(*SMALL, "hydra.run.dir=run", "train.steps=40", "model.hidden=[32]", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert re.match(
        r"replica_dist: error: .*model\.hidden \(\[16\] -> \[32\]\) may not change on resume", lines[0]
    )
    assert "optim.lr" in lines[0]  # the keys that may


def _step_zero(init_out: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(init_out / f"rank{r}.pt") for r in range(2)]


def _assert_equal(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize(
    "source", ["run dir", *(pytest.param(s, marks=pytest.mark.slow) for s in ["checkpoint", "center.pt"])]
)
def test_init_from_starts_a_new_run_from_the_sources_weights(tmp_path, finished, source):
    path = {
        "run dir": finished,
        "checkpoint": finished / "checkpoints" / "step-00000020",
        "center.pt": finished / "weights" / "center.pt",
    }[source]
    init_out = tmp_path / "init"
    init_out.mkdir()
    done = run_sh(
        *SMALL,
        "hydra.run.dir=new",
        "train.steps=4",
        f"train.init_from={path}",
        cwd=tmp_path,
        env=_env(tmp_path, INIT_OUT=str(init_out)),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming" not in done.stdout  # a new run, from step 0
    if source == "center.pt":
        expected = [torch.load(path)] * 2
    else:
        expected = replica_weights(finished, 2)  # the final weights: the checkpoint of step 20 too
    for got, theirs in zip(_step_zero(init_out), expected):
        _assert_equal(got, theirs)


def test_init_from_a_model_of_another_shape_is_one_line_naming_the_key(tmp_path, finished):
    done = run_sh(
        *SMALL, "model.hidden=[8]", f"train.init_from={finished / 'weights' / 'center.pt'}", cwd=tmp_path
    )
    assert done.returncode == 2
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert re.match(r"replica_dist: error: train\.init_from=\S+center\.pt: .*size mismatch", lines[-1]), lines
    assert len([line for line in lines if "error" in line]) == 1
    assert not (tmp_path / "runs").exists()  # a refused launch leaves no directory behind
