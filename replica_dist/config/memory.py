"""Sizes that cannot fit in this machine's memory, refused before anything is built."""

from __future__ import annotations

import math
import os

from replica_dist.config.run import Config
from replica_dist.errors import ConfigError


def _physical_memory_bytes() -> int | None:
    """This machine's memory (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _data_shape(cfg: Config) -> tuple[tuple[int, ...], int]:
    """Sample shape and number of outputs the data will have; for a file, whose arrays are read
    only later, the smallest possible (one input, one output), so estimates stay lower bounds."""
    d = cfg.data
    if d.name == "digits":
        return (1, 8, 8), 10
    if d.name in ("seed", "teacher"):
        return (d.input_dim,), d.num_outputs
    return (1, 1, 1) if cfg.model.name == "cnn" else (1,), 1


def parameter_count(cfg: Config) -> int | None:
    """Weights (and biases, BatchNorm affine parameters) of the model the config builds,
    counted as replica_dist.model builds them; None for a model._target_, unknown until built."""
    m = cfg.model
    if m._target_:
        return None
    shape, outputs = _data_shape(cfg)
    if m.name == "cnn":
        channels = [shape[0], *m.hidden]
        count = sum(9 * a * b + b * m.bias + 2 * b * m.batch_norm for a, b in zip(channels, channels[1:]))
        return count + 4 * channels[-1] * outputs + outputs * m.bias
    widths = [math.prod(shape), *m.hidden, outputs]
    return sum(a * b + b * m.bias for a, b in zip(widths, widths[1:]))


def generated_data_bytes(cfg: Config) -> int:
    """Bytes of the float64 arrays replica_dist.data generates (0 for digits and file, which
    are not generated: digits is 1797 samples of 64 pixels)."""
    d = cfg.data
    if d.name == "teacher":
        hidden = 4 * d.num_outputs
        return 8 * (d.num_samples * d.input_dim + d.input_dim * hidden + d.num_samples * hidden)
    if d.name == "seed":
        return 8 * d.library_size * (d.input_dim + d.num_outputs)
    return 0


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
