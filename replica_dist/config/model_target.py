"""A model._target_'s checks: its arguments routed to model.kwargs, no preset key beside it, and
arguments its signature accepts."""

from __future__ import annotations

import dataclasses
import inspect

from replica_dist.config.checks import CHOICES
from replica_dist.config.model_data import MODEL_PRESET_KEYS, ModelConfig
from replica_dist.config.overrides import _check_known_keys
from replica_dist.config.run import Config
from replica_dist.errors import ConfigError
from replica_dist.targets import MODEL_DATA_ARGUMENTS, locate_target, model_signature


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
