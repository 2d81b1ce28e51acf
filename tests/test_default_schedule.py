"""The trainer's default eta schedule couples a run of any length: a model of the test's own
(a small residual CNN with BatchNorm, through model._target_), 2 replicas, every default but
train.steps=300 (a fifth of the length the study chose its schedule at)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn


class ResidualBNNet(nn.Module):
    """conv-BN-ReLU, one residual block of two conv-BN, global pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.BatchNorm2d(width),
        )
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.view(-1, 1, 8, 8))
        x = torch.relu(x + self.block(x))
        return self.head(x.mean(dim=(2, 3)))


@pytest.mark.e2e
@pytest.mark.slow
def test_defaults_couple_a_300_step_run_of_a_batchnorm_model(tmp_path):
    from trainer_runs import torchrun  # here: the workers import this module for its model alone

    run_dir = tmp_path / "run"
    result = torchrun(
        2,
        "model._target_=tests.test_default_schedule.ResidualBNNet",
        "train.steps=300",
        "log.every=100",
        "eval.every=300",
        "checkpoint.every=0",
        f"hydra.run.dir={run_dir}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "coupling:" not in output, output  # no note that the schedule barely couples
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["warnings"] == []
    center, ensemble = summary["center"]["test_accuracy"], summary["ensemble"]["test_accuracy"]
    assert center >= ensemble - 0.02, (center, ensemble)
    assert ensemble > 0.8, summary


@pytest.mark.e2e
@pytest.mark.slow
def test_a_growth_per_step_that_barely_couples_a_run_of_epochs_is_named(tmp_path):
    """train.epochs=2 is 44 steps of digits' 2-replica shards: the note judges the schedule over
    the steps the epochs resolve to (0.001 * 1.004^43 = 0.00119 at the last)."""
    from trainer_runs import torchrun

    result = torchrun(
        2,
        "train.epochs=2",
        "coupling.eta_growth=0.004",
        "checkpoint.every=0",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    notes = [line for line in result.stdout.splitlines() if "coupling: eta reaches only" in line]
    assert len(notes) == 1 and "0.0012 at the last step of 44;" in notes[0], result.stdout
