"""replica_dist/experiments/step_ops.py under torchrun, as docs/benchmark.md runs it: the
operations it counts per step are the ones the coupling's rule makes, of the model's size."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_runs import REPO
from worlds import COLLECTIVE_TIMEOUT_S

# digits (64 features, 10 classes) through one hidden layer of 32: 64*32 + 32 + 32*10 + 10
WEIGHTS = 64 * 32 + 32 + 32 * 10 + 10


def _ops(tmp_path, coupling: str) -> dict[str, dict]:
    out = tmp_path / f"{coupling}.json"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "replica_dist/experiments/step_ops.py", "--first", "3", "--last", "6", "--json", str(out),
        f"coupling={coupling}", "train.steps=8", "model.hidden=[32]", "log.every=100", "eval.every=100",
        "checkpoint.every=0", f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}", f"hydra.run.dir={tmp_path / coupling}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "operations" in done.stdout and "ms inside them, per step" in done.stdout
    return {f"{row['op']}@{row['numel']}": row for row in json.loads(out.read_text())}


@pytest.mark.e2e
def test_a_tanh_step_makes_one_tanh_of_the_models_size_and_an_uncoupled_one_none(tmp_path):
    coupled = _ops(tmp_path, "tanh")
    assert coupled[f"aten.tanh_.default@{WEIGHTS}"]["calls_per_step"] == 1.0
    uncoupled = _ops(tmp_path, "none")
    assert not [key for key in uncoupled if key.startswith("aten.tanh")]
    # Both train: the optimizer's update of every weight, each step, on both.
    for ops in (coupled, uncoupled):
        assert sum(row["calls_per_step"] for key, row in ops.items() if "addmm" in key) >= 1
