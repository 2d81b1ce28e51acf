"""The schema of the optimisation and of what a run does around it: optim.*, train.*, log.*,
eval.*, guard.*, checkpoint.*, flatness.*, and the keys that may change on resume."""

from __future__ import annotations

import fnmatch
import math
import os
from dataclasses import dataclass, field

from replica_dist.config.checks import (
    Dtype,
    Nonfinite,
    OptimName,
    Precision,
    Schedule,
    _check,
    _check_choices,
)


@dataclass
class OptimConfig:
    name: OptimName = "sgd"
    """Optimizer: sgd (with momentum / nesterov / weight decay) or adam."""
    lr: float = 0.05
    """Learning rate."""
    momentum: float = 0.9
    """sgd: momentum factor."""
    nesterov: bool = False
    """sgd: Nesterov momentum (needs momentum > 0)."""
    weight_decay: float = 0.0
    """L2 weight decay (coupled, as in torch.optim)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """adam: (beta1, beta2)."""
    schedule: Schedule = "constant"
    """Learning-rate schedule over the run's steps (t counted from 1, T = train.steps, W =
    warmup_steps): constant (lr); cosine (lr*t/W while t <= W, then from lr down to min_lr by
    a half cosine, min_lr at step T); step (lr*t/W while t <= W, then lr*gamma^floor((t-W-1)
    /step_size)). Logged every step as optim/lr."""
    warmup_steps: int = 0
    """Steps of linear warmup (lr*t/W at step t), for every schedule; must be < train.steps."""
    min_lr: float = 0.0
    """cosine: the learning rate at the last step (<= optim.lr)."""
    step_size: int = 100
    """step: steps between two decays by gamma."""
    gamma: float = 0.1
    """step: factor of each decay."""
    clip_norm: float = 0.0
    """Clip each replica's gradients to this global L2 norm (all parameters together) after
    the backward pass, before the optimizer step and the coupling's pull; 0: no clipping."""
    label_smoothing: float = 0.0
    """Classification only: cross-entropy against targets smoothed by this much, in [0, 1)."""

    def __post_init__(self) -> None:
        _check_choices(self, "optim.")
        _check(self.lr > 0, f"optim.lr must be > 0; got {self.lr}")
        _check(self.warmup_steps >= 0, f"optim.warmup_steps must be >= 0; got {self.warmup_steps}")
        _check(
            0 <= self.min_lr <= self.lr, f"optim.min_lr must be in [0, optim.lr={self.lr}]; got {self.min_lr}"
        )
        _check(self.step_size >= 1, f"optim.step_size must be >= 1; got {self.step_size}")
        _check(0 < self.gamma <= 1, f"optim.gamma must be in (0, 1]; got {self.gamma}")
        _check(self.clip_norm >= 0, f"optim.clip_norm must be >= 0 (0: off); got {self.clip_norm}")
        _check(
            0 <= self.label_smoothing < 1,
            f"optim.label_smoothing must be in [0, 1); got {self.label_smoothing}",
        )
        _check(0 <= self.momentum < 1, f"optim.momentum must be in [0, 1); got {self.momentum}")
        _check(
            not self.nesterov or self.momentum > 0,
            "optim.nesterov needs optim.momentum > 0",
        )
        _check(self.weight_decay >= 0, f"optim.weight_decay must be >= 0; got {self.weight_decay}")
        _check(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1); got {list(self.betas)}",
        )


@dataclass
class TrainConfig:
    steps: int = 1500
    """Optimizer steps taken by every replica."""
    batch_size: int = 32
    """Minibatch size of each rank: of each replica, or with parallel.dp=D of each of its D
    ranks (a shard smaller than this is used whole)."""
    dtype: Dtype = "float32"
    """Floating-point type of weights and data."""
    epochs: int = 0
    """If > 0, the run's length in passes over the data, in place of train.steps (setting both
    is refused): train.steps becomes epochs * floor(shard / batch_size) // grad_accum optimizer
    steps (at least 1), with `shard` the smallest training shard of any rank, so that every
    rank takes the same number of steps and no rank's pass is cut short by a partial batch."""
    grad_accum: int = 1
    """Micro-batches of train.batch_size per optimizer step, each loss scaled by 1/grad_accum
    (the gradient of one batch of grad_accum*batch_size); with DDP only the last one
    all-reduces its gradients."""
    precision: Precision = "fp32"
    """Forward pass and loss under autocast: fp32 (none), bf16 (CPU and CUDA), fp16 (CUDA only,
    with a gradient scaler: a step whose scaled gradients overflow applies no optimizer update
    on that replica, its pull still applies, and the scale is lowered; it is not a non-finite
    value for the guard). Weights, gradients and the coupling stay in train.dtype."""
    compile: bool = False
    """Run the forward pass through torch.compile (the first steps compile; needs a C compiler)."""
    init_from: str = ""
    """Warm start: a new run's initial weights from PATH instead of from the seed. A checkpoint
    folder (checkpoints/step-N) or a run directory (its final weights if it finished, else its
    newest checkpoint): every replica from its own saved replica (the same number of replicas);
    a weights file (weights/center.pt, weights/replica_<r>.pt): every replica from it. Only the
    weights and buffers: the optimizer, the lr schedule and the data order start fresh at step
    0. Ignored when the run resumes from its own checkpoint. '' (default): from the seed."""

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"train.steps must be >= 1; got {self.steps}")
        _check(self.batch_size >= 1, f"train.batch_size must be >= 1; got {self.batch_size}")
        _check(self.epochs >= 0, f"train.epochs must be >= 0 (0: use train.steps); got {self.epochs}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1; got {self.grad_accum}")
        _check(
            not self.init_from or os.path.exists(self.init_from),
            f"train.init_from={self.init_from}: no such file or directory (a checkpoint folder, "
            f"a run directory or a weights file)",
        )
        _check_choices(self, "train.")


