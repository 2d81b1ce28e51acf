#!/usr/bin/env bash
# The user's note reproduced: trains its experiment under torchrun (2 replicas, uncoupled,
# tanh-coupled at eta=1, and eta in {0.01, 0.1}; fixed seed), then writes docs/note_figure.png,
# docs/note_sweep.png and docs/note_table.md and prints the table. About a minute on CPU.
#   launch/note_figure.sh                               # runs into runs/note_figure/<timestamp>
#   NOTE_RUNS_DIR=runs/note_a launch/note_figure.sh     # or --runs DIR
#   launch/note_figure.sh --runs runs/note_a --plot-only   # redraw from existing runs
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m replica_dist.note_figure "$@"
