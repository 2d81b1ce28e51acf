"""The schema of what is trained on what: model.* and data.*."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from replica_dist.config.checks import Activation, DataName, ModelName, Split, Task, _check, _check_choices
from replica_dist.data_names import VISION_DATA


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


# The keys only the torchvision presets (VISION_DATA, replica_dist/vision.py) read.
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
