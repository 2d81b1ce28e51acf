"""Datasets (built in or generated; nothing is downloaded) and each replica's share of them.

Everything here is a deterministic function of the config, the seed and the replica's rank,
so a single process can rebuild exactly the data every replica of a distributed run saw.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from replica_dist.config import ConfigError, DataConfig, ModelConfig
from replica_dist.model import check_input_shape

log = logging.getLogger(__name__)

# Independent random streams per purpose, so that e.g. changing the world size does not
# change the test split.
_SPLIT, _SHARD, _ORDER, _SEED_LIBRARY, _SEED_BATCH, _TEACHER = range(6)


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


def _rng(seed: int, purpose: int, *extra: int) -> np.random.Generator:
    return np.random.default_rng([seed, purpose, *extra])


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    order = _rng(seed, _SPLIT).permutation(len(x))
    num_test = max(1, int(round(test_fraction * len(x))))
    test, train = order[:num_test], order[num_test:]
    return x[train], y[train], x[test], y[test]


def _digits(cfg: DataConfig, seed: int):
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0)[:, None, :, :]  # (n, 1, 8, 8), pixels in [0, 1]
    return (*_split(x, digits.target, cfg.test_fraction, seed), "classification", "cross_entropy")


def _teacher(cfg: DataConfig, seed: int):
    rng = _rng(seed, _TEACHER)
    x = rng.standard_normal((cfg.num_samples, cfg.input_dim))
    hidden = 4 * cfg.num_outputs
    w1 = rng.standard_normal((cfg.input_dim, hidden)) / np.sqrt(cfg.input_dim)
    w2 = rng.standard_normal((hidden, cfg.num_outputs)) / np.sqrt(hidden)
    y = np.argmax(np.tanh(x @ w1) @ w2, axis=1)
    return (*_split(x, y, cfg.test_fraction, seed), "classification", "cross_entropy")


def _seed_library(cfg: DataConfig, seed: int):
    rng = _rng(seed, _SEED_LIBRARY)
    x = rng.standard_normal((cfg.library_size, cfg.input_dim))
    y = rng.standard_normal((cfg.library_size, cfg.num_outputs))
    # The library is both what replicas draw their fixed batches from and the shared test set.
    return x, y, x, y, "regression", "sse"


_REQUIRED = ("X_train", "y_train", "X_test", "y_test")
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
MAX_CLASSES = 100_000
"""Largest number of classes (outputs) a file's labels may ask for."""
# Targets within b = sqrt(max)/2^16 keep the sum of 2^30 squared errors, each of a prediction
# off by up to twice the largest target, finite in the training dtype: (2b)^2 * 2^30 = max.
_TARGET_HEADROOM = 2.0**16


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


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
        raise bad(f"cannot be read ({_one_line(err)})") from None
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
                    raise bad(f"{key}.npy is not a readable .npy array ({_one_line(err)})") from None
    except ConfigError:
        raise
    except (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error) as err:
        raise bad(f"is a damaged or truncated .npz archive ({_one_line(err)})") from None
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


def replica_indices(cfg: DataConfig, num_train: int, seed: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices into the training set that belong to replica `rank`."""
    if cfg.name == "seed":
        # The note: each replica's fixed batch is drawn with replacement from the library.
        return torch.as_tensor(_rng(seed, _SEED_BATCH, rank).integers(num_train, size=cfg.fixed_batch))
    if cfg.split == "full":
        return torch.arange(num_train)
    if num_train < world_size:
        raise ConfigError(
            f"data.split=shard needs at least one training sample per replica: "
            f"{world_size} replicas but {num_train} training samples"
        )
    order = _rng(seed, _SHARD).permutation(num_train)
    return torch.as_tensor(np.array_split(order, world_size)[rank])


class ReplicaBatches:
    """Minibatches of one replica, reshuffled each pass over its data by its own stream.

    A replica whose data is not larger than the batch size trains on all of it every step
    (the note's fixed batch)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, rank: int):
        self.x, self.y = x, y
        if batch_size > len(x):
            log.info(
                "train.batch_size=%d is larger than this replica's %d training samples: "
                "every step uses all of them",
                batch_size,
                len(x),
            )
        self.batch_size = min(batch_size, len(x))
        self._rng = _rng(seed, _ORDER, rank)
        self._order = np.arange(len(x))
        self._position = len(x)  # forces a shuffle on the first draw

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.batch_size == len(self.x):
            return self.x, self.y
        if self._position + self.batch_size > len(self.x):
            self._order = self._rng.permutation(len(self.x))
            self._position = 0
        chosen = torch.as_tensor(
            self._order[self._position : self._position + self.batch_size], device=self.x.device
        )
        self._position += self.batch_size
        return self.x[chosen], self.y[chosen]

    def state_dict(self) -> dict:
        """Where this replica is in its data order: enough to continue bit for bit."""
        return {
            "rng": self._rng.bit_generator.state,
            "order": self._order.tolist(),
            "position": self._position,
        }

    def load_state_dict(self, state: dict) -> None:
        self._rng.bit_generator.state = state["rng"]
        self._order = np.asarray(state["order"], dtype=np.int64)
        self._position = int(state["position"])
