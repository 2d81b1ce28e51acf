#!/usr/bin/env bash
# Run on every node of a multi-node job (c10d rendezvous, no extra services):
#   HEAD=node0.example.com NNODES=2 NPROC=8 JOB=job42 launch/multinode.sh coupling=linear
# RUN_DIR must be on a filesystem every node sees: each rank writes its own replica there.
set -euo pipefail
: "${HEAD:?set HEAD to the host name of the rendezvous node}"
NNODES="${NNODES:-2}"
NPROC="${NPROC:-8}"
JOB="${JOB:-replica_dist}"
RUN_DIR="${RUN_DIR:-runs/$JOB}"
export REPLICA_DIST_PROG="${REPLICA_DIST_PROG:-$0}"
exec python -m replica_dist.launch --nnodes="$NNODES" --nproc="$NPROC" \
    --rdzv-endpoint="$HEAD:29400" --rdzv-id="$JOB" hydra.run.dir="$RUN_DIR" "$@"
