#!/usr/bin/env bash
# Which coupling wins at equal bytes? Trains the equal-bytes part of the study (docs/study_bytes.md:
# 4 replicas on digits and on the teacher data, 3 seeds; none, ddp, and average/tanh/linear/diloco
# in fp32 and int8 at three byte budgets per replica), one torchrun job after another, then
# writes its tables, docs/study_bytes.png and refreshes docs/study_bytes.md. 156 jobs: 81
# minutes on 2 CPU cores, up to 4 hours on a loaded one (see bytes_study.py); --quick: 20 jobs, ~3 min idle.
#   launch/study_bytes.sh --runs runs/study_bytes                 # or STUDY_BYTES_RUNS_DIR=...
#   launch/study_bytes.sh --runs runs/study_bytes --plot-only     # redraw from finished runs
#   launch/study_bytes.sh --quick --runs /tmp/study_bytes_quick   # the pipeline; docs go to --runs
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m replica_dist.experiments.bytes_study "$@"
