"""`launch/run.sh --ft` before any trainer runs: what it starts (a Lighthouse apart from the
trainers, one torchrun job per replica), what it refuses, that it starts a dead Lighthouse
again on the same address, and `launch/chaos.sh`, which kills a random replica's worker."""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from trainer_runs import assert_refused_launch

from replica_dist import ft_launch, launch
from replica_dist.experiments import chaos

torchft = pytest.importorskip("torchft", reason="the ft extra (pip install -e '.[ft]')")

REPO = Path(__file__).resolve().parents[1]


def _parse(*args: str) -> launch.Launch:
    parsed, _ = launch.Launch.parse("replica-dist", list(args))
    return parsed


def test_ft_starts_one_torchrun_job_per_replica_and_a_lighthouse_apart(tmp_path):
    run = _parse("--ft", "--nproc", "3", f"hydra.run.dir={tmp_path / 'run'}", "coupling=linear")
    plan = run.ft_plan
    assert (plan.replicas, plan.quorum, plan.max_restarts) == (3, 2, launch.FT_MAX_RESTARTS)
    for r in range(3):
        job = plan.job_command(r)
        assert job[1:3] == ["-m", "replica_dist.ft_job"]  # torchrun's agent, quiet on a stop
        assert "--nproc-per-node=1" in job and f"--max-restarts={launch.FT_MAX_RESTARTS}" in job
        assert job[-4:] == ["coupling=linear", "ft.enabled=true", "ft.replicas=3", f"ft.replica_id={r}"]
        assert f"hydra.run.dir={tmp_path / 'run'}" in job
    lighthouse = plan.lighthouse_command()
    assert lighthouse[0] == "torchft_lighthouse"
    assert lighthouse[lighthouse.index("--min_replicas") + 1] == "2"  # a majority of 3
    assert lighthouse[lighthouse.index("--bind") + 1] == f"[::]:{plan.port}"
    assert plan.job_environment()["TORCHFT_LIGHTHOUSE"] == f"http://localhost:{plan.port}"
    # The command that runs it again keeps --ft and the restarts it chose.
    again = _parse(*shlex.split(run.command())[1:])
    assert again.ft_plan is not None and again.command() == run.command()


def test_ft_takes_the_quorum_and_restarts_the_user_set(tmp_path):
    run = _parse(
        "--ft", "--nproc", "4", "--max-restarts", "1", f"hydra.run.dir={tmp_path}", "ft.min_replicas=3"
    )
    assert (run.ft_plan.quorum, run.ft_plan.max_restarts) == (3, 1)
    plain = _parse("--nproc", "4", f"hydra.run.dir={tmp_path}")
    assert plain.ft_plan is None and plain.max_restarts == 0  # without --ft nothing changes


@pytest.mark.parametrize(
    "args, key",
    [
        (["--ft", "ft.replica_id=1"], r"ft\.replica_id is set by --ft"),
        (["--ft", "ft.replicas=5"], r"ft\.replicas is set by --ft"),
        (
            ["--ft", "--nnodes", "2", "--rdzv-endpoint", "h:1", "--rdzv-id", "x"],
            r"--ft runs every replica on this",
        ),
        (["--ft", "coupling=diloco"], r"coupling\.name=diloco is not available with ft\.enabled"),
    ],
)
def test_a_bad_ft_launch_is_one_line_exit_2_and_no_directory(tmp_path, args, key):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused_launch(args, key, cwd)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("localhost", port), timeout=1):
            return True
    except OSError:
        return False


def _wait(condition, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_a_dead_lighthouse_is_started_again_on_the_same_address(tmp_path, capsys):
    plan = ft_launch.FtPlan(2, 1, 0, tmp_path, [], ft_launch.free_port())
    lighthouse = ft_launch._Lighthouse(plan)
    try:
        assert _wait(lambda: _listening(plan.port)), "the Lighthouse never listened"
        first = lighthouse.process.pid
        lighthouse.process.kill()
        lighthouse.process.wait()
        assert not _listening(plan.port)
        lighthouse.keep_alive()
        assert lighthouse.process.pid != first and lighthouse.restarts == 1
        assert _wait(lambda: _listening(plan.port)), "the new Lighthouse never listened on the same port"
        assert "starting it again at http://localhost:" in capsys.readouterr().err
    finally:
        lighthouse.stop()
    assert lighthouse.process.poll() is not None


def _pretend_worker(replica: int, run_dir: str) -> subprocess.Popen:
    """A process whose command line is a torchrun worker's of an ft run (what chaos looks for)."""
    code = "import time; time.sleep(60)"
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            code,
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={run_dir}",
            f"ft.replica_id={replica}",
        ]
    )


