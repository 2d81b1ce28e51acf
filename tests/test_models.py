"""Any importable model by model._target_: the classes below are chosen by their import path
from the repository root (tests.test_models.TinyNet), built from the replica's seed, trained
end to end, and every way to get it wrong is one line naming the key.

This module is imported by the trainer's workers too, so it imports nothing from tests/ at
its top (runs, worlds: inside the tests that need them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from replica_dist.config import Config, ConfigError, load_config, parameter_count
from replica_dist.config.memory import _check_memory
from replica_dist.loop import replica_seed
from replica_dist.model import build_model

REPO = Path(__file__).resolve().parent.parent
TINY = "tests.test_models.TinyNet"


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)
        self.bn1 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn1(self.conv1(x)))


class TinyNet(nn.Module):
    """Nested like a torchvision ResNet (layer1.0.conv1.weight), for digits' (1, 8, 8) images."""

    def __init__(self, width: int, num_classes: int = 3, depth: int = 1):
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.layer1 = nn.Sequential(Block(1, width), *[Block(width, width) for _ in range(depth - 1)])
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer1(x).mean(dim=(2, 3)))


class LazyNet(nn.Module):
    """Its first layer takes its shape from the first batch."""

    def __init__(self, num_outputs: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc = nn.LazyLinear(num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flatten(x))


def not_a_model(width: int) -> list[int]:
    return [width]


@pytest.fixture(autouse=True)
def _repo_on_path(monkeypatch):
    # `tests.test_models` imports from the repository root, as in a worker started there.
    monkeypatch.syspath_prepend(str(REPO))


def _load(tmp_path: Path, *overrides: str):
    return load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])


# ---- config: the model's arguments from the overrides


@pytest.mark.parametrize(
    "overrides",
    [
        [f"model._target_={TINY}", "model.width=4", "model.depth=2"],
        [f"model._target_={TINY}", "+model.width=4", "+model.depth=2"],
        [f"model._target_={TINY}", "model.kwargs.width=4", "++model.depth=2"],
        ["model.width=4", f"model._target_={TINY}", "model.depth=2"],  # order does not matter
    ],
)
def test_target_arguments_land_in_kwargs(tmp_path, overrides):
    cfg, _ = _load(tmp_path, *overrides)
    assert cfg.model._target_ == TINY
    assert cfg.model.kwargs == {"width": 4, "depth": 2}
    # config.yaml round trip, as flatness and report read it back
    again = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.structured(cfg)))
    assert again.model == cfg.model


def test_an_argument_by_a_preset_name_goes_through_kwargs(tmp_path):
    cfg, _ = _load(
        tmp_path,
        "model._target_=torch.nn.Linear",
        "model.in_features=64",
        "model.out_features=10",
        "model.kwargs.bias=false",
    )
    assert cfg.model.kwargs == {"in_features": 64, "out_features": 10, "bias": False}


def test_memory_check_skips_a_target(tmp_path, monkeypatch):
    """The weights of a target are unknown until it is built: no estimate, no crash, even on a
    machine whose memory a preset's estimate would exceed."""
    cfg, _ = _load(tmp_path, f"model._target_={TINY}", "model.width=4")
    assert parameter_count(cfg) is None
    monkeypatch.setattr("replica_dist.config.memory._physical_memory_bytes", lambda: 1)
    _check_memory(cfg)


