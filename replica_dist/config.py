"""Typed configuration: dataclasses registered with Hydra's ConfigStore.

Hydra checks types and unknown keys; `__post_init__` checks ranges. Library code receives
these dataclasses (built once with `OmegaConf.to_object`), never a DictConfig.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import fnmatch
import functools
import importlib
import inspect
import math
import os
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from replica_dist.errors import one_line


class ConfigError(ValueError):
    """A user-facing configuration error; its message names the offending key."""


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{key} must be one of {', '.join(allowed)}; got {value!r}")


# Fields with a fixed set of values. OmegaConf 2.3 refuses Literal in a structured config, and
# an Enum would change the values to_object hands out (and checkpoints hold); so type checkers
# see these Literals, while at run time each alias is `str` for Hydra and CHOICES keeps the
# values, which `_check_choices` enforces with a message naming the key.
ModelName = Literal["mlp", "cnn"]
Activation = Literal["relu", "tanh", "sigmoid", "gelu"]
DataName = Literal[
    "digits",
    "seed",
    "teacher",
    "file",
    "dataset",
    "imagefolder",
    "cifar10",
    "cifar100",
    "mnist",
    "fashionmnist",
]
Split = Literal["shard", "full"]
Task = Literal["auto", "classification", "regression"]
CouplingName = Literal["tanh", "linear", "average", "none", "ddp", "diloco"]
OptimName = Literal["sgd", "adam"]
Dtype = Literal["float32", "float64"]
Schedule = Literal["constant", "cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]
Nonfinite = Literal["stop", "skip"]
Backend = Literal["auto", "gloo", "nccl"]
Device = Literal["auto", "cpu", "cuda"]
Init = Literal["independent", "same"]
Compression = Literal["none", "bf16", "int8"]

CHOICES: dict[str, tuple[str, ...]] = {
    name: get_args(alias) for name, alias in dict(globals()).items() if get_origin(alias) is Literal
}
"""Annotation name (as written on a field) -> the values that field allows."""

if not TYPE_CHECKING:
    ModelName = Activation = DataName = Split = Task = CouplingName = str
    OptimName = Dtype = Nonfinite = Backend = Device = Init = Schedule = Precision = Compression = str


def _check_choices(obj: object, prefix: str) -> None:
    """Every field of `obj` annotated with a choice type holds one of its values."""
    for f in dataclasses.fields(obj):
        if f.type in CHOICES:
            _one_of(prefix + f.name, getattr(obj, f.name), CHOICES[f.type])


@dataclass
class ModelConfig:
    name: ModelName = "mlp"
    """Architecture: `mlp` (fully connected) or `cnn` (small convolutional net for images)."""
    hidden: list[int] = field(default_factory=lambda: [128])
    """mlp: widths of the hidden layers, input to output. cnn: channels of the conv layers.
    Refused when the model's weights and gradients alone exceed this machine's memory."""
    activation: Activation = "relu"
    """Nonlinearity after every hidden layer."""
    bias: bool = True
    """Whether layers carry a bias (the note's network has none)."""
    batch_norm: bool = False
    """cnn only: BatchNorm after each convolution (its running statistics are coupled too)."""
    init_std: float = 0.0
    """If > 0, weights (not biases) drawn from N(0, init_std^2), as in the note (1.0);
    0 keeps PyTorch's default initialisation."""
    _target_: str = ""
    """Any importable model instead of the presets: a dotted path to a class or function
    returning a torch.nn.Module (my_pkg.nets.MyNet), built by Hydra's instantiate with the
    arguments in `kwargs`, from the replica's seed like a preset. The preset keys (name, hidden,
    activation, bias, batch_norm, init_std) are then refused on the command line. An argument
    `num_classes` or `num_outputs` of its signature, when not given, is the data's number of
    outputs (classes, or the target's dimension for regression)."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """_target_ only: its keyword arguments. `model.KEY=VALUE` (or +model.KEY=VALUE) for a KEY
    that is not one of the keys above lands here, as does model.kwargs.KEY=VALUE (the way to
    pass an argument that shares a preset key's name); a value with its own `_target_` is
    instantiated too."""

    def __post_init__(self) -> None:
        _check_choices(self, "model.")
        _check(
            all(width >= 1 for width in self.hidden),
            f"model.hidden must hold positive widths; got {list(self.hidden)}",
        )
        _check(
            self.name == "mlp" or len(self.hidden) >= 1,
            "model.hidden must name at least one conv layer for model.name=cnn",
        )
        _check(self.init_std >= 0, f"model.init_std must be >= 0; got {self.init_std}")
        _check(
            not self.batch_norm or self.name == "cnn",
            "model.batch_norm is only available for model.name=cnn",
        )
        _check(
            bool(self._target_) or not self.kwargs,
            f"model.kwargs are arguments of a model chosen by model._target_, which is not set; "
            f"got model.kwargs.{next(iter(self.kwargs), '')}",
        )


MODEL_PRESET_KEYS = ("name", "hidden", "activation", "bias", "batch_norm", "init_std")
"""The keys of the built-in networks: with model._target_ set they would be ignored."""
MODEL_DATA_ARGUMENTS = ("num_classes", "num_outputs")
"""Arguments of a model._target_ that, when its signature names them and the user did not
set them, take the data's number of outputs."""


def locate_target(key: str, path: str, builds: str):
    """The callable that the `_target_` setting `key` names (`path`), imported; one ConfigError
    naming `key=path` and why not. Like Hydra's own lookup (the longest importable module,
    then attributes), without its multi-line messages and its logged failure. `builds` says
    what the callable is for ("a model")."""
    where = f"{key}={path}"
    parts = path.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise ConfigError(f"{where}: not a dotted path to a class or function (module.Name)")
    obj = None
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            # Missing itself (or a parent): try a shorter module. Missing inside it: its problem.
            if err.name is not None and (module_name + ".").startswith(err.name + "."):
                continue
            raise ConfigError(
                f"{where}: cannot import {module_name}: {one_line(err, with_type=True)}"
            ) from None
        except Exception as err:  # the module exists but fails to import
            raise ConfigError(
                f"{where}: cannot import {module_name}: {one_line(err, with_type=True)}"
            ) from None
        break
    if obj is None:
        raise ConfigError(f"{where}: cannot import it: no module named {parts[0]!r}")
    for j in range(i, len(parts)):
        if not hasattr(obj, parts[j]):
            raise ConfigError(
                f"{where}: cannot import it: {'.'.join(parts[:j])} has no attribute {parts[j]!r}"
            )
        obj = getattr(obj, parts[j])
    if not callable(obj) or inspect.ismodule(obj):
        raise ConfigError(
            f"{where}: names a {type(obj).__name__}, not a class or function that builds {builds}"
        )
    return obj


def model_signature(target) -> inspect.Signature | None:
    """The target's call signature; None where Python cannot tell (some builtins)."""
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):
        return None


# The torchvision presets (replica_dist/vision.py) and the keys only they read.
VISION_DATA = ("imagefolder", "cifar10", "cifar100", "mnist", "fashionmnist")
_VISION_KEYS = ("root", "augment", "crop_padding", "flip", "normalize", "mean", "std", "image_size")


@dataclass
class DataConfig:
    name: DataName = "digits"
    """Dataset: digits (scikit-learn's 8x8 digits), seed (the note's random regression),
    teacher (labels from a fixed random network), file (a user's .npz), dataset (any
    map-style torch Dataset, `_target_`; set by giving `data._target_`); imagefolder, cifar10,
    cifar100, mnist, fashionmnist: torchvision presets read from data.root (the vision extra)."""
    _target_: str = ""
    """A map-style torch.utils.data.Dataset class or function (pkg.mod.Name) whose items are
    (x, y): y an integer label (classification) or a float target (regression). Called with
    `kwargs`; if it takes a `train` argument, with train=True for the training set and
    train=False for the test set (as torchvision's datasets), otherwise once and split by
    `test_fraction`. Setting it selects data.name=dataset."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """dataset: keyword arguments of `_target_` (e.g. +data.kwargs.root=/data); values with
    their own _target_ are instantiated too (Hydra's instantiate)."""
    num_workers: int = 0
    """dataset: DataLoader worker processes of each rank (0 loads in the training process).
    Each sample is drawn under its own seed, so random transforms do not depend on the
    number of workers, and resume is bit for bit."""
    pin_memory: bool = False
    """dataset: pinned host memory for batches copied to a CUDA device."""
    persistent_workers: bool = False
    """dataset: keep the DataLoader workers between evaluations (needs num_workers > 0)."""
    split: Split = "shard"
    """How replicas share the training set: `shard` (disjoint, deterministic from `seed`)
    or `full` (every replica sees all of it, in its own order)."""
    test_fraction: float = 0.2
    """digits, teacher, and a dataset whose `_target_` takes no `train` argument: fraction of
    the samples held out as the shared test set."""
    path: str = ""
    """file: path of a .npz holding X_train, y_train, X_test, y_test (see `task`)."""
    task: Task = "auto"
    """file: classification (integer labels 0..C-1, C >= 2) or regression (floating targets);
    auto tells them apart by the dtype of y_train and refuses what the dtype cannot settle
    (integer-valued targets: say data.task=regression)."""
    num_samples: int = 2000
    """teacher: number of samples generated (train and test together). Refused when the
    generated data (float64, on every process) exceed this machine's memory; so are
    input_dim and library_size."""
    input_dim: int = 1000
    """seed, teacher: input dimension."""
    num_outputs: int = 10
    """seed: target dimension; teacher: number of classes."""
    library_size: int = 640
    """seed: number of random (input, target) pairs in the library the replicas draw from."""
    fixed_batch: int = 64
    """seed: size of each replica's fixed batch, drawn with replacement from the library."""
    # ---- torchvision presets (replica_dist/vision.py; needs the `vision` extra)
    root: str = ""
    """imagefolder, cifar10, cifar100, mnist, fashionmnist: local directory the images are read
    from, never downloaded. imagefolder: train/<class>/ and val/<class>/ (or test/), the same
    class folders (at least 2); cifar10: cifar-10-batches-py/; cifar100: cifar-100-python/;
    mnist: MNIST/raw/; fashionmnist: FashionMNIST/raw/ (the layouts torchvision's download writes)."""
    augment: bool = True
    """vision presets: train-time random crop (crop_padding) and horizontal flip (flip); test
    images are never augmented. The loader seeds each sample's draw (see data.num_workers)."""
    crop_padding: int | None = None
    """vision presets: pad by this many pixels, then crop back to size at a random place; 0 turns
    it off; null: the preset's (4 for CIFAR and imagefolder, 2 for MNIST and FashionMNIST)."""
    flip: bool | None = None
    """vision presets: random horizontal flip; null: the preset's (off for mnist only)."""
    normalize: bool = True
    """vision presets: subtract mean and divide by std per channel after scaling pixels to [0, 1]."""
    mean: list[float] = field(default_factory=list)
    """vision presets: per-channel mean for normalize; empty: the preset's (the training set's
    statistics; ImageNet's for imagefolder)."""
    std: list[float] = field(default_factory=list)
    """vision presets: per-channel standard deviation for normalize; empty: the preset's."""
    image_size: int = 0
    """vision presets: resize the shorter side to this and center-crop a square (train and test);
    0 keeps the stored size (an imagefolder's images must then share one size)."""

    def __post_init__(self) -> None:
        if self._target_:
            self.name = "dataset"
        _check_choices(self, "data.")
        _check(
            not self._target_ or all(part.isidentifier() for part in self._target_.split(".")),
            f"data._target_ must be a dotted path pkg.module.Name; got {self._target_!r}",
        )
        _check(
            self.name != "dataset" or self._target_ != "",
            "data._target_ must be set for data.name=dataset (a pkg.module.DatasetClass)",
        )
        _check(self.num_workers >= 0, f"data.num_workers must be >= 0; got {self.num_workers}")
        _check(
            not self.persistent_workers or self.num_workers > 0,
            "data.persistent_workers needs data.num_workers > 0",
        )
        _check(0 < self.test_fraction < 1, f"data.test_fraction must be in (0, 1); got {self.test_fraction}")
        _check(self.name != "file" or self.path != "", "data.path must be set for data.name=file")
        for key in ("num_samples", "input_dim", "num_outputs", "library_size", "fixed_batch"):
            value = getattr(self, key)
            _check(value >= 1, f"data.{key} must be >= 1; got {value}")
        _check(
            self.name != "teacher" or self.num_outputs >= 2,
            f"data.num_outputs must be >= 2 classes for data.name=teacher; got {self.num_outputs}",
        )
        # torchvision presets: ranges here; the root and the channel count in replica_dist/vision.py
        _check(
            self.name not in VISION_DATA or self.root != "",
            f"data.root must be set for data.name={self.name}",
        )
        _check(
            self.crop_padding is None or self.crop_padding >= 0,
            f"data.crop_padding must be >= 0; got {self.crop_padding}",
        )
        _check(self.image_size >= 0, f"data.image_size must be >= 0; got {self.image_size}")
        _check(all(s > 0 for s in self.std), f"data.std must hold values > 0; got {list(self.std)}")


DEFAULT_ETA_FINAL = 0.4
"""Where the default eta schedule of tanh and linear ends, at the last step (docs/study.md)."""


@dataclass
class CouplingConfig:
    name: CouplingName = "tanh"
    """Coupling form. tanh: w += eta*tanh((mean - w)/T), the note's rule. linear:
    w += eta*(mean - w), elastic averaging. average: w = mean of the post-step weights
    (local SGD). none: independent replicas. ddp: DistributedDataParallel, one model.
    diloco: every `every` (= H) steps an outer SGD step with Nesterov momentum on the shared
    weights, along the replicas' mean pseudo-gradient (weights at the last sync minus now);
    every replica continues from the result (DiLoCo, arXiv 2311.08105)."""
    eta: float = 0.001
    """Coupling strength eta_0 (tanh, linear); for tanh it bounds the pull per weight and step
    (chosen by the study: docs/study.md)."""
    eta_growth: float | None = None
    """A schedule tied to steps, not to the run: eta_t = min(eta_max, eta_0 * (1 + g)^t), t
    counted in steps from 0; 0 gives a constant eta. Set it or coupling.eta_final, not both."""
    eta_final: float | None = None
    """eta at the last step (train.steps): eta grows geometrically from eta_0 at step 1 to
    eta_final at the last step, whatever the run's length. When neither this nor
    coupling.eta_growth is set, tanh and linear take min(0.4, coupling.eta_max): the shape the
    study chose (docs/study.md: 0.001 to 0.4), stated relative to the run so that any
    train.steps or train.epochs is coupled."""
    eta_max: float = 1.0
    """Cap of the scoped eta. For linear, above 1 the pull overshoots the mean."""
    temperature: float = 1.0
    """tanh only: T in tanh((mean - w)/T). Small T gives a sign-like, clipped pull."""
    every: int = 1
    """Couple on every k-th step, steps counted from 1 (chosen by the study: docs/study.md).
    For diloco the outer period H: one outer step every H inner steps."""
    via_optimizer: bool = False
    """tanh, linear: apply the pull as a gradient term (minus the pull, i.e. the gradient
    of the coupling potential), so momentum and weight decay see it (with SGD a parameter
    then moves by lr*pull; floating buffers, which no optimizer steps, still take the pull
    directly). Default: added to the weights directly after the optimizer step."""
    outer_lr: float = 0.7
    """diloco: the outer optimizer's learning rate (DiLoCo's 0.7). With outer_lr=1 and
    outer_momentum=0 the outer step lands on the replicas' mean: diloco is then average."""
    outer_momentum: float = 0.9
    """diloco: the outer optimizer's momentum, in [0, 1) (DiLoCo's 0.9)."""
    outer_nesterov: bool = True
    """diloco: Nesterov momentum for the outer step (DiLoCo's choice); false: heavy ball.
    Without momentum (outer_momentum=0) both are plain SGD."""
    fragments: int = 1
    """Split the model into this many fragments, contiguous groups of whole tensors of about
    equal size (in the order of named_parameters, then the floating buffers), each coupled
    every `every` steps on a staggered schedule: one fragment every every/fragments steps
    (Streaming DiLoCo), so each exchange carries about 1/fragments of the model. Must divide
    `every`, and be at most the model's number of tensors."""

    def __post_init__(self) -> None:
        _check_choices(self, "coupling.")
        _check(self.eta > 0, f"coupling.eta must be > 0; got {self.eta}")
        _check(
            self.eta_growth is None or self.eta_final is None,
            f"coupling.eta_growth={self.eta_growth} and coupling.eta_final={self.eta_final} both set the "
            f"eta schedule (per step, or relative to the run); drop one",
        )
        _check(
            self.eta_growth is None or self.eta_growth >= 0,
            f"coupling.eta_growth must be >= 0; got {self.eta_growth}",
        )
        _check(
            self.eta_max >= self.eta,
            f"coupling.eta_max must be >= coupling.eta ({self.eta}); got {self.eta_max}",
        )
        _check(
            self.name != "linear" or self.eta_max <= 1,
            f"coupling.eta_max must be <= 1 for coupling.name=linear (beyond 1 the pull "
            f"overshoots the mean); got {self.eta_max}",
        )
        _check(
            self.eta_final is None or 0 < self.eta_final <= self.eta_max,
            f"coupling.eta_final must be in (0, coupling.eta_max={self.eta_max}]; got {self.eta_final}",
        )
        _check(self.temperature > 0, f"coupling.temperature must be > 0; got {self.temperature}")
        _check(
            self.every >= 1 or self.name != "diloco",
            f"coupling.every (the outer period H of coupling.name=diloco) must be >= 1; got {self.every}",
        )
        _check(self.every >= 1, f"coupling.every must be >= 1; got {self.every}")
        _check(self.outer_lr > 0, f"coupling.outer_lr must be > 0; got {self.outer_lr}")
        _check(
            0 <= self.outer_momentum < 1,
            f"coupling.outer_momentum must be in [0, 1); got {self.outer_momentum}",
        )
        _check(
            not self.via_optimizer or self.name in ("tanh", "linear"),
            f"coupling.via_optimizer is only for coupling.name=tanh or linear; got {self.name}",
        )
        _check(self.fragments >= 1, f"coupling.fragments must be >= 1; got {self.fragments}")
        _check(
            self.fragments == 1 or self.name in ("tanh", "linear", "average", "diloco"),
            f"coupling.fragments is only for coupling.name=tanh, linear, average or diloco; got {self.name}",
        )
        _check(
            self.every % self.fragments == 0,
            f"coupling.fragments must divide coupling.every ({self.every}), so that each fragment "
            f"couples every {self.every} steps, one every every/fragments; got {self.fragments}",
        )

    @property
    def eta_end(self) -> float | None:
        """eta at the last step of a schedule relative to the run: coupling.eta_final, or, when
        neither it nor coupling.eta_growth is set, the default min(0.4, eta_max) (never below
        eta_0: a larger eta_0 stays constant); None for a schedule per step (eta_growth)."""
        if self.eta_final is not None:
            return self.eta_final
        if self.eta_growth is not None:
            return None
        return max(self.eta, min(DEFAULT_ETA_FINAL, self.eta_max))


@dataclass
class OptimConfig:
    name: OptimName = "sgd"
    """Optimizer: sgd (with momentum / nesterov / weight decay) or adam."""
    lr: float = 0.05
    """Learning rate."""
    momentum: float = 0.9
    """sgd: momentum factor."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 0.0
    """L2 weight decay (coupled, as in torch.optim)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adam: (beta1, beta2)."""
    schedule: Schedule = "constant"
    """Learning-rate schedule over the run's steps (t counted from 1, T = train.steps, W =
    warmup_steps): constant (lr); cosine (lr*t/W while t <= W, then from lr down to min_lr by
    a half cosine, min_lr at step T); step (lr*t/W while t <= W, then lr*gamma^floor((t-W-1)
    /step_size)). Logged every step as optim/lr."""
    warmup_steps: int = 0
    """Steps of linear warmup (lr*t/W at step t), for every schedule; must be < train.steps."""
    min_lr: float = 0.0
    """cosine: the learning rate at the last step (<= optim.lr)."""
    step_size: int = 100
    """step: steps between two decays by gamma."""
    gamma: float = 0.1
    """step: factor of each decay."""
    clip_norm: float = 0.0
    """Clip each replica's gradients to this global L2 norm (all parameters together) after
    the backward pass, before the optimizer step and the coupling's pull; 0: no clipping."""
    label_smoothing: float = 0.0
    """Classification only: cross-entropy against targets smoothed by this much, in [0, 1)."""

    def __post_init__(self) -> None:
        _check_choices(self, "optim.")
        _check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        _check(
            0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}]; got {self.min_lr}"
        )
        _check(self.step_size >= 1, f"optim.step_size must be >= 1; got {self.step_size}")
        _check(0 < self.gamma <= 1, f"optim.gamma must be in (0, 1]; got {self.gamma}")
        _check(self.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0: off); got {self.clip_norm}")
        _check(
            0 <= self.label_smoothing < 1,
            f"optim.label_smoothing must be in [0, 1); got {self.label_smoothing}",
        )
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1); got {self.momentum}")
        _check(
            not self.nesterov or self.momentum > 0,
            "optim.nesterov needs optim.momentum > 0",
        )
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1); got {list(self.betas)}",
        )


