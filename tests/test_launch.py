"""launch/run.sh end to end, as a user runs it: Ctrl-C and the printed resume command, a killed
agent, a second launch into a directory in use, restarts at the edges of a run, and a table of
bad launches that must each end in one line, exit status 2 and no directory."""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from trainer_runs import RUN_SH, assert_refused_launch, replica_weights, run_sh, user_env
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist import launch

pytestmark = pytest.mark.e2e

STEPS = 600
OVERRIDES = [
    f"train.steps={STEPS}",
    "checkpoint.every=10",
    "log.every=10",
    "eval.every=300",
    "model.hidden=[32]",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def start_run_sh(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [RUN_SH, *args],
        cwd=cwd,
        env=env or user_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_line(process: subprocess.Popen, pattern: str, timeout: float = 120) -> list[str]:
    """Read the process's stdout until a line matches (the lines read so far)."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise AssertionError(f"exited before {pattern!r}:\n" + "".join(lines) + process.stderr.read())
        lines.append(line)
        if re.search(pattern, line):
            return lines
    raise AssertionError(f"no {pattern!r} within {timeout} s:\n" + "".join(lines))


def assert_same_weights(run_dir: Path, reference: Path, world_size: int = 2) -> None:
    for mine, theirs in zip(replica_weights(run_dir, world_size), replica_weights(reference, world_size)):
        assert mine.keys() == theirs.keys()
        for name in mine:
            assert torch.equal(mine[name], theirs[name]), name


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Error:" not in text.replace("replica_dist: error:", ""), text


@functools.cache
def _uninterrupted_run(base_temp: Path) -> Path:
    cwd = Path(tempfile.mkdtemp(prefix="reference", dir=base_temp))
    done = run_sh("--nproc", "2", "hydra.run.dir=ref", *OVERRIDES, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd / "ref"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one must equal bit for bit. Trained once per
    session: test_run_safety imports this fixture too (a fixture of each module), and every
    test only reads the run."""
    return _uninterrupted_run(tmp_path_factory.getbasetemp())


@pytest.mark.slow
def test_ctrl_c_prints_a_resume_command_that_resumes_bit_for_bit(tmp_path, reference):
    # A user's first launch: no run directory named, so the launcher picks one.
    first = start_run_sh(
        "--nproc", "2", *OVERRIDES, cwd=tmp_path, env=hooked_env(tmp_path, SLOW_STEP_S="0.02")
    )
    seen = wait_for_line(first, r"step 20/")
    first.send_signal(signal.SIGINT)  # Ctrl-C reaches torchrun (the launcher)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    no_traceback(out, err)
    assert "stopped on request after step" in "".join(seen) + out
    resume_lines = [line for line in err.splitlines() if "Resume with: " in line]
    assert len(resume_lines) == 1, err
    assert err.strip().splitlines() == resume_lines  # the launcher's one line, nothing else
    command = resume_lines[0].split("Resume with: ", 1)[1]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir()]
    assert f"hydra.run.dir={run_dir.relative_to(tmp_path)}" in command

    second = subprocess.run(
        shlex.split(command), cwd=tmp_path, env=user_env(), capture_output=True, text=True, timeout=240
    )
    assert second.returncode == 0, second.stderr[-3000:]
    no_traceback(second.stdout, second.stderr)
    assert "resuming from" in second.stdout
    assert_same_weights(run_dir, reference)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_cleanly_too(tmp_path):
    process = start_run_sh(
        "--nproc",
        "2",
        "hydra.run.dir=run",
        *OVERRIDES,
        cwd=tmp_path,
        env=hooked_env(tmp_path, SLOW_STEP_S="0.02"),
    )
    wait_for_line(process, r"step 10/")
    process.send_signal(signal.SIGTERM)  # Slurm's notice
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    no_traceback(out, err)
    assert re.fullmatch(r"replica_dist: stopped after step \d+, checkpoint saved\. Resume with: .*\n", err)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its exit status is left


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found]


