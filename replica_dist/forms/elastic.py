"""What tanh and linear share: a pull toward the mean of the weights before the step, with a
strength eta that follows a schedule (replica_dist.forms.tanh, replica_dist.forms.linear)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from replica_dist.forms.base import FEATURES, Form, periodic_fragment

if TYPE_CHECKING:
    import torch

    from replica_dist.flat import FlatState

ETA_SCHEDULE = ("eta", "eta_growth", "eta_final", "eta_max")
"""The coupling keys of the eta schedule."""
STUDY_ETA_FINAL = 0.4
"""Where the schedule docs/study.md chose (eta 0.001, growth 0.004 over 1500 steps) ends."""


def eta_at(cfg, step: int, steps: int) -> float:
    """Coupling strength at `step` (counted from 1) of a run of `steps` steps, capped at eta_max,
    for the settings `cfg` (a CouplingConfig).

    eta_growth set: eta_0 * (1 + g)^(step - 1), g = eta_growth. Otherwise the geometric
    schedule from eta_0 at step 1 to cfg.eta_end (eta_final, or its default) at step `steps`,
    whatever the run's length (a one-step run takes that end). With g > 0 or an end above
    eta_0 the replicas are drawn together ever harder ("scoping")."""
    # In log space: (1 + g)^t overflows a float long before long runs end; the cap does not.
    end = cfg.eta_end
    if end is None:
        log_eta = math.log(cfg.eta) + (step - 1) * math.log1p(cfg.eta_growth)
    elif steps == 1:
        log_eta = math.log(end)
    else:
        log_eta = math.log(cfg.eta) + (step - 1) / (steps - 1) * math.log(end / cfg.eta)
    return min(cfg.eta_max, math.exp(min(log_eta, math.log(cfg.eta_max))))


def _g(value: float) -> str:
    return f"{value:.3g}"


class Elastic(Form):
    """w += eta * rule(mean - w), mean of the pre-step weights, every `every` steps (one
    fragment at a time with fragments > 1); a subclass writes the rule into `_shape_`."""

    moment = "before"
    settings = (*ETA_SCHEDULE, "every", "via_optimizer", "fragments")
    supports = frozenset(FEATURES)

    def __init__(self, cfg, steps: int = 1):
        self.cfg = cfg
        self.steps = steps
        self.every, self.fragments, self.via_optimizer = cfg.every, cfg.fragments, cfg.via_optimizer
        self._constant = cfg.eta_final is None and cfg.eta_growth == 0

    @classmethod
    def from_config(cls, cfg, steps: int) -> Elastic:
        return cls(cfg, steps)

    def fragment_at(self, step: int) -> int | None:
        return periodic_fragment(step, self.every, self.fragments)

    def scale(self, step: int) -> float:
        if self._constant:  # exactly eta: not exp(log(eta))
            return min(self.cfg.eta, self.cfg.eta_max)
        return eta_at(self.cfg, step, self.steps)

    def direction_(
        self, total: torch.Tensor, part: FlatState, n: int, apply: torch.Tensor, step: int
    ) -> torch.Tensor:
        """The pull / eta, in place in `total`: in four passes over the buffer (the mean's
        division folded into the gap's scale, eta into the caller's add), where the textbook
        order takes seven. Equal to replica_dist.reference's rule up to rounding."""
        part.subtract_from(total, alpha=n)  # n * (mean - w_before)
        # A skipped step scales its gaps by 0, decided on the device. A gap that is not finite
        # (a replica's overflowed weights, the reason for the skip) then gives NaN, which the
        # last pass zeroes: cheaper than a masked fill, which is not vectorised on a CPU. An
        # applied step has finite weights everywhere, so its pull holds no NaN to zero.
        self._shape_(total.mul_(apply.to(total.dtype) * self._gap_scale(n)))
        return total.nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf)

    def _gap_scale(self, n: int) -> float:
        """The factor that turns n * (mean - w) into the rule's argument."""
        raise NotImplementedError

    def _shape_(self, scaled_gaps: torch.Tensor) -> None:
        """The rule, in place, on the scaled gaps (nothing for a linear rule)."""

    def words(self) -> list[str]:
        first, last = self.scale(1), self.scale(self.steps)
        words = [self.name, f"eta {_g(first)}" if first == last else f"eta {_g(first)} to {_g(last)}"]
        words += self._rule_words()
        if self.via_optimizer:
            words.append("via optimizer")
        if self.every != 1:
            words.append(f"every {self.every}")
        return words

    def _rule_words(self) -> list[str]:
        return []

    def notes(self, steps: int) -> list[str]:
        note = schedule_note(self.cfg, steps)
        return [note] if note else []


def schedule_note(cfg, steps: int) -> str | None:
    """One line when a growing schedule, set by its growth per step, ends far below where the
    study's shape ends (a shortened run that keeps eta_growth barely couples); None otherwise.
    A constant eta and a set eta_final are the user's own choices and get no note; neither
    does a schedule that reaches a tenth of an eta_max below the study's end."""
    if cfg.eta_end is not None or not cfg.eta_growth:
        return None
    target = min(STUDY_ETA_FINAL, cfg.eta_max)
    last = eta_at(cfg, steps, steps)
    if last >= target / 10:
        return None
    return (
        f"coupling: eta reaches only {last:.2g} at the last step of {steps}; "
        f"coupling.eta_final={target:g} keeps the shape the study chose"
    )
