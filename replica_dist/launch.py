"""`launch/run.sh` and the `replica-dist` command (the same program): one worker per replica.

It checks the config before anything starts (a bad one is one line and exit status 2, and no
run directory is made), gives the launch its own run directory (`runs/<date>_<time>`, with a
suffix when two launches start in the same second) unless `hydra.run.dir=...` or `RUN_DIR`
names one, and runs `torchrun --standalone` in this process with torchrun's own machinery.
Ctrl-C or SIGTERM make every worker save a checkpoint at the next step boundary; this process
then prints the command that resumes the run and exits 0. A worker's own one-line error is not
buried under torchrun's report of the failure: this process adds at most one line.

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
from pathlib import Path

from replica_dist import checkpoint, run_lock
from replica_dist.config import ConfigError, load_config

USAGE = "usage: {prog} [--nproc N] [--max-restarts K] [--cfg job] [--help] [overrides ...]"
PROG_ENV = "REPLICA_DIST_PROG"
"""How the resume command names this program: launch/run.sh sets it to itself."""
LAUNCHER_ENV = "REPLICA_DIST_LAUNCHER"
"""Set in the workers' environment: the launcher, not the worker, prints how to resume."""
RUNS_ROOT = Path("runs")


class _Usage(ConfigError):
    """A bad launcher option (exit status 2, like a bad config key)."""


def _take_int(argv: list[str], flag: str, default: int, minimum: int) -> int:
    """Remove `flag N` or `flag=N` from argv and return N (or the default)."""
    value: str | None = None
    for i, arg in enumerate(argv):
        if arg == flag:
            if i + 1 == len(argv):
                raise _Usage(f"{flag} needs a value")
            value = argv.pop(i + 1)
            argv.pop(i)
            break
        if arg.startswith(flag + "="):
            value = argv.pop(i).split("=", 1)[1]
            break
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = minimum - 1
    if number < minimum:
        raise _Usage(f"{flag} must be an integer >= {minimum}; got {value!r}")
    return number


def _env_int(name: str, default: int, minimum: int) -> int:
    value = os.environ.get(name, "")
    if not value:
        return default
    if not value.isdigit() or int(value) < minimum:
        raise _Usage(f"{name} must be an integer >= {minimum}; got {value!r}")
    return int(value)


def _run_dir_override(overrides: list[str]) -> str | None:
    chosen = [o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")]
    return chosen[-1] if chosen else None


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
    """The exit status, and at most one line, for a worker group that failed.

    The first worker to fail is the cause (torchrun then stops the others with SIGTERM). A
    worker that stopped on purpose (ConfigError: 2, RunError: 1) has printed its own line and
    wrote no error file; an uncaught exception (its traceback is above) or a signal gets one
    line here naming the rank."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        return 1, f"replica_dist: error: rank {rank} was killed by {signal.Signals(-failure.exitcode).name}"
    if failure.error_file and os.path.exists(failure.error_file):
        return 1, f"replica_dist: error: rank {rank} failed with an exception (traceback above)"
    return failure.exitcode, None


def _resume_command(prog: str, nproc: int, max_restarts: int, run_dir: str, overrides: list[str]) -> str:
    words = [prog, "--nproc", str(nproc)]
    if max_restarts:
        words += ["--max-restarts", str(max_restarts)]
    words += [f"hydra.run.dir={run_dir}"]
    words += [o for o in overrides if not o.startswith("hydra.run.dir=")]
    return shlex.join(words)


def _stop_message(run_dir: Path, resume: str, original: str) -> str:
    root = run_dir / "checkpoints"
    step = checkpoint.newest_with_manifest(root) if root.is_dir() else None
    if (run_dir / "summary.json").exists():
        return f"replica_dist: the run had finished; its results are in {run_dir}"
    if step is None:
        return f"replica_dist: stopped before the first checkpoint; nothing to resume. Start again with: {original}"
    return f"replica_dist: stopped after step {step}, checkpoint saved. Resume with: {resume}"


def main(argv: list[str] | None = None) -> int:
    from replica_dist.train import info_flags  # the worker's entry point answers the same flags

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = os.environ.get(PROG_ENV, "replica-dist")
    original = shlex.join([prog, *argv])
    try:
        answered = info_flags(argv, usage=USAGE.format(prog=prog) + "\n" + __doc__)
        if answered is not None:
            return answered
        nproc = _take_int(argv, "--nproc", _env_int("NPROC", 4, 1), 1)
        max_restarts = _take_int(argv, "--max-restarts", _env_int("MAX_RESTARTS", 0, 0), 0)
        overrides = argv
        if any(arg.startswith("-") for arg in overrides):
            unknown = next(arg for arg in overrides if arg.startswith("-"))
            raise _Usage(f"unknown option {unknown}; options are --nproc, --max-restarts, --cfg job, --help")
        chosen = _run_dir_override(overrides) or os.environ.get("RUN_DIR") or None
        load_config(overrides + ([f"hydra.run.dir={chosen}"] if chosen else []))  # checked before anything
        made_here = chosen is None
        run_dir = new_run_dir() if made_here else Path(chosen)
    except ConfigError as err:
        print(f"replica_dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    overrides = [o for o in overrides if not o.startswith("hydra.run.dir=")]
    resume = _resume_command(prog, nproc, max_restarts, str(run_dir), overrides)
    return _launch(nproc, max_restarts, run_dir, overrides, made_here, resume, original)


def _launch(
    nproc: int,
    max_restarts: int,
    run_dir: Path,
    overrides: list[str],
    made_here: bool,
    resume: str,
    original: str,
) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    args = parse_args(
        [
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={max_restarts}",
            "-m",
            "replica_dist.train",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ]
    )
    _quiet_torchrun()
    os.environ[LAUNCHER_ENV] = "1"
    try:
        torchrun(args)
    except SignalException:
        # The agent has passed the signal on and waited for the workers' clean stop.
        print(_stop_message(run_dir, resume, original), file=sys.stderr)
        return 0
    except ChildFailedError as err:
        status, line = _failure_line(err)
        if line:
            print(line, file=sys.stderr)
        if status == 2 and made_here:
            _remove_if_unused(run_dir)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
