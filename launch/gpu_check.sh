#!/usr/bin/env bash
# The GPU path on a machine with at least one GPU, in under 8 minutes:
#   1. NCCL, one rank: the default job on cuda:0;
#   2. gloo with CUDA tensors, ranks sharing the GPU: tanh coupling and DDP on two ranks, and
#      2 replicas x 2 data-parallel ranks (parallel.dp=2) on four;
#   3. a run stopped by SIGTERM and resumed, against an uninterrupted one;
#   4. the benchmark (launch/bench.sh): NCCL with one rank (with the copies between host and
#      GPU of coupled steps), and gloo with CUDA tensors on two ranks sharing the GPU;
#   5. plain steps under torch.cuda.set_sync_debug_mode("error") (tests/test_host_sync.py).
# Each run's summary.json is printed; OUT (default runs/gpu_check) keeps the run directories
# and the benchmark reports (bench_*.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())"
run() {  # name nproc overrides...
    local name=$1 nproc=$2; shift 2
    echo "== $name"
    /usr/bin/time -f "$name wall %e s" timeout 240 python3 -m torch.distributed.run --standalone \
        --nproc_per_node="$nproc" -m replica_dist.train hydra.run.dir="$OUT/$name" dist.timeout_s=60 "$@" \
        | tail -n 3
    python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print({k: s[k] for k in ('steps','wall_seconds','world_size','center','ensemble')})" "$OUT/$name/summary.json"
}
run nccl_world1_default 1 dist.backend=nccl
run gloo_cuda_world2_tanh 2 dist.backend=gloo dist.device=cuda train.steps=300
run gloo_cuda_world2_ddp 2 dist.backend=gloo dist.device=cuda coupling=ddp train.steps=300
run gloo_cuda_world4_dp2 4 dist.backend=gloo dist.device=cuda parallel.dp=2 train.steps=300

echo "== preempted_and_resumed (nccl)"
OUT="$OUT/resume" launch/resume_check.sh dist.backend=nccl

bench() {  # name nproc args...
    local name=$1 nproc=$2; shift 2
    echo "== benchmark: $name"
    NPROC="$nproc" /usr/bin/time -f "benchmark $name wall %e s" timeout 300 launch/bench.sh \
        --work "$OUT/bench_runs" --report "$OUT/bench_$name.md" --json "$OUT/bench_$name.json" \
        dist.timeout_s=60 "$@" 2>&1 | grep -v "^W[0-9]\|OMP_NUM_THREADS\|^\*\*\*"
}
bench nccl_world1 1 dist.backend=nccl
bench gloo_cuda_world2 2 dist.backend=gloo dist.device=cuda

echo "== plain steps make no synchronizing call (sync debug mode: error)"
timeout 120 python3 -m pytest -q tests/test_host_sync.py -k cuda 2>&1 | tail -n 3
