"""`launch/run.sh --ft` (and `replica-dist --ft`): replicas that outlive each other, on one machine.

The launcher starts one torchft Lighthouse and one torchrun job per replica, so that a worker's
death restarts only its own replica's job (torchrun's agent restarts every worker of its job)
while the other replicas train on (docs/fault_tolerance.md):

- The Lighthouse is the `torchft_lighthouse` command in a process of its own (its output in
  the run directory's ft/lighthouse.log): no trainer's death takes it along. If it dies it is
  started again on the same address (a replica whose quorum it missed for ft.quorum_timeout_s
  fails and is restarted by its job); one that keeps dying ends the run.
- Replica r's job is `torchrun --standalone --nproc-per-node=1 --max-restarts=K -m
  replica_dist.train ... ft.enabled=true ft.replicas=N ft.replica_id=r` (through
  replica_dist.ft_job, torchrun's agent in-process), every job with the
  same run directory, and TORCHFT_LIGHTHOUSE naming the Lighthouse.
- Every process it starts is in a session of its own: the terminal's SIGINT or SIGHUP reaches
  the launcher alone, which passes SIGINT, SIGTERM and SIGHUP on to every job (each agent
  passes them to its worker, which stops at its next logging step). The Lighthouse is ended
  once every job has ended, whatever happened (try/finally).

At the end the run's summary.json gathers every replica's results and every fault once. The exit
status is 0 when every replica's job ended with 0, else the first non-zero one (128 + N for a
job killed by signal N).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from replica_dist.config.fault_tolerance import LIGHTHOUSE_ENV

LIGHTHOUSE_COMMAND = "torchft_lighthouse"
"""torchft's Lighthouse server (installed with the ft extra)."""
JOIN_TIMEOUT_MS = 3000
"""How long the Lighthouse waits for heartbeating replicas that have not asked for the quorum
yet (a restarted replica loading its code) before it forms a quorum without them: the pause
the others take when one comes back, bounded."""
HEARTBEAT_TIMEOUT_MS = 5000
"""How long without a heartbeat before the Lighthouse counts a replica as lost (torchft's default)."""
TORCHFT_LOG_LEVEL = "warn"
"""RUST_LOG for the replica jobs when the user has not set it."""
LIGHTHOUSE_RESTARTS_PER_MINUTE = 5
"""A Lighthouse that dies more often than this (it cannot bind its port, say) ends the run:
its log is in the run directory (ft/lighthouse.log)."""
POLL_S = 0.2
"""How often the launcher looks at its jobs and at the Lighthouse."""
STOP_GRACE_S = 60.0
"""After a stop is passed on: how long the jobs have to save and end before they are killed."""


def free_port() -> int:
    """A TCP port nothing listens on now (the Lighthouse binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def lighthouse_address(port: int) -> str:
    return f"http://localhost:{port}"


def job_overrides(replicas: int, replica: int) -> list[str]:
    """What the launcher adds to the user's overrides for replica `replica`'s job."""
    return ["ft.enabled=true", f"ft.replicas={replicas}", f"ft.replica_id={replica}"]


@dataclass
class FtPlan:
    """What `--ft` runs: the Lighthouse's command and each replica job's."""

    replicas: int
    quorum: int
    max_restarts: int
    run_dir: Path
    overrides: list[str]
    port: int

    @property
    def address(self) -> str:
        return lighthouse_address(self.port)

    def lighthouse_command(self) -> list[str]:
        return [
            LIGHTHOUSE_COMMAND,
            "--bind",
            f"[::]:{self.port}",
            "--min_replicas",
            str(self.quorum),
            "--join_timeout_ms",
            str(JOIN_TIMEOUT_MS),
            "--heartbeat_timeout_ms",
            str(HEARTBEAT_TIMEOUT_MS),
        ]

    def job_command(self, replica: int) -> list[str]:
        return [
            sys.executable,
            "-m",
            "replica_dist.ft_job",  # torchrun's agent, quiet on a stop passed on
            "--standalone",
            "--nproc-per-node=1",
            f"--max-restarts={self.max_restarts}",
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={self.run_dir}",
            *self.overrides,
            *job_overrides(self.replicas, replica),
        ]

    def job_environment(self) -> dict[str, str]:
        # torchft's Rust side logs every quorum and commit at INFO, several lines a step and
        # replica: warnings and errors only, unless the user asks for more with RUST_LOG.
        return {"RUST_LOG": TORCHFT_LOG_LEVEL, **os.environ, LIGHTHOUSE_ENV: self.address}


def say(line: str) -> None:
    """A launcher's line, to a terminal that may be gone (SIGHUP)."""
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # a terminal that is gone (SIGHUP)
        pass


