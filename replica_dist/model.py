"""The networks. Layers are named (fc1, fc2, ...; conv1, ...) so per-layer metrics read well."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from replica_dist.config import ConfigError, ModelConfig

_ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}


def mlp(cfg: ModelConfig, input_dim: int, num_outputs: int) -> nn.Sequential:
    widths = [input_dim, *cfg.hidden, num_outputs]
    layers: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:]), start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, fan_out, bias=cfg.bias)
        if i < len(widths) - 1:
            layers[f"act{i}"] = _ACTIVATIONS[cfg.activation]()
    return nn.Sequential(layers)


def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Sequential:
    channels = [input_shape[0], *cfg.hidden]
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    for i, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:]), start=1):
        layers[f"conv{i}"] = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=cfg.bias)
        if cfg.batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c_out)
        layers[f"act{i}"] = _ACTIVATIONS[cfg.activation]()
    layers["pool"] = nn.AdaptiveAvgPool2d(2)
    layers["flatten"] = nn.Flatten()
    layers["fc"] = nn.Linear(4 * channels[-1], num_outputs, bias=cfg.bias)
    return nn.Sequential(layers)


def check_input_shape(cfg: ModelConfig, input_shape: tuple[int, ...], what: str) -> None:
    """Refuse inputs the network cannot take; `what` says where they came from and their shape."""
    if cfg.name == "cnn" and len(input_shape) != 3:
        raise ConfigError(f"model.name=cnn needs image-shaped inputs (N, C, H, W); {what}")


def build_model(
    cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int, generator_seed: int
) -> nn.Module:
    """A freshly initialised network; the same `generator_seed` gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(generator_seed)
        if cfg.name == "cnn":
            check_input_shape(cfg, input_shape, f"the data has samples of shape {input_shape}")
            model = cnn(cfg, input_shape, num_outputs)
        else:
            model = mlp(cfg, int(torch.tensor(input_shape).prod()), num_outputs)
        if cfg.init_std > 0:
            for name, param in model.named_parameters():
                if name.endswith("weight") and param.dim() > 1:
                    nn.init.normal_(param, std=cfg.init_std)
    return model
