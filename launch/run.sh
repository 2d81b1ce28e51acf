#!/usr/bin/env bash
# Train NPROC coupled replicas on this machine (default 4, CPU/gloo or one GPU each).
#   launch/run.sh                              # the default job: tanh coupling on digits
#   NPROC=2 launch/run.sh coupling=linear optim.lr=0.1
#   RUN_DIR=runs/mine launch/run.sh +experiment=note
# The run directory is decided here, once, so every rank writes into the same one.
set -euo pipefail
NPROC="${NPROC:-4}"
RUN_DIR="${RUN_DIR:-runs/$(date +%Y-%m-%d_%H-%M-%S)}"
exec torchrun --standalone --nproc_per_node="$NPROC" \
    -m replica_dist.train hydra.run.dir="$RUN_DIR" "$@"
