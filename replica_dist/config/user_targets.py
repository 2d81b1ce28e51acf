"""The checks of a model._target_ or coupling._target_ (a class of the user's own): its
arguments routed to model.kwargs (coupling.kwargs), no preset or built-in form's key beside it,
and arguments its signature accepts."""

from __future__ import annotations

import dataclasses
import inspect

from replica_dist.config.checks import CHOICES
from replica_dist.config.coupling import COUPLING_SETTINGS, CouplingConfig, locate_form
from replica_dist.config.model_data import MODEL_PRESET_KEYS, ModelConfig
from replica_dist.config.overrides import _check_known_keys
from replica_dist.config.run import Config
from replica_dist.errors import ConfigError
from replica_dist.targets import MODEL_DATA_ARGUMENTS, locate_target, model_signature

TARGET_GROUPS = {"model": ModelConfig, "coupling": CouplingConfig}
"""Groups whose `_target_` names a class of the user's own, its arguments in `kwargs`."""


def _route_target_arguments(parsed: list) -> tuple[list[str], dict[str, str]]:
    """The overrides, with each argument of a model._target_ (or coupling._target_) moved to
    model.kwargs: `model.KEY=V` for a KEY the schema lacks becomes `++model.kwargs.KEY=V` (set
    or add; `+` and `~` keep theirs), and so do `model.kwargs.KEY=V` and `model.kwargs={...}`.
    Hydra's schema holds no such key, so only `++` would reach it. Also returns, by group and
    argument ("model.width"), the key as typed: without a _target_ such a key is reported as
    the unknown key it then is."""
    fields = {
        group: {f.name for f in dataclasses.fields(cls)} - {"kwargs"} for group, cls in TARGET_GROUPS.items()
    }
    routed, typed = [], {}
    for override in parsed:
        key, text = override.key_or_group, override.input_line
        parts = key.split(".")
        group = parts[0]
        if override.package is not None or len(parts) < 2 or group not in fields or parts[1] in fields[group]:
            routed.append(text)
            continue
        prefix = text[: len(text) - len(text.lstrip("~+"))]
        if key == f"{group}.kwargs":  # a whole dict: merged into the (empty, hence closed) default
            routed.append(f"{prefix or '++'}{text[len(prefix) :]}")
            continue
        argument = (
            key.removeprefix(f"{group}.kwargs.") if parts[1] == "kwargs" else key.removeprefix(f"{group}.")
        )
        typed.setdefault(f"{group}.{argument.split('.')[0]}", key)
        rest = text[text.index(key, len(prefix)) + len(key) :]
        routed.append(f"{prefix or '++'}{group}.kwargs.{argument}{rest}")
    return routed, typed


def _check_target_extras(container: dict, typed: dict[str, str]) -> None:
    """Arguments need a _target_; without one, a key routed from `model.KEY` (`coupling.KEY`)
    is an unknown key of the schema (a typo of a preset key, most likely)."""
    for group in TARGET_GROUPS:
        extras = container[group].get("kwargs") or {}
        if container[group].get("_target_") or not extras:
            continue
        first = next(iter(extras))
        if not typed.get(f"{group}.{first}", f"{group}.kwargs.").startswith(f"{group}.kwargs."):
            _check_known_keys({group: {first: None}}, Config)
        builds = "a model" if group == "model" else "a form"
        raise ConfigError(
            f"{group}.kwargs.{first} is an argument of {builds} chosen by {group}._target_, which is not set"
        )


def _settings_typed(parsed: list):
    """(key, override) of each override that sets a config key (not a deletion, a package or
    Hydra's own)."""
    for override in parsed:
        if not (override.is_delete() or override.package is not None or override.is_hydra_override()):
            yield override.key_or_group, override


def _check_coupling_target(cfg: Config, parsed: list) -> None:
    """With coupling._target_: no built-in form's key on the command line (it would be
    ignored), and arguments its constructor accepts."""
    c = cfg.coupling
    if not c._target_:
        return
    for key, override in _settings_typed(parsed):
        parts = key.split(".")
        if key == "coupling" or (
            parts[0] == "coupling" and len(parts) == 2 and parts[1] in COUPLING_SETTINGS
        ):
            key = key if parts[1:] else f"{key}={override.value()}"
            raise ConfigError(
                f"{key} is a setting of the built-in forms, not of coupling._target_={c._target_} "
                f"(drop it; an argument of the target by that name is coupling.kwargs.{parts[-1]}=VALUE)"
            )
    _bind("coupling._target_", c._target_, locate_form(c), c.kwargs, {})


def _bind(key: str, path: str, target, kwargs: dict, filled: dict) -> None:
    """A ConfigError naming `key` where `target`'s signature does not take `kwargs` (and `filled`)."""
    signature = model_signature(target)
    if signature is None:
        return
    try:
        signature.bind(**kwargs, **filled)
    except TypeError as err:
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=inspect.Signature.empty,
        )
        shown = " ".join(str(bare).split())
        raise ConfigError(f"{key}={path}: {err}; its signature is {shown}") from None


def _check_model_target(cfg: Config, parsed: list) -> None:
    """With model._target_: no preset key on the command line (it would be ignored), a target
    that imports, and arguments its signature accepts (the data's `num_classes`/`num_outputs`
    counted as given). Building it waits for the data, in replica_dist.model."""
    m = cfg.model
    if not m._target_:
        return
    for key, override in _settings_typed(parsed):
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
    _bind("model._target_", m._target_, target, m.kwargs, filled)
