"""`launch/run.sh` and the `replica-dist` command (the same program): one worker per replica.

It checks the config before anything starts (a bad one is one line and exit status 2, and no
run directory is made), gives the launch its own run directory (`runs/<date>_<time>`, with a
suffix when two launches start in the same second) unless `hydra.run.dir=...` or `RUN_DIR`
names one, and runs torchrun in this process with torchrun's own machinery (`--standalone`, or
the c10d rendezvous that `--nnodes`, `--rdzv-endpoint` and `--rdzv-id` describe: one launcher
per node, with `hydra.run.dir` on a filesystem every node shares).
Ctrl-C, SIGTERM or SIGHUP (a closed terminal, a dropped ssh session) make every worker save a
checkpoint at the next step that communicates; this process then prints the step saved (read
back from the run directory, never assumed) and the command that resumes the run, and exits 0
(1 if the workers ended without saving). A worker's own one-line error is not buried under
torchrun's report of the failure: this process adds at most one line.

`NPROC` and `MAX_RESTARTS` in the environment are the defaults of `--nproc` and
`--max-restarts` (4 and 0).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from replica_dist import checkpoint, run_lock
from replica_dist.config import ConfigError, load_config
from replica_dist.ft_launch import FtPlan, free_port, job_overrides, lighthouse_address, run_ft, say
from replica_dist.worker_protocol import LAUNCHER_ENV, ONE_LINE_KEY

USAGE = (
    "usage: {prog} [--nproc N] [--max-restarts K] [--nnodes N --rdzv-endpoint HOST:PORT --rdzv-id JOB]\n"
    "       [--ft] [--cfg job] [--help] [overrides ...]"
)
PROG_ENV = "REPLICA_DIST_PROG"
"""How the resume command names this program: launch/run.sh sets it to itself."""
RUNS_ROOT = Path("runs")


class _Usage(ConfigError):
    """A bad launcher option (exit status 2, like a bad config key)."""


RENDEZVOUS_FLAGS = ("--nnodes", "--node-rank", "--rdzv-backend", "--rdzv-endpoint", "--rdzv-id")
"""torchrun's own options for a job over several nodes, passed on as they are."""
FT_FLAG = "--ft"
"""Live fault tolerance: a Lighthouse and one torchrun job per replica (replica_dist.ft_launch)."""
FT_MAX_RESTARTS = 3
"""--max-restarts under --ft when neither it nor MAX_RESTARTS is given: each replica's own."""
FT_SET = ("ft.enabled", "ft.replicas", "ft.replica_id", "ft.lighthouse")
"""The ft keys that --ft sets for each job itself."""


