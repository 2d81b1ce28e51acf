"""load_config's checks beyond the bad-override table: what it still accepts, the memory bound
against closed forms and the real model, and help_text."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from replica_dist import data as data_module
from replica_dist import model as model_module
from replica_dist import streams
from replica_dist.config import (
    APPLIES_TO,
    CHOICES,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    generated_data_bytes,
    help_text,
    load_config,
    parameter_count,
)
from replica_dist.data import load_dataset
from replica_dist.model import build_model

GIB = 2**30


def _load(tmp_path: Path, *overrides: str):
    return load_config([f"hydra.run.dir={tmp_path / 'run'}", *overrides])


def _memory(monkeypatch, nbytes: int, processes: int | None = None) -> None:
    monkeypatch.setattr("replica_dist.config.memory._physical_memory_bytes", lambda: nbytes)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))


# ---- what must keep working

ACCEPTED = [
    ["data=file", "data.path=x.npz", "data.task=regression", "data.split=full"],
    [
        "data._target_=pkg.Data",
        "data.kwargs={}",
        "data.num_workers=2",
        "data.pin_memory=true",
        "data.persistent_workers=true",
        "data.test_fraction=0.3",
        "data.task=classification",
    ],
    [
        "data=teacher",
        "data.num_samples=100",
        "data.input_dim=5",
        "data.num_outputs=3",
        "data.test_fraction=0.5",
    ],
    ["data=seed", "data.input_dim=5", "data.num_outputs=2", "data.library_size=10", "data.fixed_batch=4"],
    ["+experiment=note", "data.input_dim=500", "data.library_size=100"],
    ["model=cnn", "model.batch_norm=true"],
    # torchvision presets: the root's layout is checked in tests/test_vision.py (needs torchvision)
    [
        "data=imagefolder",
        "data.root=/data",
        "data.split=full",
        "data.augment=false",
        "data.crop_padding=0",
        "data.flip=true",
        "data.normalize=true",
        "data.mean=[0.5,0.5,0.5]",
        "data.std=[0.2,0.2,0.2]",
        "data.image_size=64",
    ],
    ["coupling=tanh", "coupling.temperature=0.5", "coupling.eta=0.1", "coupling.eta_growth=0"],
    ["coupling=linear", "coupling.eta_final=0.4", "coupling.eta_max=0.5", "coupling.via_optimizer=true"],
    ["coupling=average", "coupling.every=3"],
    [
        "coupling=diloco",
        "coupling.every=10",
        "coupling.outer_lr=1.0",
        "coupling.outer_momentum=0.5",
        "coupling.outer_nesterov=false",
    ],
    ["coupling=tanh", "coupling.every=4", "coupling.fragments=2"],
    ["coupling=linear", "dist.compress=int8", "dist.compress_chunk=256", "dist.error_feedback=true"],
    ["optim=adam", "optim.betas=[0.8,0.9]"],
    ["optim=sgd", "optim.momentum=0.5", "optim.nesterov=true"],
    ["guard.nonfinite=skip", "guard.max_consecutive_skips=3"],
    # keys for no particular option, with any coupling (dist.overlap: "unaffected")
    ["coupling=ddp", "dist.overlap=false", "dist.bucket_mb=1", "optim.lr=0.1"],
    ["model.bias=false", "checkpoint.resume=False", "checkpoint.remap=TRUE"],
    ["checkpoint.remap=${checkpoint.resume}"],
    ["++optim.lr=0.1"],
    ["dist.timeout_s=2592000", "dist.bucket_mb=1048576"],
    ["seed=9223372036854775807"],
    ["hydra.job.name=x"],
    ["optim.schedule=cosine", "optim.warmup_steps=10", "optim.min_lr=0.001"],
    ["optim.schedule=step", "optim.step_size=10", "optim.gamma=0.5"],
]


def test_accepted_overrides_cover_every_scoped_key():
    """Each key of APPLIES_TO appears below with an option it applies to."""
    covered = {o.split("=")[0] for overrides in ACCEPTED for o in overrides}
    assert set(APPLIES_TO) - covered == set()


@pytest.mark.parametrize("overrides", ACCEPTED, ids=[" ".join(o) for o in ACCEPTED])
def test_override_accepted(tmp_path, monkeypatch, overrides):
    monkeypatch.setattr("replica_dist.vision.check_root", lambda data: None)
    cfg, _ = _load(tmp_path, *overrides)
    for override in overrides:
        key, value = override.split("=", 1)
        key = key.lstrip("+")
        if key.startswith("hydra") or key in ("data", "model", "coupling", "optim", "experiment"):
            continue
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        if value.lower() in ("true", "false"):
            assert got is (value.lower() == "true"), override
        elif not value.startswith(("$", "[")):
            assert str(got) == value or float(got) == float(value), override


def test_experiment_note_values_are_not_scope_checked(tmp_path):
    """+experiment=note sets coupling.eta and friends from YAML; switching coupling afterwards
    keeps them (as before) instead of refusing keys the user did not type."""
    cfg, _ = _load(tmp_path, "+experiment=note", "coupling=average")
    assert cfg.coupling.name == "average" and cfg.coupling.eta == 1.0


def test_defaults_and_note_fit_a_small_node(tmp_path, monkeypatch):
    """1 GiB shared by 8 processes: the defaults and the note need far less."""
    _memory(monkeypatch, GIB, processes=8)
    assert _load(tmp_path)[0].model.hidden == [128]
    assert _load(tmp_path, "+experiment=note")[0].data.input_dim == 1000


# ---- the memory bound


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model.bias=false", "model.hidden=[7,5]"],
        ["model=cnn"],
        ["model=cnn", "model.batch_norm=true", "model.hidden=[3,4,5]"],
        ["model=cnn", "model.bias=false"],
        ["data=teacher", "model.hidden=[9]"],
        ["+experiment=note"],
        ["data=seed", "data.num_outputs=3", "data.input_dim=11", "model.hidden=[]"],
    ],
)
def test_parameter_count_matches_the_built_model(tmp_path, overrides):
    cfg, _ = _load(tmp_path, *overrides)
    data = load_dataset(cfg.data, cfg.seed, torch.float32)
    model = build_model(cfg.model, data.input_shape, data.num_outputs, 0)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("model", "input_shape", "outputs"),
    [
        (ModelConfig(hidden=[]), (13,), 2),
        (ModelConfig(hidden=[5, 4, 3], bias=False), (2, 3), 7),
        (ModelConfig(name="cnn", hidden=[3]), (1, 8, 8), 10),
        (ModelConfig(name="cnn", hidden=[4, 2], batch_norm=True), (3, 5, 7), 4),
        (ModelConfig(name="cnn", hidden=[6], bias=False, batch_norm=True), (2, 1, 1), 1),
    ],
)
def test_model_parameter_count_is_the_built_networks(model, input_shape, outputs):
    built = build_model(model, input_shape, outputs, 0)
    assert model_module.parameter_count(model, input_shape, outputs) == sum(
        p.numel() for p in built.parameters()
    )


@pytest.mark.parametrize(
    "cfg",
    [
        DataConfig(),
        DataConfig(name="seed", input_dim=6, num_outputs=3, library_size=20, fixed_batch=4),
        DataConfig(name="teacher", num_samples=60, input_dim=5, num_outputs=3),
    ],
    ids=["digits", "seed", "teacher"],
)
def test_generated_shape_is_the_generated_datas(cfg):
    data = load_dataset(cfg, 0, torch.float64)
    assert data_module.generated_shape(cfg) == (data.input_shape, data.num_outputs)


def test_teacher_bytes_are_the_arrays_it_draws(monkeypatch):
    """The teacher's inputs and first layer as drawn, and its hidden activations (one per sample
    and hidden unit), all float64."""
    drawn = []
    real_rng = streams.rng

    class Recording:
        def __init__(self, rng):
            self.rng = rng

        def standard_normal(self, shape):
            drawn.append(shape)
            return self.rng.standard_normal(shape)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    monkeypatch.setattr(streams, "rng", lambda *seeds: Recording(real_rng(*seeds)))
    cfg = DataConfig(name="teacher", num_samples=60, input_dim=5, num_outputs=3)
    load_dataset(cfg, 0, torch.float64)
    inputs, first_layer, second_layer = drawn
    assert inputs == (60, 5) and first_layer[0] == 5 and second_layer == (first_layer[1], 3)
    hidden = first_layer[1]
    assert data_module.generated_bytes(cfg) == 8 * (60 * 5 + 5 * hidden + 60 * hidden)
    assert data_module.generated_bytes(DataConfig()) == 0


def test_generated_data_bytes_closed_form(tmp_path):
    cfg, _ = _load(tmp_path, "data=teacher", "data.num_samples=300", "data.input_dim=7", "data.num_outputs=3")
    # x (300x7), the teacher's first layer (7x12) and its hidden activations (300x12), float64
    assert generated_data_bytes(cfg) == 8 * (300 * 7 + 7 * 12 + 300 * 12)
    cfg, _ = _load(tmp_path, "data=seed", "data.library_size=50", "data.input_dim=7", "data.num_outputs=3")
    assert generated_data_bytes(cfg) == 8 * 50 * (7 + 3)
    cfg, _ = _load(tmp_path, "data=seed", "data.library_size=50", "data.input_dim=7", "data.num_outputs=3")
    data = load_dataset(cfg.data, cfg.seed, torch.float64)
    assert generated_data_bytes(cfg) == data.x_train.nbytes + data.y_train.nbytes


def test_model_bound_is_weights_and_gradients_per_process(tmp_path, monkeypatch):
    # digits into an mlp: 64*h + h + 10*h + 10 weights; 2 copies of 4 bytes (float32) each
    h = 1000
    need = 2 * 4 * (64 * h + h + 10 * h + 10)
    _memory(monkeypatch, need)
    _load(tmp_path, f"model.hidden=[{h}]")
    with pytest.raises(ConfigError, match=r"^model\.hidden=\[1001\] gives a mlp"):
        _load(tmp_path, f"model.hidden=[{h + 1}]")
    with pytest.raises(ConfigError, match=r"\(float64\)"):
        _load(tmp_path, f"model.hidden=[{h}]", "train.dtype=float64")
    _memory(monkeypatch, 2 * need - 1, processes=2)
    with pytest.raises(ConfigError, match=r"shared by 2 processes"):
        _load(tmp_path, f"model.hidden=[{h}]")


def test_data_bound_is_the_generated_arrays(tmp_path, monkeypatch):
    n, d, k = 1000, 30, 2
    need = 8 * (n * d + d * 4 * k + n * 4 * k)
    _memory(monkeypatch, need)
    teacher = ["data=teacher", f"data.input_dim={d}", f"data.num_outputs={k}", "model.hidden=[1]"]
    _load(tmp_path, *teacher, f"data.num_samples={n}")
    with pytest.raises(ConfigError, match=rf"^data\.num_samples={n + 1}, data\.input_dim={d} generate"):
        _load(tmp_path, *teacher, f"data.num_samples={n + 1}")


def test_real_memory_refuses_what_no_machine_holds(tmp_path):
    with pytest.raises(ConfigError, match=r"^model\.hidden=.* GiB of memory$"):
        _load(tmp_path, "model.hidden=[1000000000000,1000000000000]")


# ---- help_text


def _leaf_fields(schema=Config, prefix=""):
    for f in dataclasses.fields(schema):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def test_help_lists_groups_with_their_options():
    text = help_text()
    coupling = re.search(r"^  coupling: (.*)$", text, re.MULTILINE)
    assert coupling, text
    assert {"tanh", "linear", "average", "none", "ddp", "diloco"} <= set(
        re.findall(r"\w+", coupling.group(1))
    )
    assert re.search(r"^  optim: adam, sgd \(default sgd\)$", text, re.MULTILINE)
    assert re.search(r"^  experiment: note$", text, re.MULTILINE)


def test_help_lists_every_key_with_type_default_and_docstring():
    text = help_text()
    flat = " ".join(text.split())
    assert "optim.lr (float, default 0.05): Learning rate." in flat
    assert (
        "coupling.temperature (float, default 1.0, coupling=tanh only): tanh only: T in tanh((mean - w)/T)."
        in flat
    )
    assert "data.path (str, default '', data=file only): file: path of a .npz" in flat
    assert "optim.nesterov (bool, default false, optim=sgd only)" in flat
    # a choice shows its values in place of its type
    assert "coupling.name (tanh|linear|average|none|ddp|diloco, default tanh): Coupling form." in flat
    assert "train.dtype (float32|float64, default float32): Floating-point type" in flat
    assert (
        "data.split (shard|full, default shard, data=digits|teacher|file|dataset|imagefolder|cifar10|" in flat
    )
    assert "init (independent|same, default independent)" in flat
    for key, f in _leaf_fields():
        kind = "|".join(CHOICES[f.type]) if f.type in CHOICES else f.type
        assert re.search(rf"^  {re.escape(key)} \({re.escape(kind)}, default ", text, re.MULTILINE), key
    # every key has a docstring: nothing ends at the colon
    assert not re.search(r"^  [\w.]+ \(.*\): ?$", text, re.MULTILINE)