@pytest.mark.slow
def test_workers_stop_when_their_agent_is_killed_and_the_same_command_resumes(tmp_path, reference):
    args = ("--nproc", "2", "hydra.run.dir=run", *OVERRIDES)
    agent = start_run_sh(*args, cwd=tmp_path, env=hooked_env(tmp_path, SLOW_STEP_S="0.02"))
    wait_for_line(agent, r"step 20/")
    workers = _children(agent.pid)
    assert len(workers) == 2
    agent.kill()  # SIGKILL: what an OOM killer or a hard stop of the job does
    agent.wait()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "workers outlived their agent by 10 s"

    again = run_sh(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
    assert_same_weights(tmp_path / "run", reference)


@pytest.mark.parametrize("when", ["at once", "later"])
@pytest.mark.slow
def test_a_second_launch_into_a_directory_in_use_is_refused(tmp_path, reference, when):
    args = ("--nproc", "2", "hydra.run.dir=run", *OVERRIDES)
    # Slowed (the same weights) so that the second launch meets it mid-run, whichever starts
    # first: until one of the two has ended, then at full speed.
    one_ended = tmp_path / "one_has_ended"
    slow = hooked_env(tmp_path, SLOW_STEP_S="0.05", SLOW_UNTIL=str(one_ended))
    first = start_run_sh(*args, cwd=tmp_path, env=slow)
    if when == "later":
        wait_for_line(first, r"step 20/")
    second = start_run_sh(*args, cwd=tmp_path, env=slow)
    deadline = time.monotonic() + 240
    while first.poll() is None and second.poll() is None:
        assert time.monotonic() < deadline, "neither launch ended within 240 s"
        time.sleep(0.2)
    one_ended.touch()
    out, err = first.communicate(timeout=240)
    second_out, second_err = second.communicate(timeout=240)
    results = sorted([(first.returncode, out, err), (second.returncode, second_out, second_err)])
    (ok, ok_out, ok_err), (refused, _, refused_err) = results
    assert ok == 0, ok_err
    assert refused != 0
    lines = refused_err.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"replica_dist: error: hydra\.run\.dir=run is in use by another run \(pid \d+ on .+\).*", lines[0]
    ), refused_err
    no_traceback(refused_err)
    assert_same_weights(tmp_path / "run", reference)


# Runs in every worker (and the launcher) through PYTHONPATH, as a user's sitecustomize would.
# SLOW_STEP_S: every minibatch draw sleeps, so that a run lasts long enough for a signal or a
# second launch to meet it mid-run (the weights do not change); with SLOW_UNTIL, only until that
# file exists. KILL_AT: SIGKILLs rank 1 at one
# moment of the first attempt, so that torchrun restarts the group at an edge of the run.
HOOKS = textwrap.dedent(
    """
    import os, signal, time
    if os.environ.get("SLOW_STEP_S"):
        from replica_dist import data
        draw = data.ReplicaBatches.next
        until = os.environ.get("SLOW_UNTIL")
        def slow_draw(self):
            if not (until and os.path.exists(until)):
                time.sleep(float(os.environ["SLOW_STEP_S"]))
            return draw(self)
        data.ReplicaBatches.next = slow_draw
    if os.environ.get("KILL_AT") and os.environ.get("RANK") == "1" and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        from replica_dist import diagnostics, loop
        if os.environ["KILL_AT"] == "start-up":
            def killing_log_step(self, *args, **kwargs):
                os.kill(os.getpid(), signal.SIGKILL)
            diagnostics.Diagnostics.log_step = killing_log_step
        else:
            train = loop.train
            def train_then_die(*args, **kwargs):
                train(*args, **kwargs)
                os.kill(os.getpid(), signal.SIGKILL)
            loop.train = train_then_die
    """
)


def hooked_env(tmp_path: Path, hooks_text: str = HOOKS, **settings: str) -> dict[str, str]:
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(hooks_text)
    env = user_env(**settings)
    env["PYTHONPATH"] = f"{hooks}{os.pathsep}{env['PYTHONPATH']}"
    return env


