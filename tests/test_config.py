"""Config composition and validation: defaults, group options, bad overrides, CLI errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from replica_dist.config import (
    Config,
    ConfigError,
    CouplingConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
)
from replica_dist.config import load_config
from runs import REPO


def _load(tmp_path: Path, *overrides: str):
    return load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])


def test_default_config_loads(tmp_path):
    run_dir = tmp_path / "run"
    result = load_config([f"hydra.run.dir={run_dir}"])
    assert isinstance(result, tuple) and len(result) == 2
    cfg, got_dir = result
    assert isinstance(cfg, Config)
    assert isinstance(cfg.model, ModelConfig)
    assert isinstance(cfg.data, DataConfig)
    assert isinstance(cfg.coupling, CouplingConfig)
    assert isinstance(cfg.optim, OptimConfig)
    assert isinstance(cfg.train, TrainConfig)
    assert isinstance(got_dir, Path)
    assert got_dir == run_dir
    # Defaults chosen in conf/config.yaml.
    assert cfg.model.name == "mlp"
    assert cfg.model.hidden == [128]
    assert cfg.data.name == "digits"
    assert cfg.coupling.name == "tanh"
    assert cfg.coupling.eta == pytest.approx(0.001) and cfg.coupling.eta_growth == pytest.approx(0.004)
    assert cfg.optim.name == "sgd"
    assert cfg.optim.lr == pytest.approx(0.05)
    assert cfg.optim.momentum == pytest.approx(0.9)
    assert cfg.init == "independent"
    # Composing the config must not create the run directory.
    assert not run_dir.exists()


def test_default_run_dir_is_under_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    _, run_dir = load_config([])
    assert run_dir.parts[0] == "runs"
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2}", run_dir.name)


def test_run_dir_follows_torchelastic_run_id(monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job123")
    _, run_dir = load_config([])
    assert run_dir == Path("runs/job123")


BAD_OVERRIDES = [
    (["optim.lr=-1"], r"optim\.lr"),
    (["optim.lr=0"], r"optim\.lr"),
    (["coupling.every=0"], r"coupling\.every"),
    (["coupling.eta=0"], r"coupling\.eta\b"),
    (["coupling.eta=0.5", "coupling.eta_max=0.1"], r"coupling\.eta_max"),
    (["coupling=linear", "coupling.eta_max=2"], r"coupling\.eta_max"),
    (["coupling.temperature=0"], r"coupling\.temperature"),
    (["coupling.eta_final=0"], r"coupling\.eta_final"),
    (["coupling.eta_final=2"], r"coupling\.eta_final"),
    (["coupling=average", "coupling.via_optimizer=true"], r"coupling\.via_optimizer"),
    (["model=foo"], r"model"),
    (["model.name=foo"], r"model\.name"),
    (["model.hidden=[0]"], r"model\.hidden"),
    (["model.activation=foo"], r"model\.activation"),
    (["data.name=foo"], r"data\.name"),
    (["data.split=foo"], r"data\.split"),
    (["data.task=foo"], r"data\.task"),
    (["data.test_fraction=1.5"], r"data\.test_fraction"),
    (["data=file"], r"data\.path"),
    (["train.steps=0"], r"train\.steps"),
    (["train.batch_size=0"], r"train\.batch_size"),
    (["train.steps=abc"], r"train\.steps"),
    (["foo=1"], r"\bfoo\b"),
    (["log.every=0"], r"log\.every"),
    (["eval.every=0"], r"eval\.every"),
    (["dist.timeout_s=0"], r"dist\.timeout_s"),
    (["dist.backend=foo"], r"dist\.backend"),
    (["init=foo"], r"\binit\b"),
    (["flatness.samples=1"], r"flatness\.samples"),
    (["guard.nonfinite=ignore"], r"guard\.nonfinite"),
    (["checkpoint.every=-1"], r"checkpoint\.every"),
    (["checkpoint.keep=0"], r"checkpoint\.keep"),
    (["flatness.sigmas=[0.1,-1]"], r"flatness\.sigmas"),
    (["optim.nesterov=true", "optim.momentum=0"], r"optim\.nesterov"),
    # the rest of the keys, each with a wrong value or a wrong type
    (["model.bias=maybe"], r"model\.bias"),
    (["model.batch_norm=true"], r"model\.batch_norm"),
    (["model.init_std=-1"], r"model\.init_std"),
    (["data.path=[1,2]"], r"data\.path"),
    (["data.num_samples=0"], r"data\.num_samples"),
    (["data.input_dim=0"], r"data\.input_dim"),
    (["data=teacher", "data.num_outputs=1"], r"data\.num_outputs"),
    (["data.library_size=0"], r"data\.library_size"),
    (["data.fixed_batch=0"], r"data\.fixed_batch"),
    (["coupling.name=mean"], r"coupling\.name"),
    (["coupling.eta_growth=-0.1"], r"coupling\.eta_growth"),
    (["optim.name=lbfgs"], r"optim\.name"),
    (["optim.momentum=1"], r"optim\.momentum"),
    (["optim.weight_decay=-1"], r"optim\.weight_decay"),
    (["optim.betas=[0.9]"], r"optim\.betas"),
    (["train.dtype=float16"], r"train\.dtype"),
    (["dist.device=tpu"], r"dist\.device"),
    (["checkpoint.resume=sometimes"], r"checkpoint\.resume"),
    (["checkpoint.remap=perhaps"], r"checkpoint\.remap"),
    (["seed=-1"], r"\bseed\b"),
    (["seed=abc"], r"\bseed\b"),
    (["guard.max_consecutive_skips=0"], r"guard\.max_consecutive_skips"),
    (["coupling=ddp", "checkpoint.remap=true"], r"checkpoint\.remap"),
    (["dist.overlap=sometimes"], r"dist\.overlap"),
    (["dist.bucket_mb=0"], r"dist\.bucket_mb"),
    (["dist.bucket_mb=nan"], r"dist\.bucket_mb"),
    (["parallel.dp=0"], r"parallel\.dp"),
    (["parallel.dp=2", "coupling=ddp"], r"parallel\.dp"),
    (["parallel.dp=2", "checkpoint.remap=true"], r"checkpoint\.remap"),
]


def _leaf_keys(schema, prefix: str = "") -> set[str]:
    import dataclasses

    keys = set()
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys |= _leaf_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_every_config_key_has_a_bad_value_in_the_table():
    from replica_dist.config import Config

    covered = {o.split("=")[0] for overrides, _ in BAD_OVERRIDES for o in overrides}
    assert _leaf_keys(Config) - covered == set()


@pytest.mark.parametrize(("overrides", "pattern"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_raises_config_error(tmp_path, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        _load(tmp_path, *overrides)
    # One line, so that the CLI prints a single readable error.
    assert "\n" not in str(info.value)


def test_unknown_group_option_lists_choices(tmp_path):
    with pytest.raises(ConfigError, match=r"model") as info:
        _load(tmp_path, "model=foo")
    message = str(info.value)
    assert "foo" in message
    assert "mlp" in message and "cnn" in message


def test_bad_overrides_accepted_at_boundary(tmp_path):
    """The boundaries of the checks that reject the table above are themselves valid."""
    cfg, _ = _load(
        tmp_path,
        "coupling=linear",
        "coupling.eta=1",
        "coupling.eta_max=1",
        "optim.momentum=0",
        "train.steps=1",
        "train.batch_size=1",
        "coupling.every=1",
    )
    assert cfg.coupling.eta == 1.0 and cfg.coupling.eta_max == 1.0
    assert cfg.optim.momentum == 0.0
    assert cfg.train.steps == 1 and cfg.train.batch_size == 1


def test_group_option_coupling_linear(tmp_path):
    cfg, _ = _load(tmp_path, "coupling=linear")
    assert cfg.coupling.name == "linear"
    assert cfg.coupling.eta == pytest.approx(0.001) and cfg.coupling.eta_growth == pytest.approx(0.004)
    assert cfg.coupling.eta_max == pytest.approx(1.0)
    assert cfg.coupling.every == 1
    assert cfg.coupling.via_optimizer is False


def test_group_option_coupling_average(tmp_path):
    cfg, _ = _load(tmp_path, "coupling=average")
    assert cfg.coupling.name == "average"
    assert cfg.coupling.every == 4


@pytest.mark.parametrize("name", ["none", "ddp"])
def test_group_option_coupling_none_ddp(tmp_path, name):
    cfg, _ = _load(tmp_path, f"coupling={name}")
    assert cfg.coupling.name == name
    assert cfg.coupling.every == 1


def test_group_option_optim_adam(tmp_path):
    cfg, _ = _load(tmp_path, "optim=adam")
    assert cfg.optim.name == "adam"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.betas == pytest.approx([0.9, 0.999])
    assert cfg.optim.weight_decay == 0.0


def test_group_option_model_cnn(tmp_path):
    cfg, _ = _load(tmp_path, "model=cnn")
    assert cfg.model.name == "cnn"
    assert cfg.model.hidden == [16, 32]
    assert cfg.model.activation == "relu"
    assert cfg.model.bias is True
    assert cfg.model.batch_norm is False


def test_group_option_data_teacher(tmp_path):
    cfg, _ = _load(tmp_path, "data=teacher")
    assert cfg.data.name == "teacher"
    assert cfg.data.split == "shard"
    assert cfg.data.num_samples == 2000
    assert cfg.data.input_dim == 20
    assert cfg.data.num_outputs == 4
    assert cfg.data.test_fraction == pytest.approx(0.2)


def test_group_option_experiment_note(tmp_path):
    cfg, _ = _load(tmp_path, "+experiment=note")
    assert cfg.model.name == "mlp"
    assert cfg.model.hidden == [100]
    assert cfg.model.activation == "relu"
    assert cfg.model.bias is False
    assert cfg.model.init_std == pytest.approx(1.0)
    assert cfg.data.name == "seed"
    assert cfg.data.library_size == 640
    assert cfg.data.input_dim == 1000
    assert cfg.data.num_outputs == 10
    assert cfg.data.fixed_batch == 64
    assert cfg.coupling.name == "tanh"
    assert cfg.coupling.eta == pytest.approx(1.0)
    assert cfg.coupling.temperature == pytest.approx(1.0)
    assert cfg.optim.lr == pytest.approx(1e-6)
    assert cfg.optim.momentum == 0.0  # the note's plain gradient step
    assert cfg.train.steps == 50
    assert cfg.train.batch_size == 64
    assert cfg.log.every == 1
    assert cfg.eval.every == 10


def test_experiment_note_can_be_overridden(tmp_path):
    cfg, _ = _load(tmp_path, "+experiment=note", "train.steps=7", "coupling=linear")
    assert cfg.train.steps == 7
    assert cfg.coupling.name == "linear"
    # The experiment's coupling.eta is applied on top of the chosen group option.
    assert cfg.coupling.eta == pytest.approx(1.0)


@pytest.mark.parametrize(("override", "key"), [("optim.lr=-1", "optim.lr"), ("model=foo", "model")])
def test_cli_bad_override_exits_2_with_one_line(tmp_path, override, key):
    run_dir = tmp_path / "x"
    proc = subprocess.run(
        [sys.executable, "-m", "replica_dist.train", f"hydra.run.dir={run_dir}", override],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].strip()
    assert key in lines[0]
    assert not run_dir.exists() or not any(run_dir.iterdir())
