"""Local energy: closed forms for a linear model, what the forward passes see, the command line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from trainer_runs import REPO, events, torchrun
from worlds import COLLECTIVE_TIMEOUT_S

from replica_dist.config import ModelConfig
from replica_dist.flatness import local_energy
from replica_dist.model import build_model


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def linear_problem(n: int = 200, d: int = 10, seed: int = 1):
    """Random X (columns of different scales), random w, y = X w + noise, and the no-bias
    linear model holding w: a fitted-ish model, so the noise of the estimate (mostly the term
    linear in z, proportional to the residual) is small next to dE itself."""
    g = generator(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2.0, d, dtype=torch.float64)
    w = torch.randn(1, d, generator=g, dtype=torch.float64)
    y = x @ w.T + 0.5 * torch.randn(n, 1, generator=g, dtype=torch.float64)
    model = build_model(ModelConfig(name="mlp", hidden=[], bias=False), (d,), 1, 0).double()
    assert isinstance(model.fc1, nn.Linear) and list(model.state_dict()) == ["fc1.weight"]
    with torch.no_grad():
        model.fc1.weight.copy_(w)
    return model, x, y


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- closed forms ----------------------------------------------------------------------------


def test_sigma_zero_is_exactly_zero():
    model, x, y = linear_problem()
    for sigmas in ([0.0], [0.0, 0.1]):
        first = local_energy(model, x, y, "regression", "mse", sigmas, 5, generator())[0]
        assert first == {"sigma": 0.0, "local_energy": 0.0, "stderr": 0.0, "samples": 5}
    labels = torch.randint(0, 3, (50,), generator=generator())
    classifier = nn.Linear(4, 3)
    result = local_energy(
        classifier, torch.randn(50, 4), labels, "classification", "cross_entropy", [0, 0.5], 4, generator()
    )
    assert (result[0]["local_energy"], result[0]["stderr"]) == (0.0, 0.0)


@pytest.mark.parametrize("sigma", [0.05, 0.3])
def test_linear_mse_matches_the_closed_form(sigma):
    model, x, y = linear_problem()
    n, samples = len(x), 2000
    w = model.fc1.weight.detach()[0]
    # dE = sigma^2 * sum_j w_j^2 |X_j|^2 / n, exactly in expectation (the cross term has mean 0).
    expected = sigma**2 * (w**2 * (x**2).sum(dim=0)).sum().item() / n
    # Its per-draw variance, with A = X diag(w), r = Xw - y and u = A z ~ N(0, A A^T):
    # dE = (2 sigma / n) r.u + (sigma^2 / n) |u|^2, so Var = 4 sigma^2 |A^T r|^2 / n^2 + 2 sigma^4 |A^T A|_F^2 / n^2.
    a, r = x * w, x @ w - y[:, 0]
    variance = (
        4 * sigma**2 * (a.T @ r).square().sum().item() / n**2
        + 2 * sigma**4 * (a.T @ a).square().sum().item() / n**2
    )
    expected_stderr = math.sqrt(variance / samples)

    (result,) = local_energy(model, x, y, "regression", "mse", [sigma], samples, generator())
    assert result["sigma"] == sigma and result["samples"] == samples
    assert abs(result["local_energy"] - expected) < 4 * result["stderr"]
    assert result["stderr"] > 0 and result["stderr"] == pytest.approx(expected_stderr, rel=0.2)
    # The check has teeth: an implementation that evaluated the unperturbed model reports 0,
    # many standard errors below the closed form.
    assert expected > 10 * expected_stderr


def test_classification_error_matches_the_closed_form():
    # Logits (w0 x, w1 x) with w = (1, -1): class 0 iff x (w0 - w1) > 0, and the labels make
    # the unperturbed error 0. Perturbed, w0 - w1 = 2 + sigma (z0 + z1), and every sample is
    # wrong exactly when that is negative: dE = P(sigma (z0 + z1) < -2) = Phi(-2 / (sigma sqrt 2)).
    model = nn.Linear(1, 2, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.linspace(-1, 1, 20, dtype=torch.float64)[:, None] + 0.025
    y = (x[:, 0] < 0).long()
    samples = 4000
    for result in local_energy(
        model, x, y, "classification", "cross_entropy", [0.7, 1.0], samples, generator()
    ):
        sigma = result["sigma"]
        expected = 0.5 * math.erfc(2 / (sigma * math.sqrt(2)) / math.sqrt(2))
        binomial_stderr = math.sqrt(expected * (1 - expected) / samples)
        assert abs(result["local_energy"] - expected) < 4 * result["stderr"]
        assert result["stderr"] == pytest.approx(binomial_stderr, rel=0.2)


# --- what the forward passes see -------------------------------------------------------------


def test_forward_passes_see_perturbed_weights_in_eval_mode_without_grad():
    """A spy on the layer: the implementation must evaluate w * (1 + sigma z), not w."""
    model, x, y = linear_problem(d=50)
    model.train()
    original = model.fc1.weight.detach().clone()
    seen = []
    model.fc1.register_forward_pre_hook(
        lambda module, args: seen.append(
            (module.weight.detach().clone(), module.training, torch.is_grad_enabled())
        )
    )
    sigma, samples = 0.1, 40
    local_energy(model, x, y, "regression", "mse", [0.0, sigma], samples, generator())

    assert seen and all(not training and not grad for _, training, grad in seen)
    perturbed = [w for w, _, _ in seen if not torch.equal(w, original)]
    assert len(perturbed) == samples  # one evaluation per draw at the one sigma > 0
    implied_z = torch.stack([(w / original - 1) / sigma for w in perturbed])
    assert implied_z.mean().abs() < 0.1 and implied_z.std().item() == pytest.approx(1.0, abs=0.1)
    assert not torch.allclose(implied_z[0], implied_z[1])  # a fresh z per draw
    assert model.training  # the caller's mode comes back


def test_trained_regression_network_has_positive_local_energy():
    g = generator(3)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    y = torch.sin(x @ torch.randn(5, 1, generator=g, dtype=torch.float64))
    model = build_model(ModelConfig(name="mlp", hidden=[32], activation="tanh"), (5,), 1, 0).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    initial = nn.functional.mse_loss(model(x), y).item()
    for _ in range(500):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * initial

    small, large = local_energy(model, x, y, "regression", "mse", [0.05, 0.2], 50, generator())
    for result in (small, large):
        assert result["local_energy"] > 3 * result["stderr"] > 0
    assert large["local_energy"] > small["local_energy"]


def test_weights_buffers_and_mode_are_restored():
    model = build_model(ModelConfig(name="cnn", hidden=[4, 4], batch_norm=True), (1, 8, 8), 3, 0)
    x, y = torch.randn(30, 1, 8, 8, generator=generator()), torch.randint(0, 3, (30,), generator=generator())
    model(x)  # training-mode pass: non-trivial BatchNorm running statistics
    before = state(model)
    local_energy(model, x, y, "classification", "cross_entropy", [0.0, 0.1, 1.0], 5, generator())
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.training


def test_weights_are_restored_when_a_forward_pass_fails():
    model, x, y = linear_problem()
    before = state(model)
    calls = []

    def fail_on_third_call(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    model.fc1.register_forward_pre_hook(fail_on_third_call)
    with pytest.raises(RuntimeError, match="boom"):
        local_energy(model, x, y, "regression", "mse", [0.5], 5, generator())
    assert torch.equal(model.fc1.weight, before["fc1.weight"])


def test_same_generator_seed_same_result_and_bad_arguments():
    model, x, y = linear_problem()
    run = lambda seed: local_energy(model, x, y, "regression", "mse", [0.1, 0.2], 10, generator(seed))  # noqa: E731
    assert run(0) == run(0)
    assert run(0) != run(1)
    with pytest.raises(ValueError, match="samples"):
        local_energy(model, x, y, "regression", "mse", [0.1], 1, generator())
    with pytest.raises(ValueError, match="sigmas"):
        local_energy(model, x, y, "regression", "mse", [-0.1], 5, generator())


# --- the command line, on a real torchrun run -----------------------------------------------


def flatness_cli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "replica_dist.flatness", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def flatness_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("flatness") / "run"
    done = torchrun(2, f"hydra.run.dir={run_dir}", "train.steps=20", "model.hidden=[16]", timeout_s=180)
    assert done.returncode == 0, done.stderr[-3000:]
    done = flatness_cli(str(run_dir), "--samples", "3", "--sigmas", "0,0.1")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, done


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_writes_flatness_json(flatness_run):
    run_dir, done = flatness_run
    record = json.loads((run_dir / "flatness.json").read_text())
    assert record["sigmas"] == [0.0, 0.1] and record["samples"] == 3
    assert record["metric"] == "train_error"  # digits: classification
    assert len(record["replicas"]) == 2
    for entries in (record["center"], *record["replicas"]):
        assert [e["sigma"] for e in entries] == [0.0, 0.1]
        assert entries[0]["local_energy"] == 0.0 and entries[0]["stderr"] == 0.0
        assert -1 <= entries[1]["local_energy"] <= 1 and entries[1]["stderr"] >= 0
    assert "sigma" in done.stdout and "center" in done.stdout and "0.1" in done.stdout


@pytest.mark.e2e
@pytest.mark.parametrize("run", ["center", "replica_0", "replica_1"])
@pytest.mark.slow
def test_cli_writes_scalars_into_the_runs(flatness_run, run):
    run_dir, _ = flatness_run
    record = json.loads((run_dir / "flatness.json").read_text())
    entries = record["center"] if run == "center" else record["replicas"][int(run[-1])]
    tb = events(run_dir / "tb" / run)
    tags = set(tb.Tags()["scalars"])
    assert "test/accuracy" in tags  # the training run's own curves are still there
    for entry, name in zip(entries, ("0", "0.1")):
        for suffix, key in (("", "local_energy"), ("_stderr", "stderr")):
            (event,) = tb.Scalars(f"flatness/local_energy_sigma_{name}{suffix}")
            assert event.step == 20
            assert event.value == pytest.approx(entry[key], abs=1e-6)


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_refuses_to_overwrite_without_force(flatness_run):
    run_dir, _ = flatness_run
    before = (run_dir / "flatness.json").read_bytes()
    done = flatness_cli(str(run_dir), "--samples", "3", "--sigmas", "0,0.1")
    assert done.returncode == 2
    assert done.stderr.startswith("replica_dist.flatness: error:") and len(done.stderr.splitlines()) == 1
    assert "--force" in done.stderr
    assert (run_dir / "flatness.json").read_bytes() == before
    # With --force and the same seed, the draws and hence the file are the same.
    done = flatness_cli(str(run_dir), "--samples", "3", "--sigmas", "0,0.1", "--force")
    assert done.returncode == 0, done.stderr
    assert (run_dir / "flatness.json").read_bytes() == before


@pytest.mark.e2e
@pytest.mark.slow
def test_cli_refuses_a_missing_or_unfinished_run(tmp_path):
    done = flatness_cli(str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr.startswith("replica_dist.flatness: error:") and len(done.stderr.splitlines()) == 1
    assert "nowhere" in done.stderr
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    done = flatness_cli(str(tmp_path))
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "lacks" in done.stderr
    assert not (tmp_path / "flatness.json").exists()


def _train_with_flatness(rank: int, world_size: int, run_dir: str) -> None:
    from replica_dist import loop
    from replica_dist.config import load_config

    cfg, _ = load_config(
        [
            "train.steps=10",
            "model.hidden=[8]",
            "flatness.sigmas=[0,0.1]",
            "flatness.samples=3",
            f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
            f"hydra.run.dir={run_dir}",
        ]
    )
    loop.train(cfg, Path(run_dir), torch.device("cpu"))


@pytest.mark.slow
def test_flatness_at_the_end_of_training_equals_the_command_line(tmp_path):
    from worlds import run_world

    run_world(_train_with_flatness, 2, str(tmp_path))
    at_end = (tmp_path / "flatness.json").read_text()
    assert len(json.loads(at_end)["replicas"]) == 2
    assert flatness_cli(str(tmp_path), "--sigmas", "0,0.1", "--samples", "3", "--force").returncode == 0
    assert (tmp_path / "flatness.json").read_text() == at_end