RESUMABLE_KEYS: tuple[str, ...] = (
    "train.steps",
    "train.epochs",
    "train.init_from",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_steps",
    "optim.min_lr",
    "optim.step_size",
    "optim.gamma",
    "coupling.eta*",
    "log.*",
    "eval.every",
    "checkpoint.*",
    "guard.*",
    "dist.timeout_s",
    # How a run's replicas meet, not what they compute; checkpoints written before the ft
    # group existed resume under its defaults.
    "ft.*",
    "flatness.*",
)
"""The keys (fnmatch patterns of dotted keys) that may change when a run resumes: the learning
rate and its schedule, the coupling's eta schedule, the run's length (raised on a finished run,
it extends it), how often to log, evaluate and save, the guard's policy, how long to wait for a
collective, and the end-of-run flatness analysis. The run goes on from its checkpoint under the
new values (each change is logged); any other change is refused, naming the key."""


def may_change_on_resume(key: str) -> bool:
    """Whether the dotted config `key` may differ from the saved config when a run resumes."""
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUMABLE_KEYS)


@dataclass
class LogConfig:
    every: int = 20
    """Per-layer statistics and TensorBoard scalars on step 1, every k-th step and the last."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"log.every must be >= 1; got {self.every}")


@dataclass
class EvalConfig:
    every: int = 100
    """Test-set evaluation of replicas, center and ensemble every k steps and at the end."""
    batch_size: int = 1024
    """Samples per forward pass in evaluation: it streams over the training and test sets,
    so no dataset has to fit in memory at once."""

    def __post_init__(self) -> None:
        _check(self.every >= 1, f"eval.every must be >= 1; got {self.every}")
        _check(self.batch_size >= 1, f"eval.batch_size must be >= 1; got {self.batch_size}")


@dataclass
class GuardConfig:
    nonfinite: Nonfinite = "stop"
    """When a replica's loss, a gradient or a BatchNorm statistic is NaN or inf: `stop` (every
    rank stops with one error naming the replica and the step) or `skip` (that step is skipped
    by every replica when it communicates before its update, else by the replica that saw it;
    counted in guard/skipped_steps). Either way no non-finite update is applied; see guard.py."""
    max_consecutive_skips: int = 20
    """skip: stop when a replica has not applied this many steps in a row (checked at the next
    step that communicates: at once for coupling every step, within log.every steps for none
    and ddp)."""

    def __post_init__(self) -> None:
        _check_choices(self, "guard.")
        _check(
            self.max_consecutive_skips >= 1,
            f"guard.max_consecutive_skips must be >= 1; got {self.max_consecutive_skips}",
        )


@dataclass
class CheckpointConfig:
    every: int = 250
    """Every replica saves its whole state every k steps into <run_dir>/checkpoints/ (0: never)."""
    keep: int = 2
    """Complete checkpoints kept; older ones are deleted."""
    resume: bool = True
    """Continue from the newest complete checkpoint in the run directory, if there is one."""
    remap: bool = False
    """Allow resuming with another number of replicas: replica r that existed continues from
    its own weights and optimizer state; a new replica starts from the mean of the saved
    replicas with a fresh optimizer; surplus replicas are dropped. Shards are re-derived for
    the new number of replicas, so every replica's data order starts anew."""

    def __post_init__(self) -> None:
        _check(self.every >= 0, f"checkpoint.every must be >= 0 (0 disables); got {self.every}")
        _check(self.keep >= 1, f"checkpoint.keep must be >= 1; got {self.keep}")


@dataclass
class FlatnessConfig:
    sigmas: list[float] = field(default_factory=list)
    """Relative noise levels at which the local energy of the center and of every replica is
    measured at the end of training (empty: skip; `python -m replica_dist.flatness RUN_DIR`
    does the same afterwards)."""
    samples: int = 20
    """Draws of the noise per sigma (>= 2, for a standard error)."""

    def __post_init__(self) -> None:
        _check(
            all(math.isfinite(s) and s >= 0 for s in self.sigmas),
            f"flatness.sigmas must be finite and >= 0; got {list(self.sigmas)}",
        )
        _check(self.samples >= 2, f"flatness.samples must be >= 2; got {self.samples}")
