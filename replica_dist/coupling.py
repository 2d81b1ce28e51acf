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


def eta_at(cfg: CouplingConfig, step: int, steps: int) -> float:
    """Coupling strength at `step` (counted from 1) of a run of `steps` steps, capped at eta_max.

    eta_final unset: eta_0 * (1 + g)^(step - 1), g = eta_growth. eta_final set: the geometric
    schedule from eta_0 at step 1 to eta_final at step `steps`, whatever the run's length (a
    one-step run takes eta_final). With g > 0 or eta_final > eta_0 the replicas are drawn
    together ever harder ("scoping")."""
    # In log space: (1 + g)^t overflows a float long before long runs end; the cap does not.
    if cfg.eta_final is None:
        log_eta = math.log(cfg.eta) + (step - 1) * math.log1p(cfg.eta_growth)
    elif steps == 1:
        log_eta = math.log(cfg.eta_final)
    else:
        log_eta = math.log(cfg.eta) + (step - 1) / (steps - 1) * math.log(cfg.eta_final / cfg.eta)
    return min(cfg.eta_max, math.exp(min(log_eta, math.log(cfg.eta_max))))


STUDY_ETA_FINAL = 0.4
"""Where the schedule docs/study.md chose (eta 0.001, growth 0.004 over 1500 steps) ends."""


def schedule_note(cfg: CouplingConfig, steps: int) -> str | None:
    """One line when a growing tanh/linear schedule, set by its growth per step, ends far below
    where the study's shape ends (a shortened run that keeps eta_growth barely couples);
    None otherwise. A constant eta and a set eta_final are the user's own choices and get no
    note; neither does a schedule that reaches a tenth of an eta_max below the study's end."""
    if cfg.name not in ELASTIC_FORMS or cfg.eta_final is not None or cfg.eta_growth == 0:
        return None
    target = min(STUDY_ETA_FINAL, cfg.eta_max)
    last = eta_at(cfg, steps, steps)
    if last >= target / 10:
        return None
    return (
        f"coupling: eta reaches only {last:.2g} at the last step of {steps}; "
        f"coupling.eta_final={target:g} keeps the shape the study chose"
    )


def stability_note(cfg: CouplingConfig, steps: int) -> str | None:
    """One line when a tanh pull will overshoot the mean: near the mean eta*tanh(gap/T) is a
    linear pull of slope eta/T, and above 2 each replica lands farther from the mean than it
    started, so the gaps grow until tanh saturates and every weight jumps by +-eta a step
    (a README example collapsed so at step 1340). None when eta/T stays at most 2."""
    if cfg.name != "tanh":
        return None
    first_bad = next((t for t in range(1, steps + 1) if eta_at(cfg, t, steps) / cfg.temperature > 2), None)
    if first_bad is None:
        return None
    return (
        f"coupling: eta/temperature exceeds 2 from step {first_bad} (eta {eta_at(cfg, first_bad, steps):.3g}, "
        f"T {cfg.temperature:g}): the tanh pull then overshoots the mean and can destroy the center; "
        f"keep coupling.eta_max <= 2*coupling.temperature"
    )


def is_coupling_step(cfg: CouplingConfig, step: int) -> bool:
    """Whether the replicas are coupled at `step` (counted from 1)."""
    return cfg.name in (*ELASTIC_FORMS, "average") and step % cfg.every == 0
