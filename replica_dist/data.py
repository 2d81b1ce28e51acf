"""Datasets (built in or generated; nothing is downloaded): whole in memory (load_dataset) or
map-style, read through a DataLoader (build_datasets). Each replica's share of them and its
order: replica_dist.batches.

Everything here is a deterministic function of the config, the seed and the replica's rank,
so a single process can rebuild exactly the data every replica of a distributed run saw.
"""

from __future__ import annotations

import gzip
import importlib.util
import inspect
import logging
import os
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset, TensorDataset

from replica_dist import streams, vision
from replica_dist.batches import (  # noqa: F401 (their home is batches.py; callers may import them from here)
    EpochOrder,
    LoaderBatches,
    ReplicaBatches,
    ReplicaSampler,
    rank_indices,
    replica_indices,
)
from replica_dist.data_names import VISION_DATA
from replica_dist.errors import ConfigError, one_line
from replica_dist.model import check_input_shape
from replica_dist.targets import locate_target

if TYPE_CHECKING:
    from replica_dist.config import DataConfig, ModelConfig

log = logging.getLogger(__name__)


@dataclass
class Dataset:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    """classification (integer labels) or regression (float targets)."""
    loss: str
    """cross_entropy, mse (mean squared error) or sse (summed squared error, as in the note)."""
    num_outputs: int
    source: str = "the data"
    """Where the arrays came from, as the user set it: `data.path ...` or `data.name=...`."""

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def check_model(self, cfg: ModelConfig) -> None:
        """Refuse, naming the model and the data, a network that cannot take these inputs."""
        check_input_shape(
            cfg, self.input_shape, f"X_train of {self.source} has shape {tuple(self.x_train.shape)}"
        )


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    order = streams.rng(seed, streams.SPLIT).permutation(len(x))
    num_test = max(1, int(round(test_fraction * len(x))))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def _digits(cfg: DataConfig, seed: int):
    images, target = load_digits()
    x = (images / 16.0).reshape(-1, *DIGITS_SHAPE)  # pixels in [0, 1]
    return (*_split(x, target, cfg.test_fraction, seed), "classification", "cross_entropy")


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits: 1797 images of 8 x 8 pixels in 0..16 and their labels 0..9, read
    from the file scikit-learn ships the way its load_digits reads it, but without importing
    scikit-learn, which costs every process about 2 s (tests/test_data.py compares the two)."""
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():  # a scikit-learn laid out otherwise: ask it
        from sklearn.datasets import load_digits as sklearn_load_digits

        digits = sklearn_load_digits()
        return digits.images, digits.target
    with gzip.open(path, mode="rt", encoding="utf-8") as rows:
        data = np.loadtxt(rows, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _teacher_width(num_outputs: int) -> int:
    """Hidden units of the teacher network that labels data.name=teacher."""
    return 4 * num_outputs


def _teacher(cfg: DataConfig, seed: int):
    rng = streams.rng(seed, streams.TEACHER)
    x = rng.standard_normal((cfg.num_samples, cfg.input_dim))
    hidden = _teacher_width(cfg.num_outputs)
    w1 = rng.standard_normal((cfg.input_dim, hidden)) / np.sqrt(cfg.input_dim)
    w2 = rng.standard_normal((hidden, cfg.num_outputs)) / np.sqrt(hidden)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return (*_split(x, y, cfg.test_fraction, seed), "classification", "cross_entropy")


def _seed_library(cfg: DataConfig, seed: int):
    rng = streams.rng(seed, streams.SEED_LIBRARY)
    x = rng.standard_normal((cfg.library_size, cfg.input_dim))
    y = rng.standard_normal((cfg.library_size, cfg.num_outputs))
    # The library is both what replicas draw their fixed batches from and the shared test set.
    return x, y, x, y, "regression", "sse"


DIGITS_SHAPE = (1, 8, 8)
"""One digits sample: a single channel of 8 x 8 pixels."""
DIGITS_CLASSES = 10


def generated_shape(cfg: DataConfig) -> tuple[tuple[int, ...], int] | None:
    """Sample shape and number of outputs of the data generated here (digits, seed, teacher),
    known from the config before anything is generated; None for data read later."""
    if cfg.name == "digits":
        return DIGITS_SHAPE, DIGITS_CLASSES
    if cfg.name in ("seed", "teacher"):
        return (cfg.input_dim,), cfg.num_outputs
    return None


def generated_bytes(cfg: DataConfig) -> int:
    """Bytes of the float64 arrays generated for data.name=teacher (the inputs, the teacher's
    first layer and its hidden activations) or seed (the library's inputs and targets); 0 for
    digits, which is read (1797 samples of 64 pixels), and for data not generated here."""
    if cfg.name == "teacher":
        hidden = _teacher_width(cfg.num_outputs)
        return 8 * (cfg.num_samples * cfg.input_dim + cfg.input_dim * hidden + cfg.num_samples * hidden)
    if cfg.name == "seed":
        return 8 * cfg.library_size * (cfg.input_dim + cfg.num_outputs)
    return 0


_REQUIRED = ("X_train", "y_train", "X_test", "y_test")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
MAX_CLASSES = 100_000
"""Largest number of classes (outputs) a file's labels may ask for."""
# Targets within b = sqrt(max)/2^16 keep the sum of 2^30 squared errors, each of a prediction
# off by up to twice the largest target, finite in the training dtype: (2b)^2 * 2^30 = max.
_TARGET_HEADROOM = 2.0**16


def _file(cfg: DataConfig, seed: int, dtype: torch.dtype):
    arrays = _read_npz(cfg.path)
    task = _check_file_arrays(cfg.path, cfg.task, dtype, *(arrays[key] for key in _REQUIRED))
    x_train, y_train, x_test, y_test = (arrays[key] for key in _REQUIRED)
    if task == "regression":
        y_train, y_test = y_train.reshape(len(y_train), -1), y_test.reshape(len(y_test), -1)
    return x_train, y_train, x_test, y_test, task, "cross_entropy" if task == "classification" else "mse"


def _read_npz(path: str) -> dict[str, np.ndarray]:
    """The four arrays of a .npz written by numpy.savez, read without ever unpickling."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"data.path {path}: {problem}")

    if not os.path.isfile(path):
        raise ConfigError(f"data.path does not exist or is not a file: {path}")
    try:
        with open(path, "rb") as f:
            head = f.read(len(_NPY_MAGIC))
    except OSError as err:
        raise bad(f"cannot be read ({one_line(err)})") from None
    if not head:
        raise bad("the file is empty; it needs a .npz archive of arrays " + ", ".join(_REQUIRED))
    if head.startswith(_NPY_MAGIC):
        raise bad(
            "is a single .npy array, not a .npz archive; write one with "
            "numpy.savez(path, X_train=..., y_train=..., X_test=..., y_test=...)"
        )
    if head[:4] not in _ZIP_MAGICS:
        raise bad("is not a .npz archive (it is not a zip file); write one with numpy.savez")
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            missing = [key for key in _REQUIRED if f"{key}.npy" not in members]
            if missing:
                held = ", ".join(members[:8]) + (", ..." if len(members) > 8 else "") or "nothing"
                raise bad(f"lacks arrays {missing}; it needs {list(_REQUIRED)} (it holds {held})")
            for key in _REQUIRED:
                try:
                    with archive.open(f"{key}.npy") as member:
                        arrays[key] = np.lib.format.read_array(member, allow_pickle=False)
                except ValueError as err:
                    if "pickle" in str(err):
                        # Never unpickled: a user's file must not run code on load.
                        raise bad(
                            f"{key} holds Python objects, which are never loaded; store numbers"
                        ) from None
                    raise bad(f"{key}.npy is not a readable .npy array ({one_line(err)})") from None
    except ConfigError:
        raise
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
        raise bad(f"is a damaged or truncated .npz archive ({one_line(err)})") from None
    return arrays


def _kind(y: np.ndarray) -> str:
    if np.issubdtype(y.dtype, np.integer):
        return "int"
    return "float" if np.issubdtype(y.dtype, np.floating) else ""


def _check_file_arrays(path: str, task: str, dtype: torch.dtype, x_train, y_train, x_test, y_test) -> str:
    """One clear error for each way a user's arrays can be unusable; the task they are for."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"data.path {path}: {problem}")

    dtype_name = str(dtype).removeprefix("torch.")
    largest = torch.finfo(dtype).max
    for name, x in (("X_train", x_train), ("X_test", x_test)):
        if _kind(x) == "" or x.ndim < 2:
            raise bad(
                f"{name} must be a 2-D or higher array of numbers (samples first); got {x.dtype} of shape {x.shape}"
            )
        if len(x) == 0 or x[0].size == 0:
            raise bad(f"{name} holds no samples or samples of no values; got shape {x.shape}")
        if _kind(x) == "float" and not np.isfinite(x).all():
            raise bad(f"{name} holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
        extreme = max(abs(float(x.min())), abs(float(x.max())))
        if extreme > largest:
            raise bad(
                f"{name} holds values up to {extreme:.3g} in magnitude, beyond the largest "
                f"{dtype_name} ({largest:.3g}; train.dtype): they would be infinite in training"
            )
    if x_train.shape[1:] != x_test.shape[1:]:
        raise bad(f"X_train samples have shape {x_train.shape[1:]} but X_test samples {x_test.shape[1:]}")
    kinds = {name: _kind(y) for name, y in (("y_train", y_train), ("y_test", y_test))}
    if "" in kinds.values() or kinds["y_train"] != kinds["y_test"]:
        raise bad(
            f"y_train and y_test must both be integer labels or both floating targets; "
            f"got {y_train.dtype} and {y_test.dtype}"
        )
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise bad(
            f"arrays disagree in length: X_train {len(x_train)}, y_train {len(y_train)}, "
            f"X_test {len(x_test)}, y_test {len(y_test)}"
        )
    if task == "auto":
        task = "regression" if kinds["y_train"] == "float" else _classes_or_refuse(bad, y_train)
    if task == "classification":
        _check_labels(bad, y_train, y_test)
    else:
        _check_targets(bad, dtype_name, largest, y_train, y_test)
    return task


def _check_labels(bad, y_train, y_test) -> None:
    if _kind(y_train) != "int":
        raise bad(f"data.task=classification needs integer labels; y_train is {y_train.dtype}")
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim != 1 or (y < 0).any():
            raise bad(
                f"{name} labels must be a 1-D array of integers >= 0; got shape {y.shape}, min {y.min()} "
                f"(data.task=regression if they are targets)"
            )
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise bad(f"y_train holds a single class ({classes[0]}): classification needs at least two")
    if int(classes[-1]) >= MAX_CLASSES:
        raise bad(
            f"y_train holds label {classes[-1]}: class labels must be 0..C-1 with C <= {MAX_CLASSES} "
            f"(data.task=regression if they are targets)"
        )
    unseen = np.setdiff1d(np.unique(y_test), classes)
    if len(unseen):
        shown = ", ".join(str(label) for label in unseen[:5]) + (", ..." if len(unseen) > 5 else "")
        raise bad(
            f"y_test holds labels that are not classes of y_train ({shown}); "
            f"y_train has {len(classes)} classes in 0..{classes[-1]}"
        )


def _classes_or_refuse(bad, y_train) -> str:
    """data.task=auto with integer y_train: classification when it plainly is one."""
    if y_train.ndim != 1:
        return "classification"  # refused by _check_labels, which says why
    classes = np.unique(y_train)
    if classes[0] < 0 or len(classes) == 1:
        return "classification"  # refused by _check_labels, which says why
    if classes[0] == 0 and classes[-1] == len(classes) - 1:
        return "classification"  # every label 0..C-1 occurs
    raise bad(
        f"y_train holds integers that do not look like class labels ({len(classes)} distinct values, "
        f"min {classes[0]}, max {classes[-1]}): set data.task=classification or data.task=regression"
    )


def _check_targets(bad, dtype_name: str, largest: float, y_train, y_test) -> None:
    bound = np.sqrt(largest) / _TARGET_HEADROOM
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if y.ndim > 2 or (_kind(y) == "float" and not np.isfinite(y).all()):
            raise bad(f"{name} targets must be a finite 1-D or 2-D array; got shape {y.shape}")
        if y[0].size == 0:
            raise bad(f"{name} targets have no columns; got shape {y.shape}")
        extreme = max(abs(float(y.min())), abs(float(y.max())))
        if extreme > bound:
            raise bad(
                f"{name} targets reach {extreme:.3g} in magnitude; they must stay within {bound:.3g} "
                f"so that squared errors stay finite in {dtype_name} (train.dtype)"
            )
    if y_train.reshape(len(y_train), -1).shape[1] != y_test.reshape(len(y_test), -1).shape[1]:
        raise bad(f"y_train and y_test have different target widths: {y_train.shape} and {y_test.shape}")


_GENERATED = {"digits": _digits, "teacher": _teacher, "seed": _seed_library}


def load_dataset(cfg: DataConfig, seed: int, dtype: torch.dtype) -> Dataset:
    """The whole dataset, identical on every rank."""
    if cfg.name in DATASET_BUILDERS:
        raise ConfigError(
            f"data.name={cfg.name} is read through a DataLoader, not held in memory: use build_datasets"
        )
    if cfg.name == "file":
        x_train, y_train, x_test, y_test, task, loss = _file(cfg, seed, dtype)
    else:
        x_train, y_train, x_test, y_test, task, loss = _GENERATED[cfg.name](cfg, seed)
    if len(x_train) == 0 or len(x_test) == 0:  # a file's arrays were checked for this already
        raise ConfigError(
            "data.num_samples and data.test_fraction must leave at least one training and one test sample"
        )
    target_dtype = torch.long if task == "classification" else dtype
    if task == "classification":
        num_outputs = int(max(y_train.max(), y_test.max())) + 1
    else:
        num_outputs = y_train.shape[1]
    return Dataset(
        x_train=torch.as_tensor(x_train, dtype=dtype),
        y_train=torch.as_tensor(y_train, dtype=target_dtype),
        x_test=torch.as_tensor(x_test, dtype=dtype),
        y_test=torch.as_tensor(y_test, dtype=target_dtype),
        task=task,
        loss=loss,
        num_outputs=num_outputs,
        source=f"data.path {cfg.path}" if cfg.name == "file" else f"data.name={cfg.name}",
    )


# ---- any map-style torch Dataset (data._target_), and the one interface the loop uses


@dataclass
class DataInfo:
    """What the loop needs to know about a dataset besides its samples."""

    task: str
    loss: str
    num_outputs: int
    input_shape: tuple[int, ...]
    source: str = "the data"
    shapes: str = ""
    """What check_model says of the inputs' shape (the default: the samples of `source`)."""

    def check_model(self, cfg: ModelConfig) -> None:
        shapes = self.shapes or f"the samples of {self.source} have shape {self.input_shape}"
        check_input_shape(cfg, self.input_shape, shapes)


def build_datasets(
    cfg: DataConfig, seed: int, dtype: torch.dtype
) -> tuple[TorchDataset, TorchDataset, DataInfo]:
    """The training set, the shared test set and what they hold, identical on every rank.

    Built-in data (digits, seed, teacher, file) come back as TensorDatasets, which the loop
    trains on from device memory; any other map-style Dataset (data._target_, or a builder
    registered in DATASET_BUILDERS) is read through a DataLoader. Items are (x, y) pairs."""
    if cfg.name in DATASET_BUILDERS:
        train_set, test_set = DATASET_BUILDERS[cfg.name](cfg, seed)
        return train_set, test_set, dataset_info(cfg, train_set, test_set)
    data = load_dataset(cfg, seed, dtype)
    shapes = f"X_train of {data.source} has shape {tuple(data.x_train.shape)}"
    info = DataInfo(data.task, data.loss, data.num_outputs, data.input_shape, data.source, shapes)
    return TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_test, data.y_test), info


def _target_datasets(cfg: DataConfig, seed: int) -> tuple[TorchDataset, TorchDataset]:
    """data._target_ called with data.kwargs: with train=True/False when it takes `train`,
    otherwise once and split by data.test_fraction (the split is seeded as the built-ins')."""
    from hydra.utils import instantiate

    key = f"data._target_={cfg._target_}"
    target = locate_target("data._target_", cfg._target_, "a Dataset")
    try:
        takes_train = "train" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        takes_train = False

    def build(**extra) -> TorchDataset:
        try:
            dataset = instantiate({"_target_": cfg._target_, **cfg.kwargs}, **extra)
        except Exception as err:
            raise ConfigError(f"{key} cannot be built: {one_line(err.__cause__ or err)}") from None
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError(
                f"{key} built a {type(dataset).__name__}, not a map-style Dataset (__getitem__ and __len__)"
            )
        return dataset

    if takes_train:
        return build(train=True), build(train=False)
    whole = build()
    order = streams.rng(seed, streams.SPLIT).permutation(len(whole))
    num_test = max(1, int(round(cfg.test_fraction * len(whole))))
    return Subset(whole, order[num_test:].tolist()), Subset(whole, order[:num_test].tolist())


DATASET_BUILDERS: dict[str, Callable[[DataConfig, int], tuple[TorchDataset, TorchDataset]]] = {
    "dataset": _target_datasets,
    **dict.fromkeys(VISION_DATA, vision.datasets),  # torchvision is imported only when used
}
"""data.name -> (train set, test set) of map-style Datasets, read through a DataLoader."""


def _underlying(dataset):
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return dataset


def _num_classes(dataset, key: str) -> int:
    """From the dataset's own `num_classes`, `classes` or `targets`, or else its labels read."""
    base = _underlying(dataset)
    if isinstance(getattr(base, "num_classes", None), int):
        return base.num_classes
    if getattr(base, "classes", None) is not None:
        return len(base.classes)
    targets = getattr(base, "targets", None)
    if targets is None:
        log.info("%s has no num_classes, classes or targets: reading every label to count classes", key)
        targets = [int(torch.as_tensor(dataset[i][1])) for i in range(len(dataset))]
    return int(torch.as_tensor(targets).max()) + 1


def dataset_info(cfg: DataConfig, train_set: TorchDataset, test_set: TorchDataset) -> DataInfo:
    """Task, loss, outputs and input shape of a Dataset, from its first training sample."""
    key = f"data._target_={cfg._target_}" if cfg._target_ else f"data.name={cfg.name}"
    for name, dataset in (("training", train_set), ("test", test_set)):
        if len(dataset) == 0:
            raise ConfigError(f"{key} gives an empty {name} set")
    sample = train_set[0]
    if not (isinstance(sample, (tuple, list)) and len(sample) == 2):
        raise ConfigError(f"{key}: each item must be an (x, y) pair; item 0 is a {type(sample).__name__}")
    x, y = (torch.as_tensor(v) for v in sample)
    if x.dim() == 0 or not x.is_floating_point():
        raise ConfigError(
            f"{key}: x must be a floating tensor of at least 1 dimension; got {x.dtype} {tuple(x.shape)}"
        )
    task = cfg.task
    if task == "auto":
        task = "regression" if y.is_floating_point() else "classification"
    if task == "classification":
        if y.is_floating_point() or y.dim() != 0:
            raise ConfigError(
                f"{key}: classification needs y an integer class label; item 0 has {y.dtype} {tuple(y.shape)}"
            )
        num_outputs = _num_classes(train_set, key)
        if num_outputs < 2:
            raise ConfigError(f"{key}: classification needs at least two classes; got {num_outputs}")
        loss = "cross_entropy"
    else:
        if not y.is_floating_point() or y.dim() > 1:
            raise ConfigError(
                f"{key}: regression needs y a float scalar or vector; item 0 has {y.dtype} {tuple(y.shape)}"
            )
        num_outputs, loss = max(1, y.numel()), "mse"
    return DataInfo(task, loss, num_outputs, tuple(x.shape), key)
