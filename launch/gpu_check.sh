#!/usr/bin/env bash
# The GPU checks of "At GPU speed", on one GPU with NCCL, in about 6 minutes:
#   1. plain steps make no synchronizing call: the CUDA tests under
#      torch.cuda.set_sync_debug_mode("error"), ReplicaCoupling alone and the trainer's whole loop
#      (tests/test_host_sync.py), and fp16 with a gradient scaler (tests/test_recipe.py);
#   2. the benchmark (launch/bench.sh), one rank, pipelined timing (the host runs ahead of the GPU
#      as in training), three runs in a row for the ~1M-weight MLP and three shorter ones for
#      ResNet-18, whose DataLoader gets 8 workers (in the main process alone it bounds the step);
#   3. one MLP run with sectioned timing (compute / communication / update, the stream drained
#      at each cut);
#   4. the trainer's default job.
# Each part has its own time limit and the script goes on after a failure; the last line says
# which parts failed. OUT (default runs/gpu_check) keeps the reports (bench_*.md, bench_*.json)
# and the log (gpu_check.log). BACKEND=gloo runs the same on a machine without a GPU, to try
# the script (the CUDA tests are then skipped), and BENCH_ARGS (say "--steps 8 --warmup 2") goes
# to every benchmark.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
BACKEND="${BACKEND:-nccl}"
PYTHON="${PYTHON:-python3}"
BENCH_ARGS="${BENCH_ARGS:-}"
VARIANTS="plain loop,independent,coupled overlapped,linear overlapped,coupled every 16,ddp"
export OUT BACKEND PYTHON BENCH_ARGS VARIANTS
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
began=$SECONDS
failed=()
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
git log -1 --format='commit %h %s' 2>/dev/null || true

part() {  # name limit_s function args...: run it, say how long it took, remember a failure
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name"
    timeout "$limit" bash -c '"$@"' bash "$@"
    local rc=$?
    echo "-- $name: exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

sync_tests() {
    "$PYTHON" -m pytest -q -p no:cacheprovider -o addopts= -rs tests/test_host_sync.py tests/test_recipe.py -k cuda
}
bench() {  # name args...: the benchmark on one rank; the report's table and ratios are printed
    local name=$1; shift
    set -o pipefail
    NPROC=1 launch/bench.sh --variants "$VARIANTS" --bandwidth-iterations 20 --work "$OUT/bench_runs" \
        --report "$OUT/bench_$name.md" --json "$OUT/bench_$name.json" \
        dist.backend="$BACKEND" dist.timeout_s=60 $BENCH_ARGS "$@" 2>&1 | grep "^Machine\|^Model\|^|\|^[A-Za-z.]*Error:"
}
trainer() {
    set -o pipefail
    "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m replica_dist.train \
        hydra.run.dir="$OUT/default_run" dist.backend="$BACKEND" dist.timeout_s=60 | tail -n 3
}
export -f sync_tests bench trainer

part "sync debug mode: error" 180 sync_tests
for run in 1 2 3; do
    part "benchmark mlp pipelined run $run" 90 bench "mlp_pipelined_run$run" --pipelined
done
for run in 1 2 3; do
    part "benchmark resnet18 pipelined run $run" 150 bench "resnet18_pipelined_run$run" \
        --workload resnet18 --rounds 1 --steps 120 --warmup 20 --pipelined \
        data.num_workers=8 data.persistent_workers=true
done
part "benchmark mlp sectioned" 90 bench mlp_sectioned --rounds 1
part "trainer default job" 90 trainer

rm -rf "$OUT/bench_runs" "$OUT/default_run"
echo "gpu_check: $((SECONDS - began)) s; failed: ${failed[*]:-none}"
[ "${#failed[@]}" -eq 0 ]
