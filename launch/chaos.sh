#!/usr/bin/env bash
# Kill a random replica's worker every ~30 s (Poisson), beside a run of launch/run.sh --ft:
#   launch/run.sh --ft --nproc 4 hydra.run.dir=runs/ft &
#   launch/chaos.sh --every 30 runs/ft
# See replica_dist/experiments/chaos.py and docs/fault_tolerance.md.
set -euo pipefail
exec python -m replica_dist.experiments.chaos "$@"