def test_chaos_finds_the_workers_of_its_run_and_kills_them_at_random(tmp_path):
    ours = [_pretend_worker(r, "runs/ours") for r in range(2)]
    theirs = _pretend_worker(0, "runs/theirs")
    agent = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "torch.distributed.run", "-m", "replica_dist.train",
         "hydra.run.dir=runs/ours", "ft.replica_id=0"]
    )  # fmt: skip
    try:
        assert _wait(lambda: len(chaos.ft_workers("runs/ours")) == 2)
        assert chaos.ft_workers("runs/ours") == {ours[0].pid: 0, ours[1].pid: 1}  # not the agent, not theirs
        report = tmp_path / "kills.json"
        status = chaos.main(
            ["runs/ours", "--every", "0.2", "--seed", "1", "--duration", "4", "--json", str(report)]
        )
        assert status == 0
        kills = json.loads(report.read_text())["kills"]
        assert sorted(k["pid"] for k in kills) == sorted(p.pid for p in ours)  # each once: then none are left
        assert all(p.wait(timeout=10) == -9 for p in ours)
        assert theirs.poll() is None and agent.poll() is None
    finally:
        for process in (*ours, theirs, agent):
            process.kill()
            process.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_run_sh_ft_outlives_a_killed_replica_and_ends_0(tmp_path):
    """The user's one command: launch/run.sh --ft --nproc 3 with replica 1's worker killed at
    step 20 (the scripted fault). Its job restarts it alone; the others' workers never change;
    every replica reaches the last step and the launcher ends with 0, its Lighthouse gone."""
    from trainer_runs import run_sh, user_env

    from replica_dist.ft_loop import FAULT_ENV, read_record

    run_dir = tmp_path / "run"
    done = run_sh(
        "--ft", "--nproc", "3", f"hydra.run.dir={run_dir}", "train.steps=120", "log.every=40", "eval.every=120",
        "model.hidden=[32]", "ft.timeout_s=5", "ft.quorum_timeout_s=60",
        cwd=tmp_path, env=user_env(**{FAULT_ENV: "kill=1@20,step_s=0.05"}), timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [read_record(run_dir / "ft" / f"replica_{r}.jsonl") for r in range(3)]
    starts = [[e["pid"] for e in record if e["event"] == "start"] for record in records]
    assert [len(pids) for pids in starts] == [1, 2, 1], starts
    for record in records:
        assert max(e["step"] for e in record if e["event"] == "step") == 120
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["worker_restarts"] == [0, 1, 0]
    (fault,) = summary["faults"]  # seen by both survivors, listed once
    assert (fault["replica"], fault["step"]) == (1, 20) and fault["seconds_to_rejoin"] is not None
    assert [r["status"] for r in summary["replicas"]] == ["ok"] * 3
    (port,) = re.findall(
        r"3 replica jobs, a quorum of 2, the Lighthouse at http://localhost:(\d+)", done.stderr
    )
    assert not any(f"[::]:{port}" in line for line in _process_lines()), "the Lighthouse outlived --ft"


def _process_lines() -> list[str]:
    return subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout.splitlines()


def test_the_slurm_template_starts_one_lighthouse_and_a_job_per_replica(tmp_path):
    """launch/slurm_ft.sbatch run with stand-ins for Slurm's commands (scontrol, srun), the
    Lighthouse and python, which write down how they were called: the Lighthouse on the first
    node with a majority quorum, then per task one torchrun job of one worker, its replica id
    the task's rank, every job pointed at the Lighthouse and sharing the run directory."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    stand_ins = {
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "torchft_lighthouse": f'echo "$@" > {calls}/lighthouse; exec sleep 30',
        # srun runs its command once per task, as tasks 0..SLURM_NTASKS-1 of two nodes.
        "srun": 'while [[ "$1" == --* ]]; do shift; done; for t in $(seq 0 $((SLURM_NTASKS - 1))); do '
        'SLURM_PROCID=$t SLURM_LOCALID=$((t % 2)) "$@" || exit 1; done',
        "python": f'echo "$TORCHFT_LIGHTHOUSE $CUDA_VISIBLE_DEVICES $*" > {calls}/job_$SLURM_PROCID',
    }
    for name, body in stand_ins.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NTASKS": "4",
        "SLURM_JOB_NAME": "ftjob",
    }
    done = subprocess.run(
        ["bash", str(REPO / "launch" / "slurm_ft.sbatch"), "coupling=linear"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (calls / "lighthouse").read_text().split() == [
        "--bind", "[::]:29510", "--min_replicas", "3", "--join_timeout_ms", "3000",
    ]  # fmt: skip
    for task in range(4):
        words = (calls / f"job_{task}").read_text().split()
        assert words[:2] == ["http://node-a:29510", str(task % 2)]
        assert words[2:7] == [
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=1",
            "--max-restarts=3",
        ]
        assert words[7:9] == ["-m", "replica_dist.train"]
        assert "hydra.run.dir=runs/ftjob" in words and "ft.enabled=true" in words and "ft.replicas=4" in words
        assert f"ft.replica_id={task}" in words and "ft.min_replicas=3" in words
        assert words[-1] == "coupling=linear"
    assert not any("[::]:29510" in line for line in _process_lines()), (
        "the Lighthouse outlived the batch script"
    )


def test_a_lighthouse_that_keeps_dying_ends_the_run_naming_its_log(tmp_path):
    """Its port taken by another process, the Lighthouse cannot start: after a few restarts
    within a minute keep_alive gives the reason to end the run, naming the log that says why."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as squatter:
        squatter.bind(("::", 0))
        squatter.listen()
        plan = ft_launch.FtPlan(2, 1, 0, tmp_path, [], squatter.getsockname()[1])
        lighthouse = ft_launch._Lighthouse(plan)
        try:
            reasons = []
            deadline = time.monotonic() + 30
            while not any(reasons) and time.monotonic() < deadline:
                lighthouse.process.wait(timeout=10)
                reasons.append(lighthouse.keep_alive())
        finally:
            lighthouse.stop()
    assert reasons[-1] is not None and str(tmp_path / "ft" / "lighthouse.log") in reasons[-1]
    assert len(reasons) == ft_launch.LIGHTHOUSE_RESTARTS_PER_MINUTE + 1
    assert (tmp_path / "ft" / "lighthouse.log").read_bytes()  # the Lighthouse's own words


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ctrl_c_stops_every_replica_at_a_step_and_says_there_is_nothing_to_resume(tmp_path):
    """SIGINT to `launch/run.sh --ft`: each job's agent passes it to its worker, every replica
    stops at the same logging step and says so, summary.json says stopped, the exit status is
    0 and the last line says a new run starts over (no checkpoints under ft yet)."""
    from trainer_runs import RUN_SH, user_env

    run_dir = tmp_path / "run"
    with (
        open(tmp_path / "out.log", "w") as out,
        open(tmp_path / "err.log", "w") as err_log,
    ):  # files: never full
        launcher = subprocess.Popen(
            [RUN_SH, "--ft", "--nproc", "2", f"hydra.run.dir={run_dir}", "train.steps=100000", "log.every=20",
             "model.hidden=[32]"],
            cwd=tmp_path, env=user_env(), stdout=out, stderr=err_log,
        )  # fmt: skip
        try:
            assert _wait(lambda: _latest_step(run_dir) >= 20, 120)
            launcher.send_signal(signal.SIGINT)
            launcher.wait(timeout=120)
        finally:
            launcher.kill()
    err = (tmp_path / "err.log").read_text()
    assert launcher.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped"
    steps = {r["step"] for r in summary["replicas"]}
    assert [r["status"] for r in summary["replicas"]] == ["stopped"] * 2 and len(steps) == 1
    (step,) = steps
    assert step % 20 == 0
    assert err.strip().splitlines()[-1] == (
        f"replica_dist: stopped (SIGINT) at step {step}; ft.enabled keeps no checkpoints yet: "
        "a new run (in a new hydra.run.dir) starts over"
    )
    assert "Traceback" not in err


def _latest_step(run_dir: Path) -> int:
    """The latest step replica 0 recorded (0 before its first)."""
    from replica_dist.ft_loop import read_record

    record = run_dir / "ft" / "replica_0.jsonl"
    events = read_record(record) if record.exists() else []
    return max((e["step"] for e in events if e["event"] == "step"), default=0)