@dataclass
class TrainConfig:
    steps: int = 1500
    """Optimizer steps taken by every replica."""
    batch_size: int = 32
    """Minibatch size of each rank: of each replica, or with parallel.dp=D of each of its D
    ranks (a shard smaller than this is used whole)."""
    dtype: Dtype = "float32"
    """Floating-point type of weights and data."""
    epochs: int = 0
    """If > 0, the run's length in passes over the data, in place of train.steps (setting both
    is refused): train.steps becomes epochs * floor(shard / batch_size) // grad_accum optimizer
    steps (at least 1), with `shard` the smallest training shard of any rank, so that every
    rank takes the same number of steps and no rank's pass is cut short by a partial batch."""
    grad_accum: int = 1
    """Micro-batches of train.batch_size per optimizer step, each loss scaled by 1/grad_accum
    (the gradient of one batch of grad_accum*batch_size); with DDP only the last one
    all-reduces its gradients."""
    precision: Precision = "fp32"
    """Forward pass and loss under autocast: fp32 (none), bf16 (CPU and CUDA), fp16 (CUDA only,
    with a gradient scaler: a step whose scaled gradients overflow applies no optimizer update
    on that replica, its pull still applies, and the scale is lowered; it is not a non-finite
    value for the guard). Weights, gradients and the coupling stay in train.dtype."""
    compile: bool = False
    """Run the forward pass through torch.compile (the first steps compile; needs a C compiler)."""
    init_from: str = ""
    """Warm start: a new run's initial weights from PATH instead of from the seed. A checkpoint
    folder (checkpoints/step-N) or a run directory (its final weights if it finished, else its
    newest checkpoint): every replica from its own saved replica (the same number of replicas);
    a weights file (weights/center.pt, weights/replica_<r>.pt): every replica from it. Only the
    weights and buffers: the optimizer, the lr schedule and the data order start fresh at step
    0. Ignored when the run resumes from its own checkpoint. '' (default): from the seed."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1; got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1; got {self.batch_size}")
        _check(self.epochs >= 0, f"train.epochs must be >= 0 (0: use train.steps); got {self.epochs}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1; got {self.grad_accum}")
        _check(
            not self.init_from or os.path.exists(self.init_from),
            f"train.init_from={self.init_from}: no such file or directory (a checkpoint folder, "
            f"a run directory or a weights file)",
        )
        _check_choices(self, "train.")


RESUMABLE_KEYS: tuple[str, ...] = (
    "train.steps",
    "train.epochs",
    "train.init_from",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr",
    "optim.step_size",
    "optim.gamma",
    "coupling.eta*",
    "log.*",
    "eval.every",
    "checkpoint.*",
    "guard.*",
    "dist.timeout_s",
    "flatness.*",
)
"""The keys (fnmatch patterns of dotted keys) that may change when a run resumes: the learning
rate and its schedule, the coupling's eta schedule, the run's length (raised on a finished run,
it extends it), how often to log, evaluate and save, the guard's policy, how long to wait for a
collective, and the end-of-run flatness analysis. The run goes on from its checkpoint under the
new values (each change is logged); any other change is refused, naming the key."""


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted config `key` may differ from the saved config when a run resumes."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


@dataclass
class LogConfig:
    every: int = 20
    """Per-layer statistics and TensorBoard scalars on step 1, every k-th step and the last."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"log.every must be >= 1; got {self.every}")


