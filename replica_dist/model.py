"""The networks: the presets, whose layers are named (fc1, fc2, ...; conv1, ...) so per-layer
metrics read well, or any model that model._target_ names (its own parameter names then)."""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch
from torch import nn

from replica_dist.errors import ConfigError, one_line
from replica_dist.targets import MODEL_DATA_ARGUMENTS, locate_target, model_signature

if TYPE_CHECKING:
    from replica_dist.config import ModelConfig

log = logging.getLogger(__name__)

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
_KERNEL = 3
"""The cnn's convolutions are KERNEL x KERNEL, padded to keep the image's size."""
_POOLED = 2
"""The cnn pools each channel to POOLED x POOLED before its linear layer."""


def mlp(cfg: ModelConfig, input_dim: int, num_outputs: int) -> nn.Sequential:
    widths = _mlp_widths(cfg, input_dim, num_outputs)
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=cfg.bias)
        if i < len(widths) - 1:
            layers[f"act{i}"] = _ACTIVATIONS[cfg.activation]()
    return nn.Sequential(layers)


def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    channels = _cnn_channels(cfg, input_shape)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel_size=_KERNEL, padding=_KERNEL // 2, bias=cfg.bias)
        if cfg.batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
        layers[f"act{i}"] = _ACTIVATIONS[cfg.activation]()
    layers["pool"] = nn.AdaptiveAvgPool2d(_POOLED)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(_POOLED**2 * channels[-1], num_outputs, bias=cfg.bias)
    return nn.Sequential(layers)


def _mlp_widths(cfg: ModelConfig, input_dim: int, num_outputs: int) -> list[int]:
    return [input_dim, *cfg.hidden, num_outputs]


def _cnn_channels(cfg: ModelConfig, input_shape: tuple[int, ...]) -> list[int]:
    return [input_shape[0], *cfg.hidden]


def parameter_count(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> int:
    """Weights (and biases, BatchNorm affine parameters) of the preset `cfg` names for samples of
    `input_shape`: what mlp and cnn build, counted from the same widths, in Python integers so
    that a network far beyond any memory is counted too (the config refuses it by this count)."""
    if cfg.name == "cnn":
        channels = _cnn_channels(cfg, input_shape)
        count = sum(
            _KERNEL**2 * a * b + b * cfg.bias + 2 * b * cfg.batch_norm for a, b in zip(channels, channels[1:])
        )
        return count + _POOLED**2 * channels[-1] * num_outputs + num_outputs * cfg.bias
    widths = _mlp_widths(cfg, math.prod(input_shape), num_outputs)
    return sum(a * b + b * cfg.bias for a, b in zip(widths, widths[1:]))


def check_input_shape(cfg: ModelConfig, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse inputs the network cannot take; `what` says where they came from and their shape."""
    if not cfg._target_ and cfg.name == "cnn" and len(input_shape) != 3:
        raise ConfigError(f"model.name=cnn needs image-shaped inputs (N, C, H, W); {what}")


def instantiate(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """model._target_ built with Hydra's instantiate from model.kwargs (plus the data's number of
    outputs for a `num_classes`/`num_outputs` its signature names and the user left out), then
    checked on a batch of two zero samples: a torch.nn.Module whose output is (2, num_outputs).
    Every failure is one ConfigError naming model._target_."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    key = f"model._target_={cfg._target_}"
    signature = model_signature(locate_target("model._target_", cfg._target_, "a model"))
    kwargs = dict(cfg.kwargs)
    if signature is not None:
        for name in MODEL_DATA_ARGUMENTS:
            if name in signature.parameters and name not in kwargs:
                kwargs[name] = num_outputs
                log.info("model: %s=%d from the data", name, num_outputs)
    try:
        model = hydra_instantiate({"_target_": cfg._target_, **kwargs}, _convert_="all")
    except InstantiationException as err:
        raise ConfigError(
            f"{key}: cannot build it: {one_line(err.__cause__ or err, with_type=True)}"
        ) from None
    except Exception as err:  # whatever the user's constructor raised, in one line
        raise ConfigError(f"{key}: cannot build it: {one_line(err, with_type=True)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{key}: built a {type(model).__name__}, not a torch.nn.Module")
    # Lazy modules take their shapes here, from the same seed, before anything counts weights.
    sample = torch.zeros(2, *input_shape)
    was_training = model.training
    model.eval()  # a BatchNorm's running statistics stay as initialised
    try:
        with torch.no_grad():
            output = model(sample)
    except Exception as err:  # the model cannot take this data: its own message
        raise ConfigError(
            f"{key}: fails on a batch of the data's shape {tuple(sample.shape)}: {one_line(err, with_type=True)}"
        ) from None
    model.train(was_training)
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else None
    if shape != (2, num_outputs):
        got = f"outputs of shape {shape}" if shape is not None else f"a {type(output).__name__}"
        raise ConfigError(
            f"{key}: gives {got} on a batch of shape {tuple(sample.shape)}; the data needs "
            f"(2, {num_outputs}) (set the model's number of outputs to {num_outputs})"
        )
    if not any(True for _ in model.parameters()):
        raise ConfigError(f"{key}: the model has no parameters to train")
    return model


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, generator_seed: int
) -> nn.Module:
    """A freshly initialised network; the same `generator_seed` gives the same weights (for a
    model._target_ too: its constructor draws from the seeded generator)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        if cfg._target_:
            return instantiate(cfg, input_shape, num_outputs)
        if cfg.name == "cnn":
            check_input_shape(cfg, input_shape, f"the data has samples of shape {input_shape}")
            model = cnn(cfg, input_shape, num_outputs)
        else:
            model = mlp(cfg, math.prod(input_shape), num_outputs)
        if cfg.init_std > 0:
            for name, param in model.named_parameters():
                if name.endswith("weight") and param.dim() > 1:
                    nn.init.normal_(param, std=cfg.init_std)
    return model
