#!/usr/bin/env bash
# The user's note reproduced: trains its experiment under torchrun (2 replicas, uncoupled,
# tanh-coupled at eta=1, and eta in {0.01, 0.1}; fixed seed), then writes note_figure.png,
# note_sweep.png and note_table.md into the runs directory (or --out DIR) and prints the
# table. About a minute on CPU. The tracked copies in docs/ change only with --out docs.
#   launch/note_figure.sh                               # runs and figures in runs/note_figure/<timestamp>
#   NOTE_RUNS_DIR=runs/note_a launch/note_figure.sh     # or --runs DIR
#   launch/note_figure.sh --runs runs/note_a --plot-only   # redraw from existing runs
#   launch/note_figure.sh --out docs                    # update docs/note_figure.png, ... in place
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m replica_dist.experiments.note_figure "$@"
