"""Kill a random replica's worker now and then, to try a fault-tolerant setup before trusting it.

    launch/chaos.sh [--every 30] [--seed 0] [--duration S] [--json FILE] [RUN_DIR]

Beside a run started with `launch/run.sh --ft` (docs/fault_tolerance.md): every so often (the
gaps are exponential with mean --every seconds: a Poisson process of faults, like torchft's own
"punisher") it SIGKILLs the worker of one replica, chosen at random among those alive, and says
so in one line. Each kill is a lost replica to the others and a restart to its own torchrun
job. With RUN_DIR only the workers of that run (its `hydra.run.dir=`) are candidates. It ends
after --duration seconds, or when no worker of an ft run has been seen for 30 s; --json writes
every kill (seconds since the start, replica, pid).

Linux only: the workers are found through /proc (a worker's command line holds
`-m replica_dist.train` and `ft.replica_id=`, its torchrun agent's also `torch.distributed.run`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

GONE_AFTER_S = 30.0
"""With no worker of an ft run for this long, the run is over and so is the chaos."""


def ft_workers(run_dir: str | None = None) -> dict[int, int]:
    """pid -> replica of every live worker of an ft run (of `run_dir`'s run if given)."""
    workers = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue  # ended meanwhile, or not ours to read
        if "replica_dist.train" not in words or "torch.distributed.run" in words:
            continue
        replica = next((w.split("=", 1)[1] for w in words if w.startswith("ft.replica_id=")), None)
        if replica is None or not replica.isdigit():
            continue
        if run_dir is not None and f"hydra.run.dir={run_dir}" not in words:
            continue
        workers[int(entry.name)] = int(replica)
    return workers


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="?", help="only this run's workers (its hydra.run.dir)")
    parser.add_argument("--every", type=float, default=30.0, help="mean seconds between kills")
    parser.add_argument("--seed", type=int, default=0, help="seed of the gaps and the choices")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    parser.add_argument("--json", type=Path, default=None, help="write every kill here")
    args = parser.parse_args(argv)
    if args.every <= 0:
        parser.error(f"--every must be > 0; got {args.every}")
    rng = random.Random(args.seed)
    began = last_seen = time.monotonic()
    kills = []
    next_kill = began + rng.expovariate(1.0 / args.every)
    try:
        while True:
            now = time.monotonic()
            if args.duration is not None and now - began >= args.duration:
                break
            workers = ft_workers(args.run_dir)
            if workers:
                last_seen = now
            elif now - last_seen > GONE_AFTER_S:
                break
            if workers and now >= next_kill:
                pid = rng.choice(sorted(workers))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue  # it ended by itself: choose again
                kill = {"seconds": round(now - began, 2), "replica": workers[pid], "pid": pid}
                kills.append(kill)
                print(
                    f"chaos: {kill['seconds']:.1f} s: killed replica {kill['replica']}'s worker (pid {pid})",
                    flush=True,
                )
                next_kill = now + rng.expovariate(1.0 / args.every)
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        if args.json is not None:
            args.json.write_text(
                json.dumps({"every_s": args.every, "seed": args.seed, "kills": kills}, indent=1)
            )
    print(f"chaos: {len(kills)} kills in {time.monotonic() - began:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