@dataclass
class EvalConfig:
    every: int = 100
    """Test-set evaluation of replicas, center and ensemble every k steps and at the end."""
    batch_size: int = 1024
    """Samples per forward pass in evaluation: it streams over the training and test sets,
    so no dataset has to fit in memory at once."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"eval.every must be >= 1; got {self.every}")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1; got {self.batch_size}")


@dataclass
class GuardConfig:
    nonfinite: Nonfinite = "stop"
    """When a replica's loss, a gradient or a BatchNorm statistic is NaN or inf: `stop` (every
    rank stops with one error naming the replica and the step) or `skip` (that step is skipped
    by every replica when it communicates before its update, else by the replica that saw it;
    counted in guard/skipped_steps). Either way no non-finite update is applied; see guard.py."""
    max_consecutive_skips: int = 20
    """skip: stop when a replica has not applied this many steps in a row (checked at the next
    step that communicates: at once for coupling every step, within log.every steps for none
    and ddp)."""

    def __post_init__(self) -> None:
        _check_choices(self, "guard.")
        _check(
            self.max_consecutive_skips >= 1,
            f"guard.max_consecutive_skips must be >= 1; got {self.max_consecutive_skips}",
        )


@dataclass
class CheckpointConfig:
    every: int = 250
    """Every replica saves its whole state every k steps into <run_dir>/checkpoints/ (0: never)."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Continue from the newest complete checkpoint in the run directory, if there is one."""
    remap: bool = False
    """Allow resuming with another number of replicas: replica r that existed continues from
    its own weights and optimizer state; a new replica starts from the mean of the saved
    replicas with a fresh optimizer; surplus replicas are dropped. Shards are re-derived for
    the new number of replicas, so every replica's data order starts anew."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every must be >= 0 (0 disables); got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1; got {self.keep}")


@dataclass
class FlatnessConfig:
    sigmas: list[float] = field(default_factory=list)
    """Relative noise levels at which the local energy of the center and of every replica is
    measured at the end of training (empty: skip; `python -m replica_dist.flatness RUN_DIR`
    does the same afterwards)."""
    samples: int = 20
    """Draws of the noise per sigma (>= 2, for a standard error)."""

    def __post_init__(self) -> None:
        _check(
            all(math.isfinite(s) and s >= 0 for s in self.sigmas),
            f"flatness.sigmas must be finite and >= 0; got {list(self.sigmas)}",
        )
        _check(self.samples >= 2, f"flatness.samples must be >= 2; got {self.samples}")


TIMEOUT_MAX_S = 30 * 24 * 3600
BUCKET_MAX_MB = 2**20


@dataclass
class DistConfig:
    backend: Backend = "auto"
    """Process-group backend: auto (nccl with CUDA, else gloo), gloo or nccl."""
    device: Device = "auto"
    """auto (cuda:LOCAL_RANK when CUDA is available, else cpu), cpu or cuda."""
    timeout_s: float = 300.0
    """Seconds a collective may wait for the other ranks before failing; at most 2592000
    (30 days: longer means a hung job, and far larger values overflow the process group's
    timer)."""
    overlap: bool = True
    """Start the coupling all_reduce of the pre-step weights before the forward pass and wait
    for it only when the pull is applied, so communication runs behind forward and backward.
    Same weights as false (synchronous: all_reduce after backward); what differs is when a
    non-finite value is agreed on: one step later, so with guard.nonfinite=skip only the
    replica that saw it skips that step (see guard.py). Forms that never pull (average,
    none, ddp) are unaffected."""
    bucket_mb: float = 25.0
    """The coupling buffer is reduced in buckets of at most this many MiB, each its own
    all_reduce, all in flight together (25 is DDP's default bucket size); at most 1048576
    (1 TiB, more than any coupling buffer: a larger bucket is one bucket all the same)."""
    compress: Compression = "none"
    """How the coupling exchange (tanh, linear, average, diloco) sends the weights: none (the buffer's
    float type), bf16 (2 bytes a weight) or int8 (1 byte a weight, plus one float32 scale per
    dist.compress_chunk weights, agreed on by all ranks: the chunk's largest |w| / 127). The
    ranks all_gather the compressed weights and each adds them up in the buffer's dtype, in
    replica order, so every rank gets the same mean; the guard's words stay exact. Round
    trip error: int8 at most half a step (scale/2) per weight. See dist.ReplicaExchange.
    Not for coupling.name=ddp, whose gradients travel in DDP's own all_reduce."""
    compress_chunk: int = 1024
    """int8: weights per scale. Smaller chunks follow the weights' magnitudes more closely
    (smaller steps) and send more scales (4 bytes per chunk, about 0.4% at 1024)."""
    error_feedback: bool = False
    """With dist.compress: each rank adds what rounding took off its last send to its next
    one (the residual, kept per rank and checkpointed), so errors do not persist in one
    direction; the sum of what a replica sends equals the sum of its weights up to the last
    residual."""

    def __post_init__(self) -> None:
        _check_choices(self, "dist.")
        _check(self.compress_chunk >= 1, f"dist.compress_chunk must be >= 1; got {self.compress_chunk}")
        _check(
            not self.error_feedback or self.compress != "none",
            "dist.error_feedback needs compression: set dist.compress=bf16 or int8, or drop dist.error_feedback",
        )
        _check(
            0 < self.timeout_s <= TIMEOUT_MAX_S,
            f"dist.timeout_s must be in (0, {TIMEOUT_MAX_S}] seconds; got {self.timeout_s}",
        )
        _check(
            0 < self.bucket_mb <= BUCKET_MAX_MB,
            f"dist.bucket_mb must be in (0, {BUCKET_MAX_MB}] MiB; got {self.bucket_mb}",
        )


@dataclass
class ParallelConfig:
    dp: int = 1
    """Ranks per replica. The world is a replicas x dp mesh (world size = replicas * dp, rank
    = replica * dp + dp index): each replica is data parallel (DDP) over its dp ranks, each
    with its own part of the replica's shard and its own train.batch_size minibatch; the
    coupling all_reduce runs across replicas, among the ranks with the same dp index."""

    def __post_init__(self) -> None:
        _check(self.dp >= 1, f"parallel.dp must be >= 1; got {self.dp}")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    coupling: CouplingConfig = field(default_factory=CouplingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    flatness: FlatnessConfig = field(default_factory=FlatnessConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    seed: int = 0
    """Seeds data generation, the split and shards, and (with the rank) init and batch order."""
    init: Init = "independent"
    """independent: each replica initialised from its own seed (as in the note);
    same: rank 0's initial weights broadcast to all."""

    def __post_init__(self) -> None:
        _check_choices(self, "")
        _check(self.seed >= 0, f"seed must be >= 0; got {self.seed}")
        _check(
            not (self.checkpoint.remap and self.coupling.name == "ddp"),
            "checkpoint.remap is not available for coupling.name=ddp (its replicas must stay identical)",
        )
        _check(
            not (self.checkpoint.remap and self.coupling.name == "diloco"),
            "checkpoint.remap is not available for coupling.name=diloco (its outer state, the weights at "
            "the last sync and their momentum, belongs to the replicas that saved it)",
        )
        _check(
            self.parallel.dp == 1 or self.coupling.name != "ddp",
            "parallel.dp must be 1 for coupling.name=ddp (ddp is data parallel over the whole world already)",
        )
        _check(
            self.dist.compress == "none" or self.coupling.name != "ddp",
            "dist.compress applies to the coupling exchange; coupling.name=ddp averages gradients in "
            "DDP's own all_reduce: use dist.compress=none",
        )
        _check(
            self.parallel.dp == 1 or not self.checkpoint.remap,
            "checkpoint.remap is not available with parallel.dp > 1",
        )
        if self.train.epochs == 0:  # else once train.epochs has set train.steps (replica_dist.recipe)
            self.check_run_length()
        regression = self.data.name == "seed" or (self.data.name == "file" and self.data.task == "regression")
        _check(
            self.optim.label_smoothing == 0 or not regression,
            f"optim.label_smoothing is for classification only; data.name={self.data.name} is a regression",
        )

    def check_run_length(self) -> None:
        """What must fit in the run's train.steps."""
        steps = f"train.steps ({self.train.steps}" + (
            f", from train.epochs={self.train.epochs})" if self.train.epochs else ")"
        )
        _check(
            self.optim.warmup_steps < self.train.steps,
            f"optim.warmup_steps must be < {steps}; got {self.optim.warmup_steps}",
        )


def register_configs() -> None:
    """Register the schema under `base_config`; conf/ holds the YAML options of each group,
    which Hydra merges into this typed schema (so a wrong key or type fails there)."""
    ConfigStore.instance().store(name="base_config", node=Config)


# An installed wheel carries the configs inside the package (pyproject maps replica_dist.conf to
# conf/); a checkout, run in place or installed editable, keeps them at its top level.
_PACKAGED_CONF = Path(__file__).resolve().parent / "conf"
CONF_DIR = (
    _PACKAGED_CONF if (_PACKAGED_CONF / "config.yaml").is_file() else _PACKAGED_CONF.parent.parent / "conf"
)


def _one_line(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, folded to their informative lines."""
    lines = []
    for part in (err, err.__cause__):
        for line in str(part or "").splitlines():
            line = line.strip()
            if line.startswith(("Config search path", "provider=", "reference_type", "object_type")):
                continue
            if line and line not in lines:
                lines.append(line)
    return " ".join(lines)


# ---- checks that need the overrides as the user wrote them, or the machine

APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.batch_norm": ("model", ("cnn",)),
    "data.split": ("data", ("digits", "teacher", "file", "dataset", *VISION_DATA)),
    "data.test_fraction": ("data", ("digits", "teacher", "dataset")),
    "data.path": ("data", ("file",)),
    "data.task": ("data", ("file", "dataset")),
    "data.kwargs": ("data", ("dataset",)),
    "data.num_workers": ("data", ("dataset", *VISION_DATA)),
    "data.pin_memory": ("data", ("dataset", *VISION_DATA)),
    "data.persistent_workers": ("data", ("dataset", *VISION_DATA)),
    "data.num_samples": ("data", ("teacher",)),
    "data.input_dim": ("data", ("seed", "teacher")),
    "data.num_outputs": ("data", ("seed", "teacher")),
    "data.library_size": ("data", ("seed",)),
    "data.fixed_batch": ("data", ("seed",)),
    **{f"data.{key}": ("data", VISION_DATA) for key in _VISION_KEYS},
    "coupling.eta": ("coupling", ("tanh", "linear")),
    "coupling.eta_growth": ("coupling", ("tanh", "linear")),
    "coupling.eta_final": ("coupling", ("tanh", "linear")),
    "coupling.eta_max": ("coupling", ("tanh", "linear")),
    "coupling.temperature": ("coupling", ("tanh",)),
    "coupling.every": ("coupling", ("tanh", "linear", "average", "diloco")),
    "coupling.via_optimizer": ("coupling", ("tanh", "linear")),
    "coupling.outer_lr": ("coupling", ("diloco",)),
    "coupling.outer_momentum": ("coupling", ("diloco",)),
    "coupling.outer_nesterov": ("coupling", ("diloco",)),
    "coupling.fragments": ("coupling", ("tanh", "linear", "average", "diloco")),
    "optim.momentum": ("optim", ("sgd",)),
    "optim.nesterov": ("optim", ("sgd",)),
    "optim.betas": ("optim", ("adam",)),
    "optim.min_lr": ("optim.schedule", ("cosine",)),
    "optim.step_size": ("optim.schedule", ("step",)),
    "optim.gamma": ("optim.schedule", ("step",)),
    "guard.max_consecutive_skips": ("guard.nonfinite", ("skip",)),
    "dist.compress_chunk": ("dist.compress", ("int8",)),
}
"""Keys that mean something only for some choices of a group (its `name`) or of another key,
from the field docstrings. Setting one on the command line for another choice is refused:
it would be ignored silently (data.path without data=file trains on digits). Values that
group options or +experiment=note bring along are not checked. dist.overlap is not here:
with average, none or ddp it is harmless (same result), and tests check exactly that."""

_INT64_MAX = 2**63 - 1
_GROUPS = ("model", "data", "coupling", "optim")
"""Groups whose option is one choice (experiment is added with +experiment=NAME)."""


def _schema(cls: type | None = None, prefix: str = "") -> dict[str, tuple[str, object, type]]:
    """Every leaf key: (annotation as written, default, the dataclass that declares it)."""
    cls = cls or Config
    leaves = {}
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            leaves |= _schema(type(default), f"{prefix}{f.name}.")
        else:
            leaves[prefix + f.name] = (str(f.type), default, cls)
    return leaves


def _parse_overrides(overrides: list[str]) -> list:
    """Hydra's parse of each override; an unparsable one is named in full."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, parsed = OverridesParser.create(), []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as err:
            message = " ".join(line for line in str(err).splitlines() if not line.startswith("See https"))
            message = message.removeprefix(f"Error parsing override '{text}' ").strip()
            raise ConfigError(f"cannot parse override {text!r}: {message}") from None
        if not override.key_or_group:
            raise ConfigError(f"cannot parse override {text!r}: no key before '='")
        parsed.append(override)
    return parsed


def _check_override_values(parsed: list, schema: dict) -> None:
    """What Hydra would convert silently (2 or yes to a bool, a list of options to one group) or
    refuse in a long message (a float for an integer)."""
    for override in parsed:
        if override.is_delete() or override.is_hydra_override() or override.is_sweep_override():
            continue
        key, value = override.key_or_group, override.value()
        if key in _GROUPS and override.package is None and not isinstance(value, str):
            raise ConfigError(f"{key} takes one option; got {override.input_line!r}")
        declared = schema.get(key, ("",))[0]
        is_interpolation = isinstance(value, str) and "${" in value
        if (
            declared.removesuffix(" | None") == "bool"
            and not isinstance(value, bool | None)
            and not is_interpolation
        ):
            raise ConfigError(f"{key} must be true or false; got {override.input_line!r}")
        items = value if declared == "list[int]" and isinstance(value, list) else [value]
        if declared in ("int", "int | None", "list[int]") and any(isinstance(item, float) for item in items):
            kind = "hold integers" if declared == "list[int]" else "be an integer"
            raise ConfigError(f"{key} must {kind}; got {override.input_line!r}")


def _check_known_keys(node: dict, cls: type, prefix: str = "") -> None:
    """The composed config against the schema: a key `+` or `++` added that no dataclass has."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, value in node.items():
        key = prefix + str(name)
        if name not in fields:
            valid = [prefix + f for f in fields] if prefix else list(_schema()) + list(fields)
            near = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            raise ConfigError(f"unknown key {key}{hint}; `python -m replica_dist.train --help` lists them")
        default = (
            fields[name].default_factory()
            if fields[name].default_factory is not dataclasses.MISSING
            else None
        )
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            _check_known_keys(value, type(default), key + ".")


def _check_unknown_override(hydra_message: str) -> None:
    """Hydra refuses a key the schema lacks (`optim.lrr=0.1`) by telling how to add it with `+`;
    say instead what any unknown key gets: its nearest known key."""
    found = re.match(r"Could not override '([\w.]+)'", hydra_message)
    if found:
        nested: dict = {}
        *parents, leaf = found.group(1).split(".")
        leaf_parent = functools.reduce(lambda node, part: node.setdefault(part, {}), parents, nested)
        leaf_parent[leaf] = None
        _check_known_keys(nested, Config)


def _route_model_arguments(parsed: list) -> tuple[list[str], dict[str, str]]:
    """The overrides, with each argument of a model._target_ moved to model.kwargs: `model.KEY=V`
    for a KEY the schema lacks becomes `++model.kwargs.KEY=V` (set or add; `+` and `~` keep
    theirs), and so do `model.kwargs.KEY=V` and `model.kwargs={...}`. Hydra's schema holds no
    such key, so only `++` would reach it. Also returns, by argument, the key as typed: without
    a model._target_ such a key is reported as the unknown key it then is."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"kwargs"}
    routed, typed = [], {}
    for override in parsed:
        key, text = override.key_or_group, override.input_line
        parts = key.split(".")
        if override.package is not None or len(parts) < 2 or parts[0] != "model" or parts[1] in model_fields:
            routed.append(text)
            continue
        prefix = text[: len(text) - len(text.lstrip("~+"))]
        if key == "model.kwargs":  # a whole dict: merged into the (empty, hence closed) default
            routed.append(f"{prefix or '++'}{text[len(prefix) :]}")
            continue
        argument = key.removeprefix("model.kwargs.") if parts[1] == "kwargs" else key.removeprefix("model.")
        typed.setdefault(argument.split(".")[0], key)
        rest = text[text.index(key, len(prefix)) + len(key) :]
        routed.append(f"{prefix or '++'}model.kwargs.{argument}{rest}")
    return routed, typed


def _check_model_extras(model: dict, typed: dict[str, str]) -> None:
    """Model arguments need a model._target_; without one, a key routed from `model.KEY` is an
    unknown key of the schema (a typo of a preset key, most likely)."""
    extras = model.get("kwargs") or {}
    if model.get("_target_") or not extras:
        return
    first = next(iter(extras))
    if not typed.get(first, "model.kwargs.").startswith("model.kwargs."):
        _check_known_keys({"model": {first: None}}, Config)
    raise ConfigError(
        f"model.kwargs.{first} is an argument of a model chosen by model._target_, which is not set"
    )


def _check_model_target(cfg: Config, parsed: list) -> None:
    """With model._target_: no preset key on the command line (it would be ignored), a target
    that imports, and arguments its signature accepts (the data's `num_classes`/`num_outputs`
    counted as given). Building it waits for the data, in replica_dist.model."""
    m = cfg.model
    if not m._target_:
        return
    for override in parsed:
        key = override.key_or_group
        if override.is_delete() or override.package is not None or override.is_hydra_override():
            continue
        if key == "model" and override.value() in CHOICES["ModelName"]:
            raise ConfigError(
                f"model={override.value()} is a preset and model._target_={m._target_} replaces it; "
                f"drop model={override.value()}"
            )
        parts = key.split(".")
        if parts[0] == "model" and len(parts) == 2 and parts[1] in MODEL_PRESET_KEYS:
            raise ConfigError(
                f"{key} is only used with the presets model=mlp or cnn, not with "
                f"model._target_={m._target_} (drop it; an argument of the target by that name "
                f"is model.kwargs.{parts[1]}=VALUE)"
            )
    target = locate_target("model._target_", m._target_, "a model")
    signature = model_signature(target)
    if signature is None:
        return
    filled = {n: 1 for n in MODEL_DATA_ARGUMENTS if n in signature.parameters and n not in m.kwargs}
    try:
        signature.bind(**m.kwargs, **filled)
    except TypeError as err:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
        shown = " ".join(str(bare).split())
        raise ConfigError(f"model._target_={m._target_}: {err}; its signature is {shown}") from None


def _check_numbers(obj: object, prefix: str = "") -> None:
    """Every float finite and every integer within int64 (torch and numpy count in int64)."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            _check_numbers(value, key + ".")
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float):
                _check(math.isfinite(item), f"{key} must be finite; got {value}")
            elif isinstance(item, int) and not isinstance(item, bool):
                _check(abs(item) <= _INT64_MAX, f"{key} must be at most 2**63-1; got {value}")


def _check_applies(cfg: Config, parsed: list) -> None:
    """A key set on the command line must matter for the chosen option of its group."""
    for override in parsed:
        key = override.key_or_group
        if key not in APPLIES_TO or override.is_delete():
            continue
        selector, choices = APPLIES_TO[key]
        path = selector if "." in selector else f"{selector}.name"
        chosen = functools.reduce(getattr, path.split("."), cfg)
        if chosen not in choices:
            wanted = " or ".join(", ".join(choices).rsplit(", ", 1))
            raise ConfigError(
                f"{key} is only used with {selector}={wanted}; got {selector}={chosen} "
                f"(choose {selector}={choices[0]} or drop {key})"
            )


def _check_length_set_once(cfg: Config, parsed: list) -> None:
    """train.epochs replaces train.steps: both on the command line would leave one ignored."""
    keys = {override.key_or_group for override in parsed if not override.is_delete()}
    _check(
        not (cfg.train.epochs > 0 and "train.steps" in keys),
        f"train.steps and train.epochs={cfg.train.epochs} both set the run's length; drop one",
    )


def _physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _data_shape(cfg: Config) -> tuple[tuple[int, ...], int]:
    """Sample shape and number of outputs the data will have; for a file, whose arrays are read
    only later, the smallest possible (one input, one output), so estimates stay lower bounds."""
    d = cfg.data
    if d.name == "digits":
        return (1, 8, 8), 10
    if d.name in ("seed", "teacher"):
        return (d.input_dim,), d.num_outputs
    return (1, 1, 1) if cfg.model.name == "cnn" else (1,), 1


def parameter_count(cfg: Config) -> int | None:
    """Weights (and biases, BatchNorm affine parameters) of the model the config builds,
    counted as replica_dist.model builds them; None for a model._target_, unknown until built."""
    m = cfg.model
    if m._target_:
        return None
    shape, outputs = _data_shape(cfg)
    if m.name == "cnn":
        channels = [shape[0], *m.hidden]
        count = sum(9 * a * b + b * m.bias + 2 * b * m.batch_norm for a, b in zip(channels, channels[1:]))
        return count + 4 * channels[-1] * outputs + outputs * m.bias
    widths = [math.prod(shape), *m.hidden, outputs]
    return sum(a * b + b * m.bias for a, b in zip(widths, widths[1:]))


def generated_data_bytes(cfg: Config) -> int:
    """Bytes of the float64 arrays replica_dist.data generates (0 for digits and file, which
    are not generated: digits is 1797 samples of 64 pixels)."""
    d = cfg.data
    if d.name == "teacher":
        hidden = 4 * d.num_outputs
        return 8 * (d.num_samples * d.input_dim + d.input_dim * hidden + d.num_samples * hidden)
    if d.name == "seed":
        return 8 * d.library_size * (d.input_dim + d.num_outputs)
    return 0


def _check_memory(cfg: Config) -> None:
    """Refuse sizes that cannot fit: every process on this node (torchrun's LOCAL_WORLD_SIZE)
    generates the whole dataset and holds its model's weights and gradients at least, so
    either alone above the machine's physical memory would end in an allocation error."""
    memory = _physical_memory_bytes()
    if memory is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    gib = 2**30
    where = f"this machine's {memory / gib:.1f} GiB of memory" + (
        f" shared by {processes} processes" if processes > 1 else ""
    )
    data_bytes = generated_data_bytes(cfg)
    if data_bytes * processes > memory:
        d = cfg.data
        sizes = (
            f"data.num_samples={d.num_samples}, data.input_dim={d.input_dim}"
            if d.name == "teacher"
            else f"data.library_size={d.library_size}, data.input_dim={d.input_dim}"
        )
        raise ConfigError(
            f"{sizes} generate {data_bytes / gib:.3g} GiB of data per process (data={d.name}), "
            f"more than {where}"
        )
    itemsize = 8 if cfg.train.dtype == "float64" else 4
    count = parameter_count(cfg)
    if count is not None and 2 * count * itemsize * processes > memory:
        inputs = "" if cfg.data.name in ("digits", "file") else f", data.input_dim={cfg.data.input_dim}"
        raise ConfigError(
            f"model.hidden={list(cfg.model.hidden)}{inputs} gives a {cfg.model.name} of {count:.3g} "
            f"weights: at least {2 * count * itemsize / gib:.3g} GiB per process for weights and "
            f"gradients ({cfg.train.dtype}), more than {where}"
        )


def load_config(overrides: list[str]) -> tuple[Config, Path]:
    """The validated config and the run directory, from command-line overrides.

    Beyond Hydra's own checks (types, unknown group options) and each dataclass's
    `__post_init__` (ranges), every problem below is one ConfigError naming the key or the
    override: an override that does not parse; a key that `+`/`++` adds outside the schema;
    a bool given anything but true or false; a non-finite float or an integer beyond int64;
    a key set for a group option that ignores it (APPLIES_TO); a model._target_ that does not
    import, takes other arguments or comes with preset keys; sizes whose dataset or model
    cannot fit in this machine's memory."""
    register_configs()
    schema = _schema()
    parsed = _parse_overrides(overrides)
    _check_override_values(parsed, schema)
    routed, typed = _route_model_arguments(parsed)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="train"):
            dict_cfg = compose("config", overrides=routed, return_hydra_config=True)
        run_dir = Path(dict_cfg.hydra.run.dir)
        with open_dict(dict_cfg):
            del dict_cfg["hydra"]
        container = OmegaConf.to_container(dict_cfg, resolve=False)
        _check_known_keys(container, Config)
        _check_model_extras(container["model"], typed)
        cfg = OmegaConf.to_object(dict_cfg)
    except ConfigError:
        raise
    except (HydraException, OmegaConfBaseException) as err:
        _check_unknown_override(str(err))
        raise ConfigError(_one_line(err)) from None
    except (ValueError, TypeError) as err:  # Hydra's own, for overrides its grammar lets through
        raise ConfigError(f"cannot apply overrides {' '.join(overrides)!r}: {_one_line(err)}") from None
    _check_numbers(cfg)
    _check_model_target(cfg, parsed)  # first: with a target, every preset key is the problem
    _check_applies(cfg, parsed)
    _check_length_set_once(cfg, parsed)
    _check_memory(cfg)
    if cfg.data.name in VISION_DATA:  # torchvision and the root's layout, before anything is written
        from replica_dist.vision import check_root

        check_root(cfg.data)
    return cfg, run_dir


# ---- --help


def _field_docs() -> dict[str, dict[str, str]]:
    """Attribute docstrings (the string literal under a field) of every dataclass here, read
    from this module's source: class name -> field -> docstring, whitespace folded."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    docs: dict[str, dict[str, str]] = {}
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef)):
        body = cls.body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs.setdefault(cls.name, {})[stmt.target.id] = " ".join(after.value.value.split())
    return docs


def help_text() -> str:
    """The config groups with their options (conf/), then every key with its type (for a choice,
    its values), default, the choices it applies to (APPLIES_TO) and its docstring."""
    lines = ["Config groups (GROUP=OPTION; +experiment=OPTION adds a preset on top):"]
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))["defaults"]
    chosen = {k: v for entry in defaults if isinstance(entry, dict) for k, v in entry.items()}
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir()):
        options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
        default = f" (default {chosen[group.name]})" if group.name in chosen else ""
        lines.append(f"  {group.name}: {options}{default}")
    lines += ["", "Keys (KEY=VALUE; a group option may set other values than these defaults):"]
    docs = _field_docs()
    for key, (annotation, default, cls) in _schema().items():
        shown = "''" if default == "" else ("null" if default is None else default)
        if isinstance(shown, bool):
            shown = str(shown).lower()
        scope = ""
        if key in APPLIES_TO:
            selector, choices = APPLIES_TO[key]
            scope = f", {selector}={'|'.join(choices)} only"
        doc = docs.get(cls.__name__, {}).get(key.rsplit(".", 1)[-1], "")
        kind = "|".join(CHOICES[annotation]) if annotation in CHOICES else annotation
        # The head (key, type, default, the doc's first word) stays on one line however long, so
        # `KEY (TYPE, default` can be found with a grep: textwrap does not break at no-break spaces.
        first, _, rest = doc.partition(" ")
        head = f"{key} ({kind}, default {shown}{scope}): {first}".replace(" ", "\xa0")
        text = textwrap.fill(
            f"{head} {rest}",
            width=100,
            initial_indent="  ",
            subsequent_indent="      ",
            break_long_words=False,
        )
        lines.append(text.replace("\xa0", " "))
    return "\n".join(lines)
