"""Datasets (built in or generated; nothing is downloaded) and each replica's share of them.

Everything here is a deterministic function of the config, the seed and the replica's rank,
so a single process can rebuild exactly the data every replica of a distributed run saw.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from replica_dist.config import ConfigError, DataConfig

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

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


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


def _file(cfg: DataConfig, seed: int):
    if not os.path.isfile(cfg.path):
        raise ConfigError(f"data.path does not exist or is not a file: {cfg.path}")
    try:
        with np.load(cfg.path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (OSError, ValueError) as err:
        raise ConfigError(f"data.path is not a readable .npz file: {cfg.path} ({err})") from None
    required = ("X_train", "y_train", "X_test", "y_test")
    missing = [key for key in required if key not in arrays]
    if missing:
        raise ConfigError(f"data.path {cfg.path} lacks arrays {missing}; it needs {list(required)}")
    x_train, y_train, x_test, y_test = (arrays[key] for key in required)
    _check_file_arrays(cfg.path, x_train, y_train, x_test, y_test)
    integer_targets = np.issubdtype(y_train.dtype, np.integer)
    return (
        x_train,
        y_train if integer_targets else y_train.reshape(len(y_train), -1),
        x_test,
        y_test if integer_targets else y_test.reshape(len(y_test), -1),
        "classification" if integer_targets else "regression",
        "cross_entropy" if integer_targets else "mse",
    )


def _check_file_arrays(path: str, x_train, y_train, x_test, y_test) -> None:
    """One clear error for each way a user's arrays can be unusable."""

    def bad(problem: str) -> ConfigError:
        return ConfigError(f"data.path {path}: {problem}")

    for name, x in (("X_train", x_train), ("X_test", x_test)):
        if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)) or x.ndim < 2:
            raise bad(
                f"{name} must be a 2-D or higher array of numbers (samples first); got {x.dtype} of shape {x.shape}"
            )
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            raise bad(f"{name} holds {int((~np.isfinite(x)).sum())} NaN or infinite values")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise bad(f"X_train samples have shape {x_train.shape[1:]} but X_test samples {x_test.shape[1:]}")
    kinds = {
        name: (
            "int"
            if np.issubdtype(y.dtype, np.integer)
            else "float"
            if np.issubdtype(y.dtype, np.floating)
            else ""
        )
        for name, y in (("y_train", y_train), ("y_test", y_test))
    }
    if "" in kinds.values() or kinds["y_train"] != kinds["y_test"]:
        raise bad(
            f"y_train and y_test must both be integer labels or both floating targets; "
            f"got {y_train.dtype} and {y_test.dtype}"
        )
    for name, y in (("y_train", y_train), ("y_test", y_test)):
        if kinds[name] == "int" and (y.ndim != 1 or (y < 0).any()):
            raise bad(
                f"{name} labels must be a 1-D array of integers >= 0; got shape {y.shape}, min {y.min()}"
            )
        if kinds[name] == "float" and (y.ndim > 2 or not np.isfinite(y).all()):
            raise bad(f"{name} targets must be a finite 1-D or 2-D array; got shape {y.shape}")
    if (
        kinds["y_train"] == "float"
        and y_train.reshape(len(y_train), -1).shape[1] != y_test.reshape(len(y_test), -1).shape[1]
    ):
        raise bad(f"y_train and y_test have different target widths: {y_train.shape} and {y_test.shape}")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise bad(
            f"arrays disagree in length: X_train {len(x_train)}, y_train {len(y_train)}, "
            f"X_test {len(x_test)}, y_test {len(y_test)}"
        )


_LOADERS = {"digits": _digits, "teacher": _teacher, "seed": _seed_library, "file": _file}


def load_dataset(cfg: DataConfig, seed: int, dtype: torch.dtype) -> Dataset:
    """The whole dataset, identical on every rank."""
    x_train, y_train, x_test, y_test, task, loss = _LOADERS[cfg.name](cfg, seed)
    if len(x_train) == 0 or len(x_test) == 0:
        keys = "data.path" if cfg.name == "file" else "data.num_samples and data.test_fraction"
        raise ConfigError(f"{keys} must leave at least one training and one test sample")
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
