"""The schema of the coupling: coupling.*, its choice of form and its eta schedule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from replica_dist.config.checks import _check, _check_choices, add_choices

CouplingName = Literal["tanh", "linear", "average", "none", "ddp", "diloco"]
add_choices({"CouplingName": CouplingName})
if not TYPE_CHECKING:
    CouplingName = str

DEFAULT_ETA_FINAL = 0.4
"""Where the default eta schedule of tanh and linear ends, at the last step (docs/study.md)."""


@dataclass
class CouplingConfig:
    name: CouplingName = "tanh"
    """Coupling form. tanh: w += eta*tanh((mean - w)/T), the note's rule. linear:
    w += eta*(mean - w), elastic averaging. average: w = mean of the post-step weights
    (local SGD). none: independent replicas. ddp: DistributedDataParallel, one model.
    diloco: every `every` (= H) steps an outer SGD step with Nesterov momentum on the shared
    weights, along the replicas' mean pseudo-gradient (weights at the last sync minus now);
    every replica continues from the result (DiLoCo, arXiv 2311.08105)."""
    eta: float = 0.001
    """Coupling strength eta_0 (tanh, linear); for tanh it bounds the pull per weight and step
    (chosen by the study: docs/study.md)."""
    eta_growth: float | None = None
    """A schedule tied to steps, not to the run: eta_t = min(eta_max, eta_0 * (1 + g)^t), t
    counted in steps from 0; 0 gives a constant eta. Set it or coupling.eta_final, not both."""
    eta_final: float | None = None
    """eta at the last step (train.steps): eta grows geometrically from eta_0 at step 1 to
    eta_final at the last step, whatever the run's length. When neither this nor
    coupling.eta_growth is set, tanh and linear take min(0.4, coupling.eta_max): the shape the
    study chose (docs/study.md: 0.001 to 0.4), stated relative to the run so that any
    train.steps or train.epochs is coupled."""
    eta_max: float = 1.0
    """Cap of the scoped eta. For linear, above 1 the pull overshoots the mean."""
    temperature: float = 1.0
    """tanh only: T in tanh((mean - w)/T). Small T gives a sign-like, clipped pull."""
    every: int = 1
    """Couple on every k-th step, steps counted from 1 (chosen by the study: docs/study.md).
    For diloco the outer period H: one outer step every H inner steps."""
    via_optimizer: bool = False
    """tanh, linear: apply the pull as a gradient term (minus the pull, i.e. the gradient
    of the coupling potential), so momentum and weight decay see it (with SGD a parameter
    then moves by lr*pull; floating buffers, which no optimizer steps, still take the pull
    directly). Default: added to the weights directly after the optimizer step."""
    outer_lr: float = 0.7
    """diloco: the outer optimizer's learning rate (DiLoCo's 0.7). With outer_lr=1 and
    outer_momentum=0 the outer step lands on the replicas' mean: diloco is then average."""
    outer_momentum: float = 0.9
    """diloco: the outer optimizer's momentum, in [0, 1) (DiLoCo's 0.9)."""
    outer_nesterov: bool = True
    """diloco: Nesterov momentum for the outer step (DiLoCo's choice); false: heavy ball.
    Without momentum (outer_momentum=0) both are plain SGD."""
    fragments: int = 1
    """Split the model into this many fragments, contiguous groups of whole tensors of about
    equal size (in the order of named_parameters, then the floating buffers), each coupled
    every `every` steps on a staggered schedule: one fragment every every/fragments steps
    (Streaming DiLoCo), so each exchange carries about 1/fragments of the model. Must divide
    `every`, and be at most the model's number of tensors."""

    def __post_init__(self) -> None:
        _check_choices(self, "coupling.")
        _check(self.eta > 0, f"coupling.eta must be > 0; got {self.eta}")
        _check(
            self.eta_growth is None or self.eta_final is None,
            f"coupling.eta_growth={self.eta_growth} and coupling.eta_final={self.eta_final} both set the "
            f"eta schedule (per step, or relative to the run); drop one",
        )
        _check(
            self.eta_growth is None or self.eta_growth >= 0,
            f"coupling.eta_growth must be >= 0; got {self.eta_growth}",
        )
        _check(
            self.eta_max >= self.eta,
            f"coupling.eta_max must be >= coupling.eta ({self.eta}); got {self.eta_max}",
        )
        _check(
            self.name != "linear" or self.eta_max <= 1,
            f"coupling.eta_max must be <= 1 for coupling.name=linear (beyond 1 the pull "
            f"overshoots the mean); got {self.eta_max}",
        )
        _check(
            self.eta_final is None or 0 < self.eta_final <= self.eta_max,
            f"coupling.eta_final must be in (0, coupling.eta_max={self.eta_max}]; got {self.eta_final}",
        )
        _check(self.temperature > 0, f"coupling.temperature must be > 0; got {self.temperature}")
        _check(
            self.every >= 1 or self.name != "diloco",
            f"coupling.every (the outer period H of coupling.name=diloco) must be >= 1; got {self.every}",
        )
        _check(self.every >= 1, f"coupling.every must be >= 1; got {self.every}")
        _check(self.outer_lr > 0, f"coupling.outer_lr must be > 0; got {self.outer_lr}")
        _check(
            0 <= self.outer_momentum < 1,
            f"coupling.outer_momentum must be in [0, 1); got {self.outer_momentum}",
        )
        _check(
            not self.via_optimizer or self.name in ("tanh", "linear"),
            f"coupling.via_optimizer is only for coupling.name=tanh or linear; got {self.name}",
        )
        _check(self.fragments >= 1, f"coupling.fragments must be >= 1; got {self.fragments}")
        _check(
            self.fragments == 1 or self.name in ("tanh", "linear", "average", "diloco"),
            f"coupling.fragments is only for coupling.name=tanh, linear, average or diloco; got {self.name}",
        )
        _check(
            self.every % self.fragments == 0,
            f"coupling.fragments must divide coupling.every ({self.every}), so that each fragment "
            f"couples every {self.every} steps, one every every/fragments; got {self.fragments}",
        )

    @property
    def eta_end(self) -> float | None:
        """eta at the last step of a schedule relative to the run: coupling.eta_final, or, when
        neither it nor coupling.eta_growth is set, the default min(0.4, eta_max) (never below
        eta_0: a larger eta_0 stays constant); None for a schedule per step (eta_growth)."""
        if self.eta_final is not None:
            return self.eta_final
        if self.eta_growth is not None:
            return None
        return max(self.eta, min(DEFAULT_ETA_FINAL, self.eta_max))


COUPLING_APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    "coupling.eta": ("coupling", ("tanh", "linear")),
    "coupling.eta_growth": ("coupling", ("tanh", "linear")),
    "coupling.eta_final": ("coupling", ("tanh", "linear")),
    "coupling.eta_max": ("coupling", ("tanh", "linear")),
    "coupling.temperature": ("coupling", ("tanh",)),
    "coupling.every": ("coupling", ("tanh", "linear", "average", "diloco")),
    "coupling.via_optimizer": ("coupling", ("tanh", "linear")),
    "coupling.outer_lr": ("coupling", ("diloco",)),
    "coupling.outer_momentum": ("coupling", ("diloco",)),
    "coupling.outer_nesterov": ("coupling", ("diloco",)),
    "coupling.fragments": ("coupling", ("tanh", "linear", "average", "diloco")),
}
"""The coupling's rows of replica_dist.config.overrides.APPLIES_TO."""
