"""Entry point: `torchrun --standalone --nproc_per_node=4 -m replica_dist.train [overrides]`.

Rank r trains replica r. Parse the config, join the process group, train, always tear down.
Overrides are Hydra's (`optim.lr=0.1`, `coupling=linear`, `hydra.run.dir=PATH`). The config
is composed with Hydra's compose API rather than `@hydra.main`, so that a bad override gives
one line naming the key, and so that `--multirun` cannot start a sweep inside every rank
(run sweeps as an outer loop of torchrun jobs).
"""

from __future__ import annotations

import ctypes
import json
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf
from torch.distributed.elastic.multiprocessing.errors import record

from replica_dist import dist
from replica_dist.config import ConfigError, help_text, load_config
from replica_dist.errors import RunError
from replica_dist.guard import Guard, StopRequested
from replica_dist.worker_protocol import LAUNCHER_ENV, ONE_LINE_KEY

log = logging.getLogger("replica_dist")
USAGE = "usage: torchrun [torchrun options] -m replica_dist.train [--cfg job] [--help] [overrides ...]"


def setup_logging(rank: int) -> None:
    """Progress from rank 0 only; other ranks speak up for warnings and errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank {rank}] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def report(summary: dict, run_dir: Path) -> None:
    metric = "test_accuracy" if summary["task"] == "classification" else "test_loss"
    replicas = ", ".join(f"{r[metric]:.4f}" for r in summary["replicas"])
    log.info(
        "%s | replicas %s | center %.4f | ensemble %.4f",
        metric,
        replicas,
        summary["center"][metric],
        summary["ensemble"][metric],
    )
    log.info("run directory %s | tensorboard --logdir %s", run_dir, run_dir / "tb")


def info_flags(argv: list[str], usage: str = "") -> int | None:
    """Answer `--help` and `--cfg job` (exit status 0) and refuse `--multirun` (2); None for a
    command line that asks to train. Shared by this entry point and the launcher."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage or f"{USAGE}\n{__doc__}")
        print(help_text())
        return 0
    if any(arg in ("-m", "--multirun") for arg in argv):
        raise ConfigError(
            "--multirun is not supported: run a sweep as one launch per setting "
            "(see launch/study.sh), each its own torchrun job"
        )
    for i, arg in enumerate(argv):
        if arg in ("--cfg", "-c") or arg.startswith("--cfg="):
            what = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else "")
            if what != "job":
                raise ConfigError(f"--cfg takes 'job' (print the composed config); got {what!r}")
            rest = [a for j, a in enumerate(argv) if j not in (i, i + 1) and a != arg]
            cfg, run_dir = load_config(rest)
            print(f"# hydra.run.dir: {run_dir}")
            print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
            return 0
    return None


def watch_parent() -> None:
    """Under torchrun, stop (as on SIGTERM) when the agent that started this worker is gone: a
    killed agent (OOM killer, a hard stop of the job) must not leave workers training on,
    writing into a run directory that a resubmission will use. Linux sends SIGTERM the moment
    the parent dies (PR_SET_PDEATHSIG); elsewhere a thread looks once a second."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the agent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="watch-parent", daemon=True).start()


@record
def main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", 0))
    try:
        answered = info_flags(argv)
        if answered is not None:
            return answered
        cfg, run_dir = load_config(argv)
        # Here, not at the top: the launcher imports this module for info_flags alone, and
        # the training code's imports (TensorBoard among them) would only delay its workers.
        if cfg.ft.enabled:  # one replica of a fault-tolerant run, its own job
            from replica_dist.ft_loop import train
        else:
            from replica_dist.loop import train

        setup_logging(rank)
        guard = Guard(cfg.guard.nonfinite, cfg.guard.max_consecutive_skips)
        guard.install_signal_handlers()
        if hasattr(signal, "SIGHUP"):
            # A closed terminal, a dropped ssh session or `tmux kill-session` is a stop like
            # SIGTERM: torchrun's agent passes its own SIGHUP on to the workers, which would
            # otherwise die without saving.
            signal.signal(signal.SIGHUP, signal.getsignal(signal.SIGTERM))
        if "TORCHELASTIC_RUN_ID" in os.environ:
            watch_parent()
        device = dist.init(cfg.dist)
        try:
            summary = train(cfg, run_dir, device, guard)
            if not cfg.ft.enabled:  # a replica job under ft logs its own results (replica_dist.ft_loop)
                report(summary, run_dir)
        except StopRequested as stop:
            if os.environ.get(LAUNCHER_ENV):  # the launcher prints the exact command that resumes
                log.info("%s: checkpoint saved", stop)
            else:
                log.info(
                    "%s: checkpoint saved; resume with the same command and hydra.run.dir=%s", stop, run_dir
                )
        except RunError as err:
            return fail(rank, err, err.exit_status)
        finally:
            dist.teardown()
    except ConfigError as err:
        return fail(rank, err, 2)
    return 0


def fail(rank: int, err: Exception, status: int) -> int:
    """Say `err` in one line and return the exit status. Under the launcher every rank leaves
    the line in its torchrun error file and the launcher prints the first one: a rank that
    prints it itself could be stopped by torchrun before it does, once another rank has
    exited. Otherwise rank 0 prints it."""
    line = f"replica_dist: error: {err}"
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if os.environ.get(LAUNCHER_ENV) and error_file:
        with open(error_file, "w") as out:
            json.dump({"message": line, "timestamp": int(time.time()), ONE_LINE_KEY: status}, out)
    elif rank == 0:
        print(line, file=sys.stderr)
    return status


def exit_now(status: int) -> None:
    """End the process with `status` once its output is flushed, skipping the interpreter's
    teardown of torch's modules (0.5-1 s of CPU a process, on every run's end and on every
    restart's teardown): by now every file the run writes is complete and closed. A process
    with children of its own (DataLoader workers) exits the ordinary way, which stops them."""
    if multiprocessing.active_children():
        sys.exit(status)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_and_exit(entry_point) -> None:
    """exit_now(entry_point()); an exception that escapes it (a peer died in a collective: the
    traceback torchrun reports) is printed as Python would and ends the process with status 1
    the same way, so that torchrun can restart the group without waiting for the teardown."""
    try:
        status = entry_point()
    except Exception:
        sys.excepthook(*sys.exc_info())
        status = 1
    exit_now(status)


if __name__ == "__main__":
    run_and_exit(lambda: main(sys.argv[1:]))