BAD = [
    (
        ["model._target_=no.such.Thing"],
        r"^model\._target_=no\.such\.Thing: cannot import it: no module named 'no'$",
    ),
    (
        ["model._target_=tests.test_models.Missing"],
        r"^model\._target_=tests\.test_models\.Missing: cannot import it: tests\.test_models has no attribute",
    ),
    (["model._target_=TinyNet"], r"^model\._target_=TinyNet: not a dotted path"),
    (["model._target_=torch.nn"], r"^model\._target_=torch\.nn: names a module, not a class or function"),
    (
        [f"model._target_={TINY}", "model.width=4", "model.widht=5"],
        rf"^model\._target_={TINY}: got an unexpected keyword argument 'widht'; its signature is "
        r"\(width, num_classes=3, depth=1\)$",
    ),
    ([f"model._target_={TINY}"], rf"^model\._target_={TINY}: missing a required argument: 'width'"),
    *[
        (
            [f"model._target_={TINY}", "model.width=4", override],
            rf"^model\.{override.split('=')[0].split('.')[1]} is only used with the presets model=mlp or cnn, "
            rf"not with model\._target_={TINY} \(drop it",
        )
        for override in (
            "model.name=cnn",
            "model.hidden=[3]",
            "model.activation=tanh",
            "model.bias=false",
            "model.batch_norm=false",
            "model.init_std=1.0",
        )
    ],
    (
        [f"model._target_={TINY}", "model.width=4", "model=cnn"],
        r"^model=cnn is a preset and model\._target_=",
    ),
    # without a target, a key beyond the schema stays what it was: unknown (a typo, most likely)
    (["model.hiden=[3]"], r"^unknown key model\.hiden \(did you mean model\.hidden\?\)"),
    (["+model.width=3"], r"^unknown key model\.width\b"),
    (["model.kwargs.width=3"], r"^model\.kwargs\.width is an argument of a model chosen by model\._target_"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_target_is_one_line_naming_the_key(tmp_path, overrides, message):
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, *overrides)
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


# ---- building: the seed, the data's number of outputs, failures


def _target(tmp_path, *overrides: str):
    return _load(tmp_path, f"model._target_={TINY}", *overrides)[0].model


def test_target_is_built_from_the_seed_as_its_constructor_would_be(tmp_path):
    """Same seed, same weights, equal bit for bit to the class built by hand after seeding;
    another replica's seed, other weights. num_classes, left out, is the data's (10)."""
    model_cfg = _target(tmp_path, "model.width=4", "model.depth=2")
    seed = replica_seed(0, 0)
    built = build_model(model_cfg, (1, 8, 8), 10, seed).state_dict()
    torch.manual_seed(seed)
    by_hand = TinyNet(width=4, depth=2, num_classes=10).state_dict()
    assert list(built) == list(by_hand)
    assert "layer1.1.conv1.weight" in built and built["head.weight"].shape == (10, 4)
    for name in by_hand:
        assert torch.equal(built[name], by_hand[name]), name
    other = build_model(model_cfg, (1, 8, 8), 10, replica_seed(0, 1)).state_dict()
    assert not torch.equal(other["layer1.0.conv1.weight"], built["layer1.0.conv1.weight"])
    # The global generator is left as it was.
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_model(model_cfg, (1, 8, 8), 10, seed)
    assert torch.equal(torch.rand(3), expected)


def test_lazy_modules_take_their_shapes_from_the_seed(tmp_path):
    model_cfg = _load(tmp_path, "model._target_=tests.test_models.LazyNet")[0].model
    first, second = (build_model(model_cfg, (1, 8, 8), 10, 7) for _ in range(2))
    assert first.fc.weight.shape == (10, 64)  # num_outputs from the data
    assert torch.equal(first.fc.weight, second.fc.weight)


def test_presets_are_built_as_before(tmp_path):
    """model.name=mlp, its layers drawn in order from the seeded generator, as PyTorch does."""
    cfg, _ = _load(tmp_path, "model.hidden=[16]")
    built = build_model(cfg.model, (1, 8, 8), 10, 5).state_dict()
    torch.manual_seed(5)
    fc1, fc2 = nn.Linear(64, 16), nn.Linear(16, 10)
    expected = {
        "fc1.weight": fc1.weight,
        "fc1.bias": fc1.bias,
        "fc2.weight": fc2.weight,
        "fc2.bias": fc2.bias,
    }
    assert list(built) == list(expected)
    for name, value in expected.items():
        assert torch.equal(built[name], value), name


BUILD_FAILURES = [
    (
        [f"model._target_={TINY}", "model.width=0"],
        rf"^model\._target_={TINY}: cannot build it: ValueError: width must be positive, got 0$",
    ),
    (
        [f"model._target_={TINY}", "model.width=4", "model.num_classes=3"],
        rf"^model\._target_={TINY}: gives outputs of shape \(2, 3\) on a batch of shape \(2, 1, 8, 8\); "
        r"the data needs \(2, 10\)",
    ),
    (
        ["model._target_=torch.nn.Linear", "model.in_features=5", "model.out_features=10"],
        r"^model\._target_=torch\.nn\.Linear: fails on a batch of the data's shape \(2, 1, 8, 8\): RuntimeError: ",
    ),
    (
        ["model._target_=tests.test_models.not_a_model", "model.width=3"],
        r"^model\._target_=tests\.test_models\.not_a_model: built a list, not a torch\.nn\.Module$",
    ),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BUILD_FAILURES, ids=[" ".join(o) for o, _ in BUILD_FAILURES]
)
def test_a_model_that_cannot_be_built_is_one_config_error(tmp_path, overrides, message):
    cfg, _ = _load(tmp_path, *overrides)  # the config alone cannot tell
    with pytest.raises(ConfigError) as err:
        build_model(cfg.model, (1, 8, 8), 10, 0)
    assert "\n" not in str(err.value)
    assert re.search(message, str(err.value)), str(err.value)


# ---- end to end: two gloo processes, and the launcher's refusals

STEPS = ["train.steps=4", "train.batch_size=16", "log.every=2", "eval.every=4", "seed=2"]


@pytest.mark.e2e
@pytest.mark.slow
def test_target_trains_end_to_end_with_its_own_parameter_names(tmp_path):
    from trainer_runs import events, replica_weights, torchrun

    from replica_dist.reference import reference_weights

    run_dir = tmp_path / "run"
    overrides = [f"model._target_={TINY}", "model.width=4", "model.depth=2", *STEPS]
    done = torchrun(2, f"hydra.run.dir={run_dir}", *overrides, timeout_s=240)
    assert done.returncode == 0, done.stderr[-3000:]

    names = list(TinyNet(width=4, depth=2, num_classes=10).state_dict())
    weights = replica_weights(run_dir, 2)
    for replica in weights:
        assert list(replica) == names
    center = torch.load(run_dir / "weights" / "center.pt")
    assert list(center) == names
    # The single-process reference, from the same seeds over the same batches.
    cfg, _ = load_config([f"hydra.run.dir={run_dir}", *overrides])
    for actual, expected in zip(weights, reference_weights(cfg, 2)):
        for name in names:
            torch.testing.assert_close(actual[name], expected[name], atol=1e-6, rtol=0)
    assert not torch.equal(weights[0]["layer1.0.conv1.weight"], weights[1]["layer1.0.conv1.weight"])

    tags = set(events(run_dir / "tb" / "replica_0").Tags()["scalars"])
    assert {"rate/layer1.0.conv1.weight", "rate/layer1.1.bn1.weight", "rate/head.bias"} <= tags
    assert [e.step for e in events(run_dir / "tb" / "replica_1").Scalars("rate/layer1.0.conv1.weight")] == [
        1,
        2,
        4,
    ]
    saved = OmegaConf.load(run_dir / "config.yaml")
    assert saved.model._target_ == TINY and dict(saved.model.kwargs) == {"width": 4, "depth": 2}


LAUNCH_REFUSALS = {
    "unimportable": (["model._target_=no.such.Thing"], r"model\._target_=no\.such\.Thing: cannot import"),
    "wrong kwarg": (
        [f"model._target_={TINY}", "model.width=4", "model.bogus=1"],
        r"model\._target_=.*unexpected keyword argument 'bogus'",
    ),
    "preset key with a target": (
        [f"model._target_={TINY}", "model.width=4", "model.hidden=[8]"],
        r"model\.hidden",
    ),
    # only the workers can tell, once they hold the data
    "wrong number of outputs": (
        [f"model._target_={TINY}", "model.width=4", "model.num_classes=3"],
        r"model\._target_=.*gives outputs of shape \(2, 3\)",
    ),
}


@pytest.mark.e2e
@pytest.mark.parametrize("case", list(LAUNCH_REFUSALS))
@pytest.mark.slow
def test_a_bad_target_launch_is_one_line_exit_2_and_no_directory(tmp_path, case):
    from trainer_runs import assert_refused_launch

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    assert_refused_launch(*LAUNCH_REFUSALS[case], cwd)
