#!/usr/bin/env bash
# Preemption end to end: one run uninterrupted; the same run sent SIGTERM through the launcher once
# its checkpoint at step 500 exists, then started again with the same command; the largest
# difference between the two runs' final weights is printed (0 on CPU).
#   launch/resume_check.sh                         # CPU, gloo
#   launch/resume_check.sh dist.backend=nccl       # one GPU
set -euo pipefail
OUT="${OUT:-runs/resume_check}"
NPROC="${NPROC:-1}"
train=(python3 -m replica_dist.launch --nproc="$NPROC"
       train.steps=3000 checkpoint.every=250 log.every=500 eval.every=1000 "$@")
"${train[@]}" hydra.run.dir="$OUT/uninterrupted" | grep -E "step 3000/"
# exec: the signal below must reach the launcher (torchrun's agent), which passes it on to its workers.
(exec "${train[@]}" hydra.run.dir="$OUT/preempted" > "$OUT.preempted.log" 2>&1) &
launcher=$!
until [ -f "$OUT/preempted/checkpoints/step-00000500/manifest.json" ]; do
    kill -0 "$launcher" 2>/dev/null || { echo "run ended before step 500" >&2; exit 1; }
    sleep 0.05
done
kill -TERM "$launcher"
wait "$launcher" || true
grep -E "stopped on request" "$OUT.preempted.log"
"${train[@]}" hydra.run.dir="$OUT/preempted" | grep -E "resuming from|step 3000/"
python3 - "$OUT" <<'PY'
import sys, torch
a = torch.load(f"{sys.argv[1]}/uninterrupted/weights/replica_0.pt")
b = torch.load(f"{sys.argv[1]}/preempted/weights/replica_0.pt")
print("max |uninterrupted - resumed| over all weights:", max((a[k] - b[k]).abs().max().item() for k in a))
PY
