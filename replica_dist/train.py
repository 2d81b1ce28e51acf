"""Entry point: `torchrun --standalone --nproc_per_node=4 -m replica_dist.train [overrides]`.

Rank r trains replica r. Parse the config, join the process group, train, always tear down.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.elastic.multiprocessing.errors import record

from replica_dist import dist
from replica_dist.config import Config, ConfigError, register_configs
from replica_dist.loop import train

register_configs()
log = logging.getLogger("replica_dist")


def setup_logging(rank: int) -> None:
    """Progress from rank 0 only; other ranks speak up for warnings and errors."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("[%(asctime)s rank " + str(rank) + "] %(message)s", "%H:%M:%S"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)


def fail(message: str) -> None:
    """One line on stderr (from one rank) and a non-zero exit."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(f"replica_dist: error: {message}", file=sys.stderr)
    sys.exit(2)


def to_config(dict_cfg: DictConfig) -> Config:
    try:
        return OmegaConf.to_object(dict_cfg)
    except OmegaConfBaseException as err:
        # OmegaConf wraps the ConfigError raised by a dataclass's __post_init__.
        cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else err
        fail(str(cause).splitlines()[0])


@record
def run(cfg: Config, run_dir: Path) -> None:
    setup_logging(int(os.environ.get("RANK", 0)))
    device = dist.init(cfg.dist)
    try:
        summary = train(cfg, run_dir, device)
        log.info("replica test accuracy: %s", ", ".join(f"{r.get('test_accuracy', float('nan')):.4f}" for r in summary["replicas"]))
        log.info("center %s | ensemble %s", summary["center"], summary["ensemble"])
        log.info("run directory: %s  (tensorboard --logdir %s)", run_dir, run_dir / "tb")
    except ConfigError as err:
        fail(str(err))
    finally:
        dist.teardown()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(dict_cfg: DictConfig) -> None:
    cfg = to_config(dict_cfg)
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
