#!/usr/bin/env bash
# The GPU path on a machine with at least one GPU, in a few minutes:
#   1. NCCL, one rank: the default job on cuda:0;
#   2. gloo with CUDA tensors, two ranks sharing the GPU: tanh coupling and DDP;
#   3. a run stopped by SIGTERM and resumed, against an uninterrupted one.
# Each run's summary.json is printed; OUT (default runs/gpu_check) keeps the run directories.
set -euo pipefail
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

echo "== preempted_and_resumed (nccl)"
OUT="$OUT/resume" launch/resume_check.sh dist.backend=nccl
