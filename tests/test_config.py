"""Config composition and validation: defaults, group options, bad overrides, CLI errors."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
from trainer_runs import REPO

from replica_dist.config import (
    Config,
    ConfigError,
    CouplingConfig,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
)


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
    # The study's shape, relative to the run: from 0.001 at step 1 to 0.4 at the last step.
    assert cfg.coupling.eta == pytest.approx(0.001) and cfg.coupling.eta_end == pytest.approx(0.4)
    assert cfg.coupling.eta_growth is None and cfg.coupling.eta_final is None
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
    (
        ["coupling.eta_final=0.3", "coupling.eta_growth=0.004"],
        r"coupling\.eta_growth=0\.004 and coupling\.eta_final=0\.3 both set",
    ),
    (["coupling.eta_final=2"], r"coupling\.eta_final"),
    (["coupling=average", "coupling.via_optimizer=true"], r"coupling\.via_optimizer"),
    (
        ["coupling=diloco", "coupling.every=0"],
        r"^coupling\.every \(the outer period H of coupling\.name=diloco\)",
    ),
    (["coupling=diloco", "coupling.outer_lr=0"], r"^coupling\.outer_lr must be > 0; got 0\.0$"),
    (["coupling=diloco", "coupling.outer_lr=-1"], r"^coupling\.outer_lr must be > 0; got -1\.0$"),
    (["coupling.fragments=0"], r"^coupling\.fragments must be >= 1; got 0$"),
    (
        ["coupling=average", "coupling.every=6", "coupling.fragments=4"],
        r"^coupling\.fragments must divide coupling\.every \(6\), so that each fragment couples every 6 steps",
    ),
    (["coupling=diloco", "coupling.outer_momentum=1"], r"^coupling\.outer_momentum must be in \[0, 1\)"),
    (["coupling=diloco", "coupling.outer_nesterov=maybe"], r"coupling\.outer_nesterov"),
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
    (["model._target_=no.such.Thing"], r"^model\._target_=no\.such\.Thing: cannot import it"),
    (
        ["model.kwargs={width: 3}"],
        r"^model\.kwargs\.width is an argument of a model chosen by model\._target_",
    ),
    (["data=file", "data.path=[1,2]"], r"data\.path"),
    (["data=teacher", "data.num_samples=0"], r"data\.num_samples must be >= 1"),
    (["data=teacher", "data.input_dim=0"], r"data\.input_dim must be >= 1"),
    (["data=teacher", "data.num_outputs=1"], r"data\.num_outputs"),
    (["data=seed", "data.library_size=0"], r"data\.library_size must be >= 1"),
    (["data=seed", "data.fixed_batch=0"], r"data\.fixed_batch must be >= 1"),
    (["coupling.name=mean"], r"coupling\.name"),
    (["coupling._target_=no.such.Form"], r"^coupling\._target_=no\.such\.Form: cannot import it"),
    (
        ["coupling._target_=torch.nn.Linear"],
        r"^coupling\._target_=torch\.nn\.Linear: not a subclass of replica_dist\.forms\.Form",
    ),
    (
        ["coupling.kwargs={k: 3}"],
        r"^coupling\.kwargs\.k is an argument of a form chosen by coupling\._target_",
    ),
    (["coupling.eta_growth=-0.1"], r"coupling\.eta_growth"),
    (["optim.name=lbfgs"], r"optim\.name"),
    (["optim.momentum=1"], r"optim\.momentum"),
    (["optim.weight_decay=-1"], r"optim\.weight_decay"),
    (["optim=adam", "optim.betas=[0.9]"], r"optim\.betas must be two numbers"),
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
    (["dist.compress=fp8"], r"dist\.compress"),
    (["dist.compress=int8", "dist.compress_chunk=0"], r"dist\.compress_chunk"),
    (["dist.error_feedback=true"], r"dist\.error_feedback"),
    (["parallel.dp=0"], r"parallel\.dp"),
    (["parallel.dp=2", "coupling=ddp"], r"parallel\.dp"),
    (["parallel.dp=2", "checkpoint.remap=true"], r"checkpoint\.remap"),
    # unknown keys added with + or ++ (the composed config against the schema)
    (["+optim.lrr=0.1"], r"^unknown key optim\.lrr \(did you mean optim\.lr\?\)"),
    (["+foo=1"], r"^unknown key foo\b"),
    (["+model.bogus=1"], r"^unknown key model\.bogus\b"),
    (["++foo=1"], r"^unknown key foo\b"),
    (["++optim.lrr=0.1"], r"^unknown key optim\.lrr\b"),
    (["+model.hiden=[3]"], r"^unknown key model\.hiden \(did you mean model\.hidden\?\)"),
    (["+experiment=note", "+coupling.temp=2"], r"^unknown key coupling\.temp\b"),
    # Without `+`, Hydra would say how to add the key; a typo wants its nearest known key.
    (["optim.lrr=0.1"], r"^unknown key optim\.lrr \(did you mean optim\.lr\?\)"),
    (
        ["coupling.tmperature=0.1"],
        r"^unknown key coupling\.tmperature \(did you mean coupling\.temperature\?\)",
    ),
    (["+model@foo=cnn"], r"\bfoo\b"),
    # booleans: only true or false, not an integer or a YAML 1.1 word
    (["model.bias=2"], r"^model\.bias must be true or false; got 'model\.bias=2'"),
    (["optim.nesterov=2"], r"^optim\.nesterov must be true or false"),
    (["checkpoint.resume=5"], r"^checkpoint\.resume must be true or false"),
    (["checkpoint.resume=0"], r"^checkpoint\.resume must be true or false"),
    (["model.bias=yes"], r"^model\.bias must be true or false"),
    (["dist.overlap=1"], r"^dist\.overlap must be true or false"),
    (["coupling.via_optimizer=1"], r"^coupling\.via_optimizer must be true or false"),
    # integers: a float is refused with the key (large ones too), so is anything beyond int64
    (["data.input_dim=1e12"], r"^data\.input_dim must be an integer; got 'data\.input_dim=1e12'"),
    (["train.steps=1e400"], r"^train\.steps must be an integer"),
    (["model.hidden=[1.5]"], r"^model\.hidden must hold integers"),
    (["seed=100000000000000000000000000"], r"^seed must be at most 2\*\*63-1"),
    (["train.steps=9223372036854775808"], r"^train\.steps must be at most 2\*\*63-1"),
    # floats: finite
    (["optim.lr=inf"], r"^optim\.lr must be finite"),
    (["coupling.eta_max=inf"], r"^coupling\.eta_max must be finite"),
    (["optim=adam", "optim.betas=[0.9,nan]"], r"^optim\.betas"),
    # sizes that cannot be allocated (this table runs with 64 GiB of memory, see _fixed_memory)
    (["model.hidden=[1000000000]"], r"^model\.hidden=\[1000000000\] gives a mlp of .* weights.* GiB"),
    (["model=cnn", "model.hidden=[100000,100000]"], r"^model\.hidden=\[100000, 100000\] gives a cnn"),
    (
        ["data=teacher", "data.num_samples=1000000000000"],
        r"^data\.num_samples=1000000000000, data\.input_dim=20",
    ),
    (
        ["data=seed", "data.input_dim=1000000000000"],
        r"^data\.library_size=640, data\.input_dim=1000000000000",
    ),
    (["data=seed", "data.library_size=1000000000000"], r"^data\.library_size=1000000000000"),
    (
        ["data=teacher", "data.input_dim=100000", "model.hidden=[100000]"],
        r"^model\.hidden=\[100000\], data\.input_dim",
    ),
    # stated maxima
    (["dist.timeout_s=1e30"], r"^dist\.timeout_s must be in \(0, 2592000\] seconds; got 1e\+30"),
    (["dist.timeout_s=inf"], r"^dist\.timeout_s must be in \(0, 2592000\]"),
    (["dist.bucket_mb=1e308"], r"^dist\.bucket_mb must be in \(0, 1048576\] MiB; got 1e\+308"),
    # overrides that do not parse: named in full
    (["optim.lr=["], r"^cannot parse override 'optim\.lr=\[': "),
    (["model.hidden=[1,"], r"^cannot parse override 'model\.hidden=\[1,': "),
    (["=0.1"], r"^cannot parse override '=0\.1': no key before '='"),
    (["optim.lr"], r"^cannot parse override 'optim\.lr': "),
    (["model=[cnn,mlp]"], r"^model takes one option; got 'model=\[cnn,mlp\]'"),
    # any map-style Dataset (data._target_) and its DataLoader; evaluation's batches
    (
        ["data._target_=my data.Set"],
        r"^data\._target_ must be a dotted path pkg\.module\.Name; got 'my data\.Set'",
    ),
    (["data=dataset"], r"^data\._target_ must be set for data\.name=dataset"),
    (["data._target_=a.B", "data.kwargs=3"], r"Cannot assign int to Dict.*data\.kwargs"),
    (["data._target_=a.B", "data.num_workers=-1"], r"^data\.num_workers must be >= 0; got -1"),
    (["data._target_=a.B", "data.pin_memory=1"], r"^data\.pin_memory must be true or false"),
    (
        ["data._target_=a.B", "data.persistent_workers=true"],
        r"^data\.persistent_workers needs data\.num_workers > 0",
    ),
    (
        ["data.num_workers=2"],
        r"^data\.num_workers is only used with data=dataset, imagefolder, .* or fashionmnist; got data=digits",
    ),
    (["data.kwargs={}"], r"^data\.kwargs is only used with data=dataset; got data=digits"),
    (["eval.batch_size=0"], r"^eval\.batch_size must be >= 1; got 0"),
    # keys for another option of their group (config.APPLIES_TO), when set on the command line
    (["data.path=my.npz"], r"^data\.path is only used with data=file; got data=digits"),
    (["data.task=regression"], r"^data\.task is only used with data=file or dataset; got data=digits"),
    (["data.num_samples=100"], r"^data\.num_samples is only used with data=teacher; got data=digits"),
    (
        ["data=seed", "data.num_samples=100"],
        r"^data\.num_samples is only used with data=teacher; got data=seed",
    ),
    (["data.input_dim=10"], r"^data\.input_dim is only used with data=seed or teacher; got data=digits"),
    (["data.num_outputs=3"], r"^data\.num_outputs is only used with data=seed or teacher"),
    (
        ["data=teacher", "data.library_size=10"],
        r"^data\.library_size is only used with data=seed; got data=teacher",
    ),
    (["data.fixed_batch=8"], r"^data\.fixed_batch is only used with data=seed"),
    (
        ["data=seed", "data.test_fraction=0.5"],
        r"^data\.test_fraction is only used with data=digits, teacher or dataset",
    ),
    (
        ["+experiment=note", "data.split=full"],
        r"^data\.split is only used with data=digits, teacher, file, dataset, imagefolder, .* or fashionmnist; got data=seed",
    ),
    # the torchvision presets' keys (replica_dist/vision.py)
    (["data.root=/data"], r"^data\.root is only used with data=imagefolder, cifar10, .*; got data=digits"),
    (["data.augment=1"], r"^data\.augment must be true or false"),
    (["data.flip=1"], r"^data\.flip must be true or false"),
    (
        ["data=cifar10", "data.root=/data", "data.crop_padding=-1"],
        r"^data\.crop_padding must be >= 0; got -1",
    ),
    (["data=cifar10", "data.root=/data", "data.crop_padding=1.5"], r"^data\.crop_padding must be an integer"),
    (["data.normalize=false"], r"^data\.normalize is only used with data=imagefolder"),
    (["data.mean=[0.5]"], r"^data\.mean is only used with data=imagefolder"),
    (["data=mnist", "data.root=/data", "data.std=[0]"], r"^data\.std must hold values > 0; got \[0\.0\]"),
    (["data=mnist", "data.root=/data", "data.image_size=-2"], r"^data\.image_size must be >= 0; got -2"),
    (["model.batch_norm=false"], r"^model\.batch_norm is only used with model=cnn; got model=mlp"),
    (
        ["coupling=linear", "coupling.temperature=0.1"],
        r"^coupling\.temperature is only used with coupling=tanh; got coupling=linear",
    ),
    (
        ["coupling=none", "coupling.eta=0.1"],
        r"^coupling\.eta is only used with coupling=tanh or linear; got coupling=none",
    ),
    (
        ["coupling=ddp", "coupling.eta_growth=0"],
        r"^coupling\.eta_growth is only used with coupling=tanh or linear",
    ),
    (
        ["coupling=average", "coupling.eta_final=0.4"],
        r"^coupling\.eta_final is only used with coupling=tanh or linear",
    ),
    (
        ["coupling=none", "coupling.eta_max=0.5"],
        r"^coupling\.eta_max is only used with coupling=tanh or linear",
    ),
    (
        ["coupling=none", "coupling.every=2"],
        r"^coupling\.every is only used with coupling=tanh, linear, average or diloco; got coupling=none",
    ),
    (["coupling=ddp", "coupling.every=2"], r"^coupling\.every is only used with .*; got coupling=ddp"),
    (
        ["coupling=none", "coupling.via_optimizer=false"],
        r"^coupling\.via_optimizer is only used with coupling=tanh or linear",
    ),
    (["optim.betas=[0.9,0.99]"], r"^optim\.betas is only used with optim=adam; got optim=sgd"),
    (["optim=adam", "optim.momentum=0.5"], r"^optim\.momentum is only used with optim=sgd; got optim=adam"),
    (["optim=adam", "optim.nesterov=false"], r"^optim\.nesterov is only used with optim=sgd; got optim=adam"),
    # the recipe (replica_dist.recipe)
    (["optim.schedule=linear"], r"^optim\.schedule must be one of constant, cosine, step; got 'linear'"),
    (["optim.warmup_steps=-1"], r"^optim\.warmup_steps must be >= 0"),
    (
        ["train.steps=10", "optim.warmup_steps=10"],
        r"^optim\.warmup_steps must be < train\.steps \(10\); got 10",
    ),
    (["optim.schedule=cosine", "optim.min_lr=1"], r"^optim\.min_lr must be in \[0, optim\.lr=0\.05\]"),
    (["optim.schedule=step", "optim.step_size=0"], r"^optim\.step_size must be >= 1"),
    (["optim.schedule=step", "optim.gamma=0"], r"^optim\.gamma must be in \(0, 1\]"),
    (["optim.step_size=10"], r"^optim\.step_size is only used with optim\.schedule=step"),
    (["optim.clip_norm=-1"], r"^optim\.clip_norm must be >= 0"),
    (["optim.label_smoothing=1"], r"^optim\.label_smoothing must be in \[0, 1\)"),
    (["data=seed", "optim.label_smoothing=0.1"], r"^optim\.label_smoothing is for classification only"),
    (["train.epochs=-1"], r"^train\.epochs must be >= 0"),
    (["train.epochs=2", "train.steps=10"], r"^train\.steps and train\.epochs=2 both set the run's length"),
    (["train.grad_accum=0"], r"^train\.grad_accum must be >= 1"),
    (["train.precision=fp8"], r"^train\.precision must be one of fp32, bf16, fp16; got 'fp8'"),
    (["train.compile=1"], r"^train\.compile must be true or false"),
    # live fault tolerance (ft.*; tests/test_ft.py has the rest)
    (["ft.enabled=1"], r"^ft\.enabled must be true or false"),
    (["ft.enabled=true", "ft.lighthouse="], r"^ft\.lighthouse must be set \(or the TORCHFT_LIGHTHOUSE"),
    (["ft.replicas=0"], r"^ft\.replicas must be >= 1; got 0"),
    (["ft.replica_id=2"], r"^ft\.replica_id must be in \[0, ft\.replicas=2\); got 2"),
    (["ft.min_replicas=3"], r"^ft\.min_replicas must be in \[1, ft\.replicas=2\]; got 3"),
    (["ft.timeout_s=0"], r"^ft\.timeout_s must be > 0"),
    (["ft.quorum_timeout_s=5"], r"^ft\.quorum_timeout_s must be > ft\.timeout_s=10\.0; got 5\.0"),
    (["train.init_from=no/such/run"], r"^train\.init_from=no/such/run: no such file or directory"),
    (
        ["guard.max_consecutive_skips=5"],
        r"^guard\.max_consecutive_skips is only used with guard\.nonfinite=skip; got guard\.nonfinite=stop",
    ),
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


@pytest.fixture
def _fixed_memory(monkeypatch):
    """64 GiB and one process on this node, so that the size checks do not depend on the machine."""
    monkeypatch.setattr("replica_dist.config.memory._physical_memory_bytes", lambda: 64 * 2**30)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


@pytest.mark.parametrize(("overrides", "pattern"), BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_override_raises_config_error(tmp_path, overrides, pattern, _fixed_memory):
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
    assert cfg.coupling.eta == pytest.approx(0.001) and cfg.coupling.eta_end == pytest.approx(0.4)
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


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("optim.lr=-1", "optim.lr"),
        ("model=foo", "model"),
        ("optim.lr=[", "cannot parse override 'optim.lr=['"),
        ("+optim.lrr=0.1", "unknown key optim.lrr"),
    ],
)
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


@pytest.mark.parametrize(
    "option",
    sorted(
        f"{p.parent.name}/{p.stem}"
        for g in ("model", "data", "coupling", "optim")
        for p in (REPO / "conf" / g).glob("*.yaml")
    ),
)
def test_group_option_sets_only_what_differs_from_the_schema(option):
    """Every default has one home, the dataclass: a group option's YAML names the option and
    sets only values that differ from the dataclass default, so a default moves in one place."""
    from omegaconf import OmegaConf

    group, _ = option.split("/")
    schema = {"model": ModelConfig, "data": DataConfig, "coupling": CouplingConfig, "optim": OptimConfig}[
        group
    ]
    values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / f"{option}.yaml"))
    defaults = {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(schema)
    }
    assert values.pop("name") == option.split("/")[1]
    repeated = {key: value for key, value in values.items() if key in defaults and value == defaults[key]}
    assert repeated == {}, f"conf/{option}.yaml repeats the defaults of {schema.__name__}: {repeated}"
    assert set(values) <= set(defaults)


@pytest.mark.parametrize(
    ("group", "choice"),
    [("model", "ModelName"), ("data", "DataName"), ("coupling", "CouplingName"), ("optim", "OptimName")],
)
def test_group_name_choices_are_the_group_options(group, choice):
    """The typed values of each group's `name` are exactly the options conf/ offers for it."""
    from replica_dist.config import CHOICES

    assert set(CHOICES[choice]) == {p.stem for p in (REPO / "conf" / group).glob("*.yaml")}


