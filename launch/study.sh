#!/usr/bin/env bash
# Does coupling help? Trains the study of docs/study.md (4 replicas on digits: a sweep of tanh
# and linear coupling, none/ddp/tanh/linear/average over 5 seeds with their local energy, and
# an 8-layer tanh MLP), one torchrun job after another, then writes its tables, docs/study_*.png
# and refreshes the tables of docs/study.md. About 25 minutes on 2 CPU cores; --quick: 2-3.
#   launch/study.sh --runs runs/study                 # or STUDY_RUNS_DIR=runs/study
#   launch/study.sh --runs runs/study --plot-only     # redraw from finished runs
#   launch/study.sh --quick --runs /tmp/study_quick   # the pipeline end to end; docs go to --runs
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m replica_dist.experiments.study "$@"