class _Lighthouse:
    """The Lighthouse process, started again on the same port if it dies."""

    def __init__(self, plan: FtPlan):
        if shutil.which(LIGHTHOUSE_COMMAND) is None:
            raise FileNotFoundError(
                f"{LIGHTHOUSE_COMMAND} not found: --ft needs torchft (pip install 'replica_dist[ft]')"
            )
        self.plan, self.restarts, self._restarted_at = plan, 0, []
        self.log = plan.run_dir / "ft" / "lighthouse.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.process = self._start()

    def _start(self) -> subprocess.Popen:
        # A session of its own: the terminal's Ctrl-C or hang-up reaches the launcher alone,
        # which decides what each process gets.
        with open(self.log, "ab") as log:
            return subprocess.Popen(
                self.plan.lighthouse_command(), stdout=log, stderr=log, start_new_session=True
            )

    def keep_alive(self) -> str | None:
        """Start the Lighthouse again if it ended; the reason to end the run if it keeps ending."""
        if self.process.poll() is None:
            return None
        now = time.monotonic()
        self._restarted_at = [t for t in self._restarted_at if now - t < 60] + [now]
        if len(self._restarted_at) > LIGHTHOUSE_RESTARTS_PER_MINUTE:
            return (
                f"the Lighthouse ended {len(self._restarted_at)} times within a minute "
                f"(status {self.process.returncode}); its log: {self.log}"
            )
        self.restarts += 1
        say(
            f"replica_dist: the Lighthouse ended (status {self.process.returncode}); "
            f"starting it again at {self.plan.address} (restart {self.restarts})"
        )
        self.process = self._start()
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def write_run_summary(plan: FtPlan, statuses: list[int], lighthouse_restarts: int) -> dict:
    """The run's summary.json, from what each replica job wrote (ft/replica_<r>.json, and the
    worker starts in ft/replica_<r>.jsonl): every replica's results, every fault once (the
    earliest detection among the replicas that saw it), the restarts of each replica's worker
    and of the Lighthouse. `status`: ok when every replica ended ok, stopped when some stopped
    on request and none failed, else failed."""
    from replica_dist.checkpoint import atomic_write_bytes
    from replica_dist.ft_loop import read_record

    results, faults, restarts = [], {}, []
    for replica, status in enumerate(statuses):
        path = plan.run_dir / "ft" / f"replica_{replica}.json"
        result = json.loads(path.read_text()) if path.exists() else {"status": "failed", "replica": replica}
        result["exit_status"] = status
        results.append(result)
        for fault in result.get("faults", []):
            key = (fault["replica"], fault["step"])
            if key not in faults or fault["seconds_to_detect"] < faults[key]["seconds_to_detect"]:
                faults[key] = fault
        record = plan.run_dir / "ft" / f"replica_{replica}.jsonl"
        starts = [e for e in read_record(record) if e["event"] == "start"] if record.exists() else []
        restarts.append(max(0, len(starts) - 1))
    ended = {r.get("status") if r["exit_status"] == 0 else "failed" for r in results}
    status = "ok" if ended == {"ok"} else "failed" if ended - {"ok", "stopped"} else "stopped"
    summary = {
        "status": status,
        "ft": {"replicas": plan.replicas, "quorum": plan.quorum, "lighthouse_restarts": lighthouse_restarts},
        "faults": [faults[key] for key in sorted(faults)],
        "worker_restarts": restarts,
        "replicas": results,
    }
    atomic_write_bytes(plan.run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


def run_ft(plan: FtPlan) -> int:
    """Run `plan` to its end; the exit status (see the module's docstring)."""
    lighthouse = _Lighthouse(plan)
    jobs: list[subprocess.Popen] = []
    stop_signal: list[int] = []
    previous, gave_up = {}, None

    def pass_on(signum, frame):
        stop_signal.append(signum)
        for job in jobs:
            if job.poll() is None:
                job.send_signal(signum)

    try:
        for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
            if signum is not None:
                previous[signum] = signal.signal(signum, pass_on)
        say(
            f"replica_dist: --ft: {plan.replicas} replica jobs, a quorum of {plan.quorum}, "
            f"the Lighthouse at {plan.address}, up to {plan.max_restarts} restarts a replica"
        )
        env = plan.job_environment()
        jobs.extend(
            subprocess.Popen(plan.job_command(r), env=env, start_new_session=True)
            for r in range(plan.replicas)
        )
        stopped_at = None
        while any(job.poll() is None for job in jobs):
            if gave_up is None and (gave_up := lighthouse.keep_alive()) is not None:
                pass_on(signal.SIGTERM, None)  # every replica stops at its next step
            if stop_signal and stopped_at is None:
                stopped_at = time.monotonic()
            if stopped_at is not None and time.monotonic() - stopped_at > STOP_GRACE_S:
                for job in jobs:
                    if job.poll() is None:
                        job.kill()
            time.sleep(POLL_S)
    finally:
        for job in jobs:  # an exception here (a failed start): no job outlives the launcher
            if job.poll() is None:
                job.kill()
                job.wait()
        lighthouse.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    # A job killed by a signal has a negative return code: the shell's 128 + N.
    statuses = [status if status >= 0 else 128 - status for status in (job.returncode for job in jobs)]
    summary = write_run_summary(plan, statuses, lighthouse.restarts)
    for replica, status in enumerate(statuses):
        if status:
            say(f"replica_dist: error: replica {replica}'s job ended with status {status}")
    if gave_up is not None:
        say(f"replica_dist: error: {gave_up}")
        return 1
    if stop_signal:
        steps = sorted({r.get("step") for r in summary["replicas"] if r.get("step") is not None})
        where = f" at step {'/'.join(map(str, steps))}" if steps else ""
        say(
            f"replica_dist: stopped ({signal.Signals(stop_signal[0]).name}){where}; ft.enabled keeps no "
            f"checkpoints yet: a new run (in a new hydra.run.dir) starts over"
        )
    return next((status for status in statuses if status), 0)
