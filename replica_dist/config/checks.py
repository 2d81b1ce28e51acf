"""What every part of the config shares: the range check and the choice types."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal, get_args, get_origin

from replica_dist.errors import ConfigError


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
OptimName = Literal["sgd", "adam"]
Dtype = Literal["float32", "float64"]
Schedule = Literal["constant", "cosine", "step"]
Precision = Literal["fp32", "bf16", "fp16"]
Nonfinite = Literal["stop", "skip"]
Backend = Literal["auto", "gloo", "nccl"]
Device = Literal["auto", "cpu", "cuda"]
Init = Literal["independent", "same"]
Compression = Literal["none", "bf16", "int8"]

CHOICES: dict[str, tuple[str, ...]] = {}
"""Annotation name (as written on a field) -> the values that field allows; each schema module
adds its own choice types (`add_choices`)."""


def add_choices(namespace: dict[str, object]) -> None:
    """The Literal aliases among a module's globals, into CHOICES."""
    CHOICES.update(
        {name: get_args(alias) for name, alias in namespace.items() if get_origin(alias) is Literal}
    )


add_choices(dict(globals()))

if not TYPE_CHECKING:
    ModelName = Activation = DataName = Split = Task = str
    OptimName = Dtype = Nonfinite = Backend = Device = Init = Schedule = Precision = Compression = str


def _check_choices(obj: object, prefix: str) -> None:
    """Every field of `obj` annotated with a choice type holds one of its values."""
    for f in dataclasses.fields(obj):
        if f.type in CHOICES:
            _one_of(prefix + f.name, getattr(obj, f.name), CHOICES[f.type])
