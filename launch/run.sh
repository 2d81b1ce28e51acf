#!/usr/bin/env bash
# Train coupled replicas on this machine, one process each (default 4; CPU/gloo or one GPU each).
#   launch/run.sh                                  # the default job: tanh coupling on digits
#   launch/run.sh --nproc 2 coupling=linear optim.lr=0.1
#   launch/run.sh hydra.run.dir=runs/mine +experiment=note
#   launch/run.sh --help                           # every config group and key
# Each launch gets its own run directory (runs/<date>_<time>) unless hydra.run.dir (or RUN_DIR)
# names one; an interrupted run prints the command that resumes it. NPROC and MAX_RESTARTS set
# the defaults of --nproc and --max-restarts. See replica_dist/launch.py.
set -euo pipefail
export REPLICA_DIST_PROG="${REPLICA_DIST_PROG:-$0}"
exec python -m replica_dist.launch "$@"
