"""Sizes that cannot fit in this machine's memory, refused before anything is built."""

from __future__ import annotations

import os

from replica_dist.config.run import Config
from replica_dist.errors import ConfigError


def _physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def parameter_count(cfg: Config) -> int | None:
    """Weights (and biases, BatchNorm affine parameters) of the model the config builds, counted
    by replica_dist.model; None for a model._target_, unknown until built. Data read only later
    (a file, a dataset) counts as the smallest possible (one input, one output), so the count
    stays a lower bound."""
    if cfg.model._target_:
        return None
    from replica_dist import data, model  # torch: only when a config is checked, not imported

    smallest = ((1, 1, 1) if cfg.model.name == "cnn" else (1,)), 1
    shape, outputs = data.generated_shape(cfg.data) or smallest
    return model.parameter_count(cfg.model, shape, outputs)


def generated_data_bytes(cfg: Config) -> int:
    """Bytes of the float64 arrays replica_dist.data generates for the config's data."""
    from replica_dist import data

    return data.generated_bytes(cfg.data)


def _check_memory(cfg: Config) -> None:
    """Refuse sizes that cannot fit: every process on this node (torchrun's LOCAL_WORLD_SIZE)
    generates the whole dataset and holds its model's weights and gradients at least, so
    either alone above the machine's physical memory would end in an allocation error."""
    memory = _physical_memory_bytes()
    if memory is None:
        return
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    gib = 2**30
    where = f"this machine's {memory / gib:.1f} GiB of memory" + (
        f" shared by {processes} processes" if processes > 1 else ""
    )
    data_bytes = generated_data_bytes(cfg)
    if data_bytes * processes > memory:
        d = cfg.data
        sizes = (
            f"data.num_samples={d.num_samples}, data.input_dim={d.input_dim}"
            if d.name == "teacher"
            else f"data.library_size={d.library_size}, data.input_dim={d.input_dim}"
        )
        raise ConfigError(
            f"{sizes} generate {data_bytes / gib:.3g} GiB of data per process (data={d.name}), "
            f"more than {where}"
        )
    itemsize = 8 if cfg.train.dtype == "float64" else 4
    count = parameter_count(cfg)
    if count is not None and 2 * count * itemsize * processes > memory:
        inputs = "" if cfg.data.name in ("digits", "file") else f", data.input_dim={cfg.data.input_dim}"
        raise ConfigError(
            f"model.hidden={list(cfg.model.hidden)}{inputs} gives a {cfg.model.name} of {count:.3g} "
            f"weights: at least {2 * count * itemsize / gib:.3g} GiB per process for weights and "
            f"gradients ({cfg.train.dtype}), more than {where}"
        )
