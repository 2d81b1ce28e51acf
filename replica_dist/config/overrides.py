"""The overrides as the user wrote them: parsing, values Hydra would convert silently, unknown
keys, and keys set for a choice that ignores them (APPLIES_TO)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re

from hydra.errors import HydraException

from replica_dist.config.checks import _check
from replica_dist.config.coupling import COUPLING_APPLIES_TO
from replica_dist.config.model_data import _VISION_KEYS
from replica_dist.config.run import Config
from replica_dist.data_names import VISION_DATA
from replica_dist.errors import ConfigError


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
    **COUPLING_APPLIES_TO,
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
