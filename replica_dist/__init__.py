"""replica_dist: N replicas of one network, one process each under torchrun, each pulled toward
the replicas' mean through all_reduce.

Couple your own training loop with `ReplicaCoupling` (examples/own_loop.py), or run the
trainer with the `replica-dist` command or `torchrun -m replica_dist.train`; README.md tells
the configs (conf/), the outputs of a run and what the tests check. `import replica_dist` is
cheap: the names below load their modules (and torch) when first used.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from pathlib import Path

__all__ = [
    "ReplicaCoupling",  # the coupling as an object a plain training loop calls twice a step
    "CouplingError",  # the coupling used wrongly (calls out of order, models that differ)
    "NonFiniteError",  # a NaN or inf ended the loop (raised on every rank at a read back)
    "Config",  # the typed settings of a run (replica_dist.config; conf/ holds the choices)
    "load_config",  # overrides -> (Config, run directory), checked; a bad one is a ConfigError
    "ConfigError",  # a bad setting or input: one line, exit status 2
    "RunError",  # a failure during a run (diverged, disk full): one line, exit status 1
]

_HOMES = {
    "ReplicaCoupling": "replica_dist.coupling",
    "CouplingError": "replica_dist.coupling",
    "NonFiniteError": "replica_dist.guard",
    "Config": "replica_dist.config",
    "load_config": "replica_dist.config",
    "ConfigError": "replica_dist.errors",
    "RunError": "replica_dist.errors",
}


def _version() -> str:
    """The checkout's own pyproject when there is one (run in place or installed editable), so
    that the metadata of some other install cannot speak for it; else the installed metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file():
        project = re.search(r"(?ms)^\[project\]\s*$(.*?)(?=^\[|\Z)", pyproject.read_text(encoding="utf-8"))
        if project and re.search(r'(?m)^name\s*=\s*"replica[-_]dist"', project.group(1)):
            version = re.search(r'(?m)^version\s*=\s*"([^"]+)"', project.group(1))
            if version:
                return version.group(1)
    try:
        return metadata.version("replica_dist")
    except metadata.PackageNotFoundError:
        return "0+unknown"


__version__ = _version()


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
