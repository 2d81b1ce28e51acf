"""End to end: `torchrun -m replica_dist.train` in a subprocess, read back from disk."""

from __future__ import annotations

import json

import numpy as np
import pytest
from trainer_runs import events, torchrun

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    done = torchrun(
        2,
        f"hydra.run.dir={run_dir}",
        "train.steps=30",
        "log.every=10",
        "eval.every=10",
        "model.hidden=[32,16]",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


PARAMS = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc3.weight", "fc3.bias"]


@pytest.mark.parametrize("replica", [0, 1])
def test_replica_events_hold_per_layer_tags(run_dir, replica):
    tb = events(run_dir[0] / "tb" / f"replica_{replica}")
    tags = set(tb.Tags()["scalars"])
    for group in ("rate", "update_ratio", "grad_step", "coupling_step", "dist_to_center"):
        for name in PARAMS:
            assert f"{group}/{name}" in tags
    assert {"train/loss", "test/accuracy", "test/loss", "coupling/eta"} <= tags
    assert [e.step for e in tb.Scalars("rate/fc1.weight")] == [1, 10, 20, 30]
    assert [e.step for e in tb.Scalars("test/accuracy")] == [10, 20, 30]
    # The default schedule, relative to the 30-step run: eta_t = 0.001 * 400^((t - 1) / 29).
    assert [e.value for e in tb.Scalars("coupling/eta")] == pytest.approx(
        [0.001 * 400 ** ((t - 1) / 29) for t in (1, 10, 20, 30)], rel=1e-6
    )
    assert all(e.value > 0 for e in tb.Scalars("coupling_step/fc1.weight"))


def test_center_and_ensemble_events(run_dir):
    center = events(run_dir[0] / "tb" / "center")
    tags = set(center.Tags()["scalars"])
    for name in PARAMS:
        assert {f"rate/{name}", f"update_ratio/{name}"} <= tags
    assert {"test/accuracy", "test/loss", "train/replica_mean_loss"} <= tags
    ensemble = events(run_dir[0] / "tb" / "ensemble")
    assert [e.step for e in ensemble.Scalars("test/accuracy")] == [10, 20, 30]


def test_summary_matches_the_events(run_dir):
    summary = json.loads((run_dir[0] / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["world_size"] == 2 and summary["wall_seconds"] > 0
    assert summary["coupling"] == "tanh" and summary["task"] == "classification"
    for r, replica in enumerate(summary["replicas"]):
        assert set(replica) == {
            "replica",
            "own_data_loss",
            "train_loss",
            "train_accuracy",
            "test_loss",
            "test_accuracy",
        }
        final = events(run_dir[0] / "tb" / f"replica_{r}").Scalars("test/accuracy")[-1].value
        assert replica["test_accuracy"] == pytest.approx(final, abs=1e-6)
    center_final = events(run_dir[0] / "tb" / "center").Scalars("test/accuracy")[-1].value
    assert summary["center"]["test_accuracy"] == pytest.approx(center_final, abs=1e-6)
    for model in ("center", "ensemble"):
        assert set(summary[model]) == {"train_loss", "train_accuracy", "test_loss", "test_accuracy"}
    assert 0 <= summary["ensemble"]["test_accuracy"] <= 1
    assert (run_dir[0] / "config.yaml").read_text().count("name: tanh") == 1


def test_only_rank_zero_reports_progress(run_dir):
    stdout = run_dir[1].stdout
    assert "rank 0] step 30/30" in stdout
    assert "rank 1]" not in stdout


def test_a_second_run_into_the_same_directory_is_refused(run_dir):
    before = (run_dir[0] / "summary.json").read_text()
    done = torchrun(2, f"hydra.run.dir={run_dir[0]}", "train.steps=2")
    assert done.returncode != 0
    assert "hydra.run.dir" in done.stderr and "already holds a finished run" in done.stderr
    assert (run_dir[0] / "summary.json").read_text() == before


def test_more_replicas_than_training_samples(tmp_path):
    data = tmp_path / "tiny.npz"
    rng = np.random.default_rng(0)
    np.savez(
        data,
        X_train=rng.normal(size=(2, 3)),
        y_train=np.array([0, 1]),
        X_test=rng.normal(size=(2, 3)),
        y_test=np.array([1, 0]),
    )
    done = torchrun(3, f"hydra.run.dir={tmp_path / 'run'}", "data=file", f"data.path={data}", "train.steps=2")
    assert done.returncode != 0
    ours = [line for line in done.stderr.splitlines() if line.startswith("replica_dist: error:")]
    assert len(ours) == 1 and "data.split" in ours[0] and "3 replicas" in ours[0], done.stderr[-2000:]
