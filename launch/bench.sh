#!/usr/bin/env bash
# The benchmark of docs/benchmark.md: every coupling variant, DDP and PyTorch's
# PeriodicModelAverager on the same ~1M-weight model, side by side in one torchrun job.
#   launch/bench.sh                                   # 2 ranks, CPU/gloo (or one GPU each)
#   NPROC=2 launch/bench.sh dist.backend=gloo dist.device=cuda   # 2 ranks sharing one GPU
#   REPORT=docs/benchmark_cpu.md launch/bench.sh      # also write the report there
#   launch/bench.sh --against REF [--steps 1000] [--rounds 3] [--variants tanh,ddp,none]
#       # the trainer's jobs now against commit REF's, each in its own venv, interleaved
#       # (replica_dist.experiments.against; run it before a change to the step lands)
# Extra arguments go to `python -m replica_dist.experiments.bench` (flags such as --steps, or trainer overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = --against ]; then
    exec "${PYTHON:-python3}" -m replica_dist.experiments.against "$@"
fi
NPROC="${NPROC:-2}"
args=()
[ -n "${REPORT:-}" ] && args+=(--report "$REPORT")
exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" \
    -m replica_dist.experiments.bench "${args[@]}" "$@"
