"""The coupling between replicas, as pure tensor functions of a replica's weights and the mean.

Each step every replica first takes its own optimizer step; then, on coupling steps, it is
moved by `pull(...)`:

    tanh     w <- w_opt + eta * tanh((mean - w) / T)    the note's rule (T = 1)
    linear   w <- w_opt + eta * (mean - w)              elastic averaging (eta = lr*gamma)
    average  w <- mean of the post-step weights         local SGD / model averaging

For tanh and linear, `w` and `mean` are the weights *before* the step, so all replicas move
at once from the same mean (the note's loop let replica 2 see replica 1's new weights; we
do not). `none` never couples and `ddp` averages gradients instead (DistributedDataParallel).
"""

from __future__ import annotations

import math

import torch

from replica_dist.config import CouplingConfig

ELASTIC_FORMS = ("tanh", "linear")
"""Forms that pull toward the mean of the pre-step weights."""


def pull(
    form: str, w: torch.Tensor, mean: torch.Tensor, eta: float, temperature: float = 1.0
) -> torch.Tensor:
    """The coupling's move of weights `w` toward the replicas' `mean` (same shape)."""
    return pull_from_gap_(form, mean - w, eta, temperature)


def pull_from_gap_(form: str, gap: torch.Tensor, eta: float, temperature: float = 1.0) -> torch.Tensor:
    """`pull`, computed in place from gap = mean - w and returned: the loop turns its
    exchange buffer into the pull this way, with no new full-size tensor per step."""
    if form == "tanh":
        if temperature != 1.0:  # x / 1 == x exactly: skipping it changes no bit
            gap.div_(temperature)
        return gap.tanh_().mul_(eta)
    if form == "linear":
        return gap.mul_(eta)
    if form == "average":
        return gap
    raise ValueError(f"no pull for coupling form {form!r}")


def eta_at(cfg: CouplingConfig, step: int) -> float:
    """Coupling strength at `step` (counted from 1): eta_0 * (1 + g)^(step - 1), capped at
    eta_max. With g > 0 the replicas are drawn together ever harder ("scoping")."""
    # In log space: (1 + g)^t overflows a float long before long runs end; the cap does not.
    log_eta = math.log(cfg.eta) + (step - 1) * math.log1p(cfg.eta_growth)
    return min(cfg.eta_max, math.exp(min(log_eta, math.log(cfg.eta_max))))


def is_coupling_step(cfg: CouplingConfig, step: int) -> bool:
    """Whether the replicas are coupled at `step` (counted from 1)."""
    return cfg.name in (*ELASTIC_FORMS, "average") and step % cfg.every == 0