def test_choice_fields_are_typed_for_checkers_and_plain_str_for_hydra(tmp_path):
    """Type checkers see a Literal; Hydra and the composed config see the plain strings."""
    import typing

    from replica_dist import config

    assert typing.get_type_hints(CouplingConfig)["name"] is str
    cfg, _ = _load(tmp_path, "coupling=linear", "train.dtype=float64", "dist.backend=gloo")
    assert type(cfg.coupling.name) is str and cfg.coupling.name == "linear"
    assert type(cfg.train.dtype) is str and cfg.train.dtype == "float64"
    assert cfg.dist.backend == "gloo"
    assert config.CHOICES["Dtype"] == ("float32", "float64")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.dtype=float16", "train.dtype must be one of float32, float64; got 'float16'"),
        (
            "coupling.name=mean",
            "coupling.name must be one of tanh, linear, average, none, ddp, diloco; got 'mean'",
        ),
        ("dist.device=tpu", "dist.device must be one of auto, cpu, cuda; got 'tpu'"),
        ("init=foo", "init must be one of independent, same; got 'foo'"),
        ("model.activation=elu", "model.activation must be one of relu, tanh, sigmoid, gelu; got 'elu'"),
    ],
)
def test_bad_choice_names_the_key_and_lists_the_values(tmp_path, override, message):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, override)
    assert str(info.value) == message
