"""The callable a `_target_` setting names (model._target_, data._target_, coupling._target_),
imported with one ConfigError naming the key; here, apart from the config, so that the builders
(model.py, data.py) and the config's checks share it without importing each other."""

from __future__ import annotations

import importlib
import inspect

from replica_dist.errors import ConfigError, one_line

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