@pytest.mark.parametrize("moment", ["start-up", "after summary.json"])
@pytest.mark.slow
def test_a_worker_killed_at_an_edge_of_the_run_is_restarted_to_the_same_end(tmp_path, reference, moment):
    env = hooked_env(tmp_path, KILL_AT=moment)
    done = run_sh(
        "--nproc", "2", "--max-restarts", "2", "hydra.run.dir=run", *OVERRIDES, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    if moment == "start-up":
        assert "restarted before its first checkpoint: starting over" in done.stdout + done.stderr
    else:
        assert "had already finished the run" in done.stdout
    assert "test_accuracy | replicas" in done.stdout
    assert_same_weights(tmp_path / "run", reference)


@pytest.mark.slow
def test_a_different_job_is_still_refused_by_a_finished_run(reference, tmp_path):
    done = run_sh("--nproc", "2", f"hydra.run.dir={reference}", *OVERRIDES, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"replica_dist: error: hydra.run.dir={reference} already holds a finished run; choose a new hydra.run.dir"
    ]


def test_launches_in_the_same_second_get_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(launch.time, "strftime", lambda fmt: "2026-01-01_00-00-00")
    made = [launch.new_run_dir(tmp_path / "runs") for _ in range(3)]
    assert [p.name for p in made] == ["2026-01-01_00-00-00", "2026-01-01_00-00-00-2", "2026-01-01_00-00-00-3"]


def _npz(path: Path, **arrays) -> str:
    np.savez(path, **arrays)
    return str(path)


def _bad_launches(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    rng = np.random.default_rng(0)
    one_class = _npz(
        tmp_path / "one_class.npz",
        X_train=rng.normal(size=(8, 3)),
        y_train=np.zeros(8, dtype=np.int64),
        X_test=rng.normal(size=(2, 3)),
        y_test=np.zeros(2, dtype=np.int64),
    )
    integer_targets = _npz(
        tmp_path / "integer_targets.npz",
        X_train=rng.normal(size=(400, 3)),
        y_train=rng.integers(12, 980, size=400),
        X_test=rng.normal(size=(50, 3)),
        y_test=rng.integers(12, 980, size=50),
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("keep me\n")
    return {
        "negative lr": (["optim.lr=-1"], r"optim\.lr"),
        "unknown group option": (["model=bogus"], r"model"),
        "zero steps": (["train.steps=0"], r"train\.steps"),
        "every zero": (["coupling.every=0"], r"coupling\.every"),
        "eta_max beyond 1 for linear": (["coupling=linear", "coupling.eta_max=2"], r"coupling\.eta_max"),
        "missing data file": (["data=file", f"data.path={tmp_path / 'nope.npz'}"], r"data\.path"),
        "single-class data": (["data=file", f"data.path={one_class}"], r"data\.path"),
        "dp not dividing the world": (["parallel.dp=3"], r"parallel\.dp"),
        "nccl without cuda": (["dist.backend=nccl"], r"dist\.backend"),
        "unwritable run dir": ([f"hydra.run.dir={blocker}/run"], r"hydra\.run\.dir"),
        "nproc zero": (["--nproc", "0"], r"--nproc"),
        "unknown option": (["--bogus"], r"--bogus"),
        "multirun": (["--multirun", "optim.lr=0.1,0.2"], r"--multirun"),
        "cfg other than job": (["--cfg", "hydra"], r"--cfg"),
        "wrong type": (["train.steps=many"], r"train\.steps"),
        "guard policy": (["guard.nonfinite=ignore"], r"guard\.nonfinite"),
        "bad remap with ddp": (["coupling=ddp", "checkpoint.remap=true"], r"checkpoint\.remap"),
        "unknown key added with +": (["+optim.lrr=0.1"], r"optim\.lrr"),
        "unknown top-level key": (["+foo=1"], r"foo"),
        "data.path without data=file": (["data.path=my.npz"], r"data\.path"),
        "malformed value": (["optim.lr=["], r"optim\.lr=\["),
        "integer as a boolean": (["model.bias=2"], r"model\.bias"),
        "integer regression targets": (["data=file", f"data.path={integer_targets}"], r"data\.task"),
    }


BAD_LAUNCHES = [
    "negative lr",
    "unknown group option",
    "zero steps",
    "every zero",
    "eta_max beyond 1 for linear",
    "missing data file",
    "single-class data",
    "dp not dividing the world",
    "nccl without cuda",
    "unwritable run dir",
    "nproc zero",
    "unknown option",
    "multirun",
    "cfg other than job",
    "wrong type",
    "guard policy",
    "bad remap with ddp",
    "unknown key added with +",
    "unknown top-level key",
    "data.path without data=file",
    "malformed value",
    "integer as a boolean",
    "integer regression targets",
]


@pytest.mark.parametrize("case", BAD_LAUNCHES)
@pytest.mark.slow
def test_a_bad_launch_is_one_line_exit_2_and_no_directory(tmp_path, case):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused_launch(*_bad_launches(tmp_path)[case], cwd)


@pytest.mark.slow
def test_help_and_cfg_job_answer_without_training(tmp_path):
    shown = run_sh("--nproc", "2", "--cfg", "job", "coupling=linear", "optim.lr=0.2", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    composed = yaml.safe_load(shown.stdout)
    assert composed["coupling"]["name"] == "linear" and composed["optim"]["lr"] == 0.2
    helped = run_sh("--help", cwd=tmp_path)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: ")
    assert "coupling: average, ddp, diloco, linear, none, tanh (default tanh)" in helped.stdout
    assert "optim.lr (float, default 0.05): Learning rate." in helped.stdout
    assert list(tmp_path.iterdir()) == []  # neither made a run directory