def _take(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` or `flag=VALUE` (also spelt with underscores) from argv; its value."""
    spellings = (flag, "--" + flag[2:].replace("-", "_"))
    for i, arg in enumerate(argv):
        if arg in spellings:
            if i + 1 == len(argv):
                raise _Usage(f"{flag} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
            return value
        if arg.split("=", 1)[0] in spellings and "=" in arg:
            return argv.pop(i).split("=", 1)[1]
    return None


def _count(flag: str, value: str | None, minimum: int) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or int(value) < minimum:
        raise _Usage(f"{flag} must be an integer >= {minimum}; got {value!r}")
    return int(value)


@dataclass
class Launch:
    """What one launch runs; `command()` is the command line that runs it again."""

    prog: str
    nproc: int
    max_restarts: int
    rendezvous: dict[str, str]
    run_dir: Path
    overrides: list[str]
    ft_plan: FtPlan | None = None
    """With --ft: the Lighthouse and the replica jobs (None: one torchrun job of every replica)."""

    @classmethod
    def parse(cls, prog: str, argv: list[str]) -> tuple[Launch, bool]:
        """The launch an argv asks for, its config checked; and whether its run directory was
        made here (none was named)."""
        argv = list(argv)
        ft = FT_FLAG in argv
        argv = [arg for arg in argv if arg != FT_FLAG]
        nproc = (
            _count("--nproc", _take(argv, "--nproc"), 1) or _count("NPROC", os.environ.get("NPROC"), 1) or 4
        )
        restarts = (
            _take(argv, "--max-restarts")
            or os.environ.get("MAX_RESTARTS")
            or str(FT_MAX_RESTARTS if ft else 0)
        )
        rendezvous = {flag: value for flag in RENDEZVOUS_FLAGS if (value := _take(argv, flag)) is not None}
        unknown = [arg for arg in argv if arg.startswith("-")]
        if unknown:
            raise _Usage(
                f"unknown option {unknown[0]}; options are --nproc, --max-restarts, "
                f"{', '.join(RENDEZVOUS_FLAGS)}, {FT_FLAG}, --cfg job, --help"
            )
        if ft and rendezvous:
            raise _Usage(
                f"{FT_FLAG} runs every replica on this machine; over several nodes start the Lighthouse "
                f"and each replica's job yourself (launch/slurm_ft.sbatch, docs/fault_tolerance.md)"
            )
        chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")] or [
            os.environ.get("RUN_DIR")
        ]
        overrides = [a for a in argv if not a.startswith("hydra.run.dir=")]
        if rendezvous and not chosen[-1]:
            raise _Usage("a job over several nodes needs hydra.run.dir on a filesystem every node shares")
        checked = overrides + ([f"hydra.run.dir={chosen[-1]}"] if chosen[-1] else [])
        port = free_port() if ft else 0
        if ft:
            given = [a.split("=", 1)[0] for a in overrides if a.split("=", 1)[0].lstrip("+") in FT_SET]
            if given:
                raise _Usage(f"{given[0]} is set by {FT_FLAG} for each replica's job; remove it")
            checked += [*job_overrides(nproc, 0), f"ft.lighthouse={lighthouse_address(port)}"]
        cfg, _ = load_config(checked)  # before anything
        made_here = not chosen[-1]
        run_dir = new_run_dir() if made_here else Path(chosen[-1])
        max_restarts = _count("--max-restarts", restarts, 0)
        ft_plan = FtPlan(nproc, cfg.ft.quorum, max_restarts, run_dir, overrides, port) if ft else None
        return cls(prog, nproc, max_restarts, rendezvous, run_dir, overrides, ft_plan), made_here

    def command(self) -> str:
        words = [self.prog, *([FT_FLAG] if self.ft_plan else []), "--nproc", str(self.nproc)]
        if self.max_restarts:
            words += ["--max-restarts", str(self.max_restarts)]
        words += [f"{flag}={value}" for flag, value in self.rendezvous.items()]
        return shlex.join([*words, f"hydra.run.dir={self.run_dir}", *self.overrides])

    def torchrun_args(self) -> list[str]:
        where = [f"{flag}={value}" for flag, value in self.rendezvous.items()] or ["--standalone"]
        if self.rendezvous:
            where.append("--rdzv-backend=" + self.rendezvous.get("--rdzv-backend", "c10d"))
        return [
            *dict.fromkeys(where),
            f"--nproc-per-node={self.nproc}",
            f"--max-restarts={self.max_restarts}",
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={self.run_dir}",
            *self.overrides,
        ]


def new_run_dir(root: Path = RUNS_ROOT) -> Path:
    """A directory no other launch has: named by the time, made atomically (os.mkdir fails if
    it exists), with -2, -3, ... for launches in the same second."""
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in range(1, 1000):
        candidate = root / (stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise _Usage(f"no free run directory under {root} for {stamp}; pass hydra.run.dir=")


def _remove_if_unused(run_dir: Path) -> None:
    """Remove a run directory this launch made (and runs/ if it is left empty), when the run
    wrote nothing into it but its lock: a refused launch leaves nothing behind."""
    try:
        if {p.name for p in run_dir.iterdir()} <= {run_lock.LOCK_NAME}:
            for leftover in run_dir.iterdir():
                leftover.unlink()
            run_dir.rmdir()
            if not any(run_dir.parent.iterdir()):
                run_dir.parent.rmdir()
    except OSError:
        pass


def _quiet_torchrun() -> None:
    """torchrun's agent logs each worker's failure and its own shutdown at WARNING and ERROR;
    the workers say what went wrong themselves, in one line."""
    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)


def _failure_line(error) -> tuple[int, str | None]:
    """The exit status, and the one line to print, for a worker group that failed.

    A worker that stopped on purpose (ConfigError: 2, RunError: 1) left its line in its
    torchrun error file: the earliest such line is the cause, whatever torchrun did to the
    other ranks after it. Otherwise the first worker to fail is: an uncaught exception (its
    traceback is above) or a signal gets one line naming the rank."""
    said = [
        (failure.timestamp, rank, failure)
        for rank, failure in error.failures.items()
        if isinstance(failure.error_file_data, dict) and failure.error_file_data.get(ONE_LINE_KEY)
    ]
    if said:  # the status it meant: torchrun may have stopped it with a signal after it wrote
        _, _, failure = min(said)
        return failure.error_file_data[ONE_LINE_KEY], failure.message
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        return 1, f"replica_dist: error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name}"
    if failure.error_file and os.path.exists(failure.error_file):
        return 1, f"replica_dist: error: rank {rank} failed with an exception (traceback above)"
    return failure.exitcode, None


def _stop_message(launch: Launch, original: str) -> tuple[int, str]:
    """The exit status and the line that end a launch stopped by a signal, from what the run
    directory holds: the workers' summary.json says at which step they stopped and saved; a
    checkpoint is claimed only where its manifest is on disk."""
    from replica_dist.run_state import read_summary

    summary = read_summary(launch.run_dir) or {}
    newest = checkpoint.newest_with_manifest(launch.run_dir / "checkpoints")
    if summary.get("status") == "ok":
        return 0, f"replica_dist: the run had finished; its results are in {launch.run_dir}"
    if summary.get("status") == "stopped" and summary.get("checkpoint") == summary.get("step") == newest:
        return (
            0,
            f"replica_dist: stopped after step {newest}, checkpoint saved. Resume with: {launch.command()}",
        )
    if newest is None:
        return (
            0,
            f"replica_dist: stopped before the first checkpoint; nothing to resume. Start again with: {original}",
        )
    return 1, (
        f"replica_dist: the workers ended without saving a checkpoint at the stop; the newest checkpoint "
        f"is of step {newest} (later steps are lost). Resume from it with: {launch.command()}"
    )


def main(argv: list[str] | None = None) -> int:
    from replica_dist.train import info_flags  # the worker's entry point answers the same flags

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.environ.get(PROG_ENV, "replica-dist")
    # A console script's sys.path starts with its bin directory, where `python -m` (run.sh, and
    # torchrun's workers) puts the working directory: a model._target_ or coupling._target_ in
    # the user's own directory must import in this check as it will in the workers.
    if not {"", os.getcwd()} & set(sys.path):
        sys.path.insert(0, os.getcwd())
    try:
        overrides_only = list(argv)  # --cfg job composes the overrides alone
        for flag in ("--nproc", "--max-restarts", *RENDEZVOUS_FLAGS):
            _take(overrides_only, flag)
        overrides_only = [arg for arg in overrides_only if arg != FT_FLAG]
        answered = info_flags(overrides_only, usage=USAGE.format(prog=prog) + "\n" + __doc__)
        if answered is not None:
            return answered
        launch, made_here = Launch.parse(prog, argv)
    except ConfigError as err:
        print(f"replica_dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if launch.ft_plan is not None:
        try:
            return run_ft(launch.ft_plan)
        except FileNotFoundError as err:
            print(f"replica_dist: error: {err}", file=sys.stderr)
            if made_here:
                _remove_if_unused(launch.run_dir)
            return 2
    return _run(launch, made_here, original=shlex.join([prog, *argv]))


def _run(launch: Launch, made_here: bool, original: str) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = parse_args(launch.torchrun_args())
    _quiet_torchrun()
    os.environ[LAUNCHER_ENV] = "1"
    try:
        torchrun(args)
    except SignalException:
        # The agent has passed the signal on and waited for the workers' stop (and killed
        # those that did not stop within its shutdown timeout).
        status, line = _stop_message(launch, original)
        say(line)
        return status
    except ChildFailedError as err:
        status, line = _failure_line(err)
        if line:
            print(line, file=sys.stderr)
        if status == 2 and made_here:
            _remove_if_unused(launch.run_dir)
        return status
    return 0


if __name__ == "__main__":
    from replica_dist.train import run_and_exit

    run_and_exit(main)
