"""The usual recipe: lr schedules, clipping, label smoothing, gradient accumulation, epochs,
mixed precision and torch.compile, each against an independent expectation."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException
from trainer_runs import REPO, events, replica_weights
from worlds import COLLECTIVE_TIMEOUT_S, run_world

from replica_dist import loop, recipe
from replica_dist.config import ConfigError, OptimConfig, load_config
from replica_dist.errors import RunError

TINY = [
    "model.hidden=[16]",
    "train.batch_size=16",
    "log.every=1",
    "eval.every=100",
    f"dist.timeout_s={COLLECTIVE_TIMEOUT_S}",
]


def _closed_form_lr(step: int, steps: int, lr: float, warmup: int, schedule: str, **kw) -> float:
    """The schedules as the README states them, written out independently of recipe.py."""
    if step <= warmup:
        return lr * step / warmup
    if schedule == "cosine":
        progress = (step - warmup - 1) / (steps - warmup - 1)
        return kw["min_lr"] + (lr - kw["min_lr"]) * (1 + math.cos(math.pi * progress)) / 2
    return lr * kw["gamma"] ** ((step - warmup - 1) // kw["step_size"])


def _lr_read_back(run_dir: Path, replica: int) -> dict[int, float]:
    return {e.step: e.value for e in events(run_dir / "tb" / f"replica_{replica}").Scalars("optim/lr")}


class Crash(RuntimeError):
    pass


def _train(rank: int, world_size: int, run_dir: str, overrides: list[str], crash_at: int = 0) -> None:
    """loop.train with every clipped gradient norm recorded; optionally raising at a step."""
    norms, calls = [], [0]
    clip, forward_backward = recipe.clip_, recipe.forward_backward

    def recording_clip(parameters, max_norm):
        parameters = list(parameters)
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
        clip(parameters, max_norm)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()
        norms.append((before, after))

    def crashing_forward_backward(*args):
        calls[0] += 1
        if calls[0] == crash_at:
            raise Crash(f"injected at step {crash_at}")
        return forward_backward(*args)

    recipe.clip_, recipe.forward_backward = recording_clip, crashing_forward_backward
    cfg, _ = load_config(TINY + overrides + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))
    (Path(run_dir) / f"norms.rank{rank}.json").write_text(json.dumps(norms))


COSINE = [
    "train.steps=16",
    "optim.schedule=cosine",
    "optim.lr=0.1",
    "optim.warmup_steps=4",
    "optim.min_lr=0.01",
    "optim.clip_norm=0.5",
    "train.grad_accum=2",
    "checkpoint.every=5",
    "checkpoint.keep=5",
]


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cosine")
    run_world(_train, 2, str(run_dir), COSINE)
    return run_dir


def test_warmup_then_cosine_lr_read_back_equals_the_closed_form_at_every_step(cosine_run):
    for replica in range(2):
        logged = _lr_read_back(cosine_run, replica)
        assert sorted(logged) == list(range(1, 17))
        for step, value in logged.items():
            expected = _closed_form_lr(step, 16, 0.1, 4, "cosine", min_lr=0.01)
            assert value == pytest.approx(expected, rel=1e-6), step  # TensorBoard keeps float32
    assert logged[4] == pytest.approx(0.1) and logged[16] == pytest.approx(0.01)


def test_the_global_gradient_norm_after_clipping_never_exceeds_the_bound(cosine_run):
    for rank in range(2):
        norms = json.loads((cosine_run / f"norms.rank{rank}.json").read_text())
        assert len(norms) == 16
        assert any(before > 0.5 for before, _ in norms)  # the bound was hit: clipping did something
        for before, after in norms:
            assert after <= 0.5 * (1 + 1e-5)
            if before <= 0.5:
                assert after == pytest.approx(before, rel=1e-6)  # below the bound: untouched


@pytest.mark.slow
def test_a_crashed_run_with_a_schedule_and_accumulation_resumes_bit_for_bit(tmp_path, cosine_run):
    with pytest.raises((ProcessRaisedException, ProcessExitedException)):
        run_world(_train, 2, str(tmp_path), COSINE, 13)
    assert (tmp_path / "checkpoints" / "step-00000010" / "manifest.json").exists()
    state = torch.load(tmp_path / "checkpoints" / "step-00000010" / "replica-0.pt", weights_only=False)
    assert state["recipe"]["scheduler"]["last_epoch"] == 10
    run_world(_train, 2, str(tmp_path), COSINE)
    for got, expected in zip(replica_weights(tmp_path, 2), replica_weights(cosine_run, 2)):
        for name in expected:
            assert torch.equal(got[name], expected[name]), name
    for replica in range(2):
        assert _lr_read_back(tmp_path, replica) == _lr_read_back(cosine_run, replica)


@pytest.mark.slow
def test_step_schedule_under_ddp_with_epochs_follows_the_closed_form(tmp_path):
    # test_fraction 0.5 leaves 899 training samples: shards of 450 and 449, i.e. 9 and 8
    # batches of 50 per epoch. The smaller sets the length: 3 epochs * 8 // grad_accum 2 = 12.
    overrides = [
        "coupling=ddp",
        "data.test_fraction=0.5",
        "train.batch_size=50",
        "train.epochs=3",
        "train.grad_accum=2",
        "optim.schedule=step",
        "optim.warmup_steps=3",
        "optim.step_size=4",
        "optim.gamma=0.5",
        "checkpoint.every=0",
    ]
    run_world(_train, 2, str(tmp_path), overrides)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 12
    for replica in range(2):
        logged = _lr_read_back(tmp_path, replica)
        assert sorted(logged) == list(range(1, 13))
        for step, value in logged.items():
            expected = _closed_form_lr(step, 12, 0.05, 3, "step", gamma=0.5, step_size=4)
            assert value == pytest.approx(expected, rel=1e-6), step
    first, second = replica_weights(tmp_path, 2)
    assert all(torch.equal(first[name], second[name]) for name in first)  # ddp: one model


def test_steps_for_epochs_counts_whole_batches_of_the_shard():
    assert recipe.steps_for_epochs(3, 450, 50) == 27
    assert recipe.steps_for_epochs(3, 449, 50) == 24  # the partial batch is dropped
    assert recipe.steps_for_epochs(3, 449, 50, grad_accum=2) == 12
    assert recipe.steps_for_epochs(2, 10, 64) == 2  # a shard smaller than a batch: one per epoch
    assert recipe.steps_for_epochs(1, 100, 50, grad_accum=4) == 1


# ---- gradient accumulation against one big batch


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)).double()


class _Slices:
    def __init__(self, x, y, size):
        self.x, self.y, self.size, self.at = x, y, size, 0

    def next(self):
        batch = self.x[self.at : self.at + self.size], self.y[self.at : self.at + self.size]
        self.at += self.size
        return batch


def test_accumulating_k_batches_of_b_equals_one_step_on_a_batch_of_k_times_b():
    x, y = torch.randn(12, 6, dtype=torch.float64), torch.randint(0, 3, (12,))
    accumulated, reference = _mlp(0), _mlp(0)
    precision = recipe.Precision("fp32", torch.device("cpu"))
    loss = recipe.forward_backward(accumulated, accumulated, _Slices(x, y, 4), F.cross_entropy, 3, precision)
    expected_loss = F.cross_entropy(reference(x), y)
    expected_loss.backward()
    assert loss.item() == pytest.approx(expected_loss.item(), abs=1e-12)
    for model in (accumulated, reference):
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9).step()
    for got, expected in zip(accumulated.parameters(), reference.parameters()):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def _accumulate_under_ddp(rank: int, world_size: int, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(1)
    x, y = torch.randn(2, 8, 6, dtype=torch.float64), torch.randint(0, 3, (2, 8))
    net = DistributedDataParallel(_mlp(0))
    allreduces = [0]
    net.register_comm_hook(None, _counting_hook(allreduces))
    precision = recipe.Precision("fp32", torch.device("cpu"))
    recipe.forward_backward(net, net, _Slices(x[rank], y[rank], 2), F.cross_entropy, 4, precision)
    reference = _mlp(0)
    F.cross_entropy(reference(x.flatten(0, 1)), y.flatten()).backward()  # both ranks' 16 samples
    close = all(
        torch.allclose(p.grad, q.grad, rtol=0, atol=1e-6)
        for p, q in zip(net.module.parameters(), reference.parameters())
    )
    Path(out, f"rank{rank}.json").write_text(json.dumps({"close": close, "allreduces": allreduces[0]}))


def _counting_hook(count):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        count[0] += 1
        return allreduce_hook(state, bucket)

    return hook


def test_accumulation_under_ddp_syncs_once_and_equals_the_whole_batch(tmp_path):
    run_world(_accumulate_under_ddp, 2, str(tmp_path))
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == {"close": True, "allreduces": 1}  # one bucket, on the last micro-batch only


# ---- label smoothing


def test_label_smoothing_loss_equals_the_smoothed_cross_entropy():
    logits, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 4, (10,))
    eps = 0.2
    log_p = logits.log_softmax(dim=1)
    smoothed_target = torch.full_like(log_p, eps / 4)
    smoothed_target[torch.arange(10), y] += 1 - eps
    expected = -(smoothed_target * log_p).sum(dim=1).mean()
    loss_fn = recipe.loss_function(OptimConfig(label_smoothing=eps), "cross_entropy", "classification")
    assert loss_fn(logits, y).item() == pytest.approx(expected.item(), rel=1e-12)
    assert recipe.loss_function(OptimConfig(), "cross_entropy", "classification")(logits, y).item() == (
        pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-12)
    )
    with pytest.raises(ConfigError, match="optim.label_smoothing"):
        recipe.loss_function(OptimConfig(label_smoothing=eps), "mse", "regression")


# ---- bf16: trains finite; the guard still catches a NaN


def _train_bf16(rank: int, world_size: int, run_dir: str, overrides: list[str], poison_at: int) -> None:
    forward_backward, calls = recipe.forward_backward, [0]

    class Poisoned:
        def __init__(self, batches):
            self.batches = batches

        def next(self):
            x, y = self.batches.next()
            return x * float("nan"), y

    def poisoning(net, forward, batches, *rest):
        calls[0] += 1
        if rank == 1 and calls[0] == poison_at:
            batches = Poisoned(batches)
        return forward_backward(net, forward, batches, *rest)

    recipe.forward_backward = poisoning
    cfg, _ = load_config(TINY + overrides + [f"hydra.run.dir={run_dir}"])
    try:
        loop.train(cfg, Path(run_dir), torch.device("cpu"))
    except RunError as err:
        (Path(run_dir) / f"error.rank{rank}.txt").write_text(str(err))


BF16 = ["train.precision=bf16", "train.steps=20", "optim.lr=0.1", "checkpoint.every=0", "dist.overlap=false"]


def test_a_bf16_run_trains_with_finite_loss_and_weights_in_float32(tmp_path):
    run_world(_train_bf16, 2, str(tmp_path), BF16, 0)
    for replica in range(2):
        losses = [e.value for e in events(tmp_path / "tb" / f"replica_{replica}").Scalars("train/loss")]
        assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
        assert losses[-1] < losses[0]  # it learns
    for weights in replica_weights(tmp_path, 2):
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())


@pytest.mark.slow
def test_under_bf16_the_guard_still_stops_on_an_injected_nan(tmp_path):
    run_world(_train_bf16, 2, str(tmp_path), BF16, 5)
    messages = [(tmp_path / f"error.rank{r}.txt").read_text() for r in range(2)]
    assert messages[0] == messages[1]
    assert "non-finite loss in replica 1 at step 5" in messages[0]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"


# ---- fp16: the scaler owns overflow


def test_an_fp16_overflow_leaves_the_replica_and_its_optimizer_as_they_were():
    model = _mlp(0).float()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    precision = recipe.Precision("fp32", torch.device("cpu"))
    precision.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # the fp16 path, on the CPU
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))

    precision.backward(F.cross_entropy(model(x), y))
    true = [p.grad / 1024 for p in model.parameters()]
    precision.unscale_(optimizer)
    assert all(torch.allclose(p.grad, g) for p, g in zip(model.parameters(), true))
    optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]

    optimizer.zero_grad(set_to_none=True)
    precision.backward(F.cross_entropy(model(x), y))
    next(model.parameters()).grad[0, 0] = float("inf")  # what an fp16 overflow leaves
    precision.unscale_(optimizer)
    assert all(p.grad is None for p in model.parameters())
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(
        torch.equal(optimizer.state[p]["momentum_buffer"], m) for p, m in zip(model.parameters(), momentum)
    )
    assert precision.scaler.get_scale() == 512.0 and precision.overflowed_steps == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a gradient scaler needs CUDA")
def test_an_fp16_run_on_cuda_trains_with_finite_loss(tmp_path):
    run_world(_train_cuda, 1, str(tmp_path))
    losses = [e.value for e in events(tmp_path / "tb" / "replica_0").Scalars("train/loss")]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def _train_cuda(rank: int, world_size: int, run_dir: str) -> None:
    cfg, _ = load_config(TINY + ["train.precision=fp16", "train.steps=20", f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cuda", 0))


# ---- torch.compile


def _train_compiled(rank: int, world_size: int, run_dir: str, compile_: bool) -> None:
    overrides = ["train.steps=3", "checkpoint.every=0", f"train.compile={str(compile_).lower()}"]
    cfg, _ = load_config(TINY + overrides + [f"hydra.run.dir={run_dir}"])
    loop.train(cfg, Path(run_dir), torch.device("cpu"))
    from torch._dynamo.utils import counters

    Path(run_dir, "graphs.json").write_text(json.dumps(dict(counters["stats"])))


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_a_compiled_run_compiles_the_forward_and_trains_as_the_eager_one(tmp_path):
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    run_world(_train_compiled, 1, str(eager), False, timeout_s=600)
    run_world(_train_compiled, 1, str(compiled), True, timeout_s=600)
    assert json.loads((eager / "graphs.json").read_text()).get("unique_graphs", 0) == 0
    assert json.loads((compiled / "graphs.json").read_text())["unique_graphs"] >= 1
    (got,), (expected,) = replica_weights(compiled, 1), replica_weights(eager, 1)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


# ---- bad inputs: one line naming the key, nothing written


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.schedule=linear"], "optim.schedule"),
        (["optim.warmup_steps=10", "train.steps=10"], "optim.warmup_steps"),
        (["optim.label_smoothing=0.1", "data=seed"], "optim.label_smoothing"),
        (["optim.label_smoothing=1.0"], "optim.label_smoothing"),
        (["optim.clip_norm=-1"], "optim.clip_norm"),
        (["train.grad_accum=0"], "train.grad_accum"),
        (["train.precision=fp8"], "train.precision"),
        (["train.epochs=2", "train.steps=100"], "train.epochs"),
        (["optim.gamma=0.5"], "optim.gamma"),  # only for optim.schedule=step
    ],
)
def test_bad_recipe_settings_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(overrides)
    assert "\n" not in str(err.value)


def test_warmup_longer_than_the_epochs_run_is_refused_once_the_length_is_known(tmp_path):
    cfg, _ = load_config(["train.epochs=1", "train.batch_size=1000", "optim.warmup_steps=5"])
    cfg.train.steps = recipe.steps_for_epochs(1, 719, 1000)
    with pytest.raises(
        ConfigError, match=r"optim\.warmup_steps must be < train\.steps \(1, from train\.epochs=1\)"
    ):
        cfg.check_run_length()


def test_fp16_on_the_cpu_is_one_line_naming_the_key_exit_2_nothing_written(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "replica_dist.train",
            "train.precision=fp16",
            "dist.device=cpu",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert lines == [
        "replica_dist: error: train.precision=fp16 needs a CUDA device (this run is on cpu); use bf16"
    ]
    assert not run_dir.exists()
