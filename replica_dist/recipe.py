"""The usual training recipe around one replica's step: learning-rate schedule, gradient
accumulation, mixed precision, clipping, label smoothing, epochs, torch.compile.

None of it communicates, except the one small exchange that turns train.epochs into steps,
so the coupling's collectives stay exactly where replica_dist.coupling puts them.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from replica_dist import dist
from replica_dist.config import Config, ConfigError, OptimConfig
from replica_dist.coupling import unscale_or_drop_gradients


def lr_at(cfg: OptimConfig, step: int, steps: int) -> float:
    """The learning rate of `step` (counted from 1) of a run of `steps` steps: the closed
    form of optim.schedule (see OptimConfig.schedule)."""
    return cfg.lr * lr_factor(cfg, step, steps)


def lr_factor(cfg: OptimConfig, step: int, steps: int) -> float:
    warmup = cfg.warmup_steps
    if step <= warmup:
        return step / warmup
    if cfg.schedule == "cosine":
        span = steps - warmup - 1
        progress = (step - warmup - 1) / span if span > 0 else 1.0
        floor = cfg.min_lr / cfg.lr
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step - warmup - 1) // cfg.step_size)
    return 1.0


def build_scheduler(cfg: OptimConfig, optimizer: torch.optim.Optimizer, steps: int):
    """A LambdaLR whose lr, after k calls of .step(), is the lr of step k + 1: the loop steps it
    after every optimizer step (skipped ones too: the schedule follows the step count, as the
    coupling's eta does). Its state_dict goes into the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(_factor_of_epoch, cfg, steps=steps))


def _factor_of_epoch(cfg: OptimConfig, epoch: int, steps: int) -> float:
    return lr_factor(cfg, epoch + 1, steps)


def sync_lr(scheduler) -> None:
    """Set the optimizer's lr to the scheduler's current one (a replica that checkpoint.remap
    starts with a fresh optimizer would otherwise take one step at the first step's lr)."""
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr


def steps_for_epochs(epochs: int, shard_size: int, batch_size: int, grad_accum: int = 1) -> int:
    """Optimizer steps in `epochs` passes over a shard of `shard_size` samples: each pass is
    floor(shard_size / batch_size) micro-batches (the last partial batch is dropped; a shard
    not larger than a batch is one batch), grad_accum of them per step; at least one step."""
    per_epoch = max(1, shard_size // batch_size)
    return max(1, epochs * per_epoch // grad_accum)


def resolve_steps(cfg: Config, shard_size: int, device: torch.device, mesh: dist.Mesh) -> None:
    """With train.epochs > 0, set cfg.train.steps once, before anything reads it, from the
    smallest shard of any rank (one small all_reduce, on every rank), so that all agree."""
    if cfg.train.epochs == 0:
        return
    smallest = int(dist.gather_rows([float(shard_size)], device, mesh).min().item())
    cfg.train.steps = steps_for_epochs(cfg.train.epochs, smallest, cfg.train.batch_size, cfg.train.grad_accum)
    cfg.check_run_length()


def loss_function(cfg: OptimConfig, loss: str, task: str) -> Callable:
    """The training loss: evaluate.LOSSES[loss], with optim.label_smoothing for cross-entropy."""
    from replica_dist.evaluate import LOSSES

    if cfg.label_smoothing == 0:
        return LOSSES[loss]
    if task != "classification":
        raise ConfigError(f"optim.label_smoothing is for classification only; the data are a {task}")
    return functools.partial(F.cross_entropy, label_smoothing=cfg.label_smoothing)


class Precision:
    """train.precision: autocast around forward and loss; for fp16 a gradient scaler too.

    fp16 overflow is the scaler's routine, not a non-finite value for the guard: `unscale_`
    turns the gradients back to their true size (so clipping and the guard see them); if
    any overflowed, this replica's gradients are dropped (set to None), so the optimizer
    step the coupling then takes leaves every parameter and its optimizer state as it was,
    as GradScaler.step would, and the scale is lowered. The coupling's collectives and pull
    go on as on any other step, identically on every rank. Under DDP the ranks of a replica
    hold the same all-reduced gradients and so drop them together."""

    def __init__(self, precision: str, device: torch.device):
        if precision == "fp16" and device.type != "cuda":
            raise ConfigError(
                f"train.precision=fp16 needs a CUDA device (this run is on {device.type}); use bf16"
            )
        self.device_type = device.type
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.overflowed_steps = 0

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: true gradients, or none at all where the scaled ones overflowed (one host sync,
        as GradScaler.step has)."""
        if self.scaler is None:
            return
        if unscale_or_drop_gradients(self.scaler, optimizer):
            self.overflowed_steps += 1
        self.scaler.update()

    def state_dict(self) -> dict:
        return {
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "overflowed": self.overflowed_steps,
        }

    def load_state_dict(self, state: dict) -> None:
        if self.scaler and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.overflowed_steps = int(state["overflowed"])


def forward_backward(
    net: nn.Module, forward: Callable, batches, loss_fn: Callable, grad_accum: int, precision: Precision
) -> torch.Tensor:
    """grad_accum micro-batches into the parameters' .grad (each loss scaled by 1/grad_accum,
    so the gradient is that of their mean); returns their mean loss, detached. `net` is the
    module whose DDP no_sync skips the all-reduce of all but the last micro-batch; `forward`
    runs it (itself, or compiled)."""
    total = None
    for i in range(grad_accum):
        x, y = batches.next()
        last = i == grad_accum - 1
        skip_sync = net.no_sync() if not last and hasattr(net, "no_sync") else contextlib.nullcontext()
        with skip_sync:
            with precision.autocast():
                loss = loss_fn(forward(x), y)
            if grad_accum > 1:
                loss = loss / grad_accum
            precision.backward(loss)
        total = loss.detach() if total is None else total + loss.detach()
    return total


def clip_(parameters, max_norm: float) -> None:
    """Clip the global gradient norm to max_norm (0: off). foreach, and no check of the norm
    for non-finite values (error_if_nonfinite would sync with the host): a non-finite norm
    leaves non-finite gradients, which the guard then sees."""
    if max_norm > 0:
        torch.nn.utils.clip_grad_norm_(parameters, max_norm, foreach=True)


def compiled(net: nn.Module, enabled: bool) -> Callable:
    """The callable that runs the forward pass: `net` under torch.compile when train.compile.
    The parameters stay the original module's, which the coupling and the optimizer hold."""
    return torch.compile(net) if enabled else net
