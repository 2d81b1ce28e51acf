"""`launch/run.sh --ft` and `replica-dist --ft`: a Lighthouse and one torchrun job per replica.

On one machine: the Lighthouse runs in this process (torchft's LighthouseServer, its quorum
needing ft.min_replicas, a majority of --nproc by default), and each replica is its own torchrun
job of one worker (`--max-restarts` restarts that replica's worker only), all with the same run
directory and `ft.enabled=true ft.replicas=N ft.replica_id=r ft.lighthouse=ADDRESS`. Ctrl-C or
SIGTERM is passed on to every job. The exit status is the first failed job's (0 when all end
with 0). See docs/fault_tolerance.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from replica_dist.config import ConfigError, load_config


def ft_overrides(replicas: int, replica: int, lighthouse: str) -> list[str]:
    """The overrides that make a trainer one replica job of a fault-tolerant run."""
    return [
        "ft.enabled=true",
        f"ft.replicas={replicas}",
        f"ft.replica_id={replica}",
        f"ft.lighthouse={lighthouse}",
    ]


def run(launch) -> int:
    """Run `launch` (a launch.Launch: its nproc is the number of replicas) under ft."""
    if launch.rendezvous:
        raise ConfigError("--ft runs on one machine for now: start each replica's job by hand on a cluster")
    run_dir = f"hydra.run.dir={launch.run_dir}"
    cfg, _ = load_config([run_dir, *launch.overrides, *ft_overrides(launch.nproc, 0, "http://localhost:0")])
    from replica_dist.ft import import_torchft

    import_torchft()
    from torchft.coordination import LighthouseServer

    lighthouse = LighthouseServer(bind="[::]:0", min_replicas=cfg.ft.quorum)
    # torchft's Rust side logs every quorum at INFO; warnings and errors only, unless asked.
    env = {"RUST_LOG": "warn"} | dict(os.environ)
    jobs: list[subprocess.Popen] = []

    def pass_on(signum, frame) -> None:
        for job in jobs:
            job.send_signal(signum)

    handlers = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for r in range(launch.nproc):
            jobs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=1"]
                    + [f"--max-restarts={launch.max_restarts}", "-m", "replica_dist.train", run_dir]
                    + [*launch.overrides, *ft_overrides(launch.nproc, r, lighthouse.address())],
                    env=env,
                )
            )
        statuses = [job.wait() for job in jobs]
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        for job in jobs:
            if job.poll() is None:
                job.kill()
        lighthouse.shutdown()
    return next((status for status in statuses if status), 0)
