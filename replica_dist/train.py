"""Entry point: `torchrun --standalone --nproc_per_node=4 -m replica_dist.train [overrides]`.

Rank r trains replica r. Parse the config, join the process group, train, always tear down.
Overrides are Hydra's (`optim.lr=0.1`, `coupling=linear`, `hydra.run.dir=PATH`). The config
is composed with Hydra's compose API rather than `@hydra.main`, so that a bad override gives
one line naming the key, and so that `--multirun` cannot start a sweep inside every rank
(run sweeps as an outer loop of torchrun jobs).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from torch.distributed.elastic.multiprocessing.errors import record

from replica_dist import dist
from replica_dist.config import CONF_DIR, ConfigError, load_config
from replica_dist.guard import Guard, StopRequested
from replica_dist.loop import train

log = logging.getLogger("replica_dist")


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


@record
def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        print(__doc__)
        print(f"Config groups and options: see {CONF_DIR} and replica_dist/config.py.")
        return 0
    rank = int(os.environ.get("RANK", 0))
    try:
        cfg, run_dir = load_config(argv)
        setup_logging(rank)
        guard = Guard(cfg.guard.nonfinite, cfg.guard.max_consecutive_skips)
        guard.install_signal_handlers()
        device = dist.init(cfg.dist)
        try:
            report(train(cfg, run_dir, device, guard), run_dir)
        except StopRequested as stop:
            log.info("%s: checkpoint saved; run the same command to resume", stop)
        finally:
            dist.teardown()
    except ConfigError as err:
        if rank == 0:
            print(f"replica_dist: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
