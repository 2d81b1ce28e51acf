"""The schema of the coupling: coupling.*, its choice of form and its eta schedule."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from replica_dist.config.checks import CHOICES, _check, _check_choices
from replica_dist.errors import ConfigError
from replica_dist.forms import DEFAULT_FORM, FORMS, Form, form_class
from replica_dist.targets import locate_target

CouplingName = str
"""A built-in form's name: a key of replica_dist.forms.FORMS."""
CHOICES["CouplingName"] = tuple(FORMS)

DEFAULT_ETA_FINAL = 0.4
"""Where the default eta schedule of tanh and linear ends, at the last step (docs/study.md)."""


@dataclass
class CouplingConfig:
    name: CouplingName = DEFAULT_FORM
    """Coupling form. A name of replica_dist.forms.FORMS: tanh: w += eta*tanh((mean - w)/T), the
    note's rule. linear: w += eta*(mean - w), elastic averaging. average: w = mean of the
    post-step weights (local SGD). none: independent replicas. ddp: DistributedDataParallel,
    one model. diloco: every `every` (= H) steps an outer SGD step with Nesterov momentum on
    the shared weights, along the replicas' mean pseudo-gradient (weights at the last sync
    minus now); every replica continues from the result (DiLoCo, arXiv 2311.08105)."""
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

    _target_: str = ""
    """A coupling form of one's own instead of the built-in ones: a dotted path to a subclass
    of replica_dist.forms.Form (my_pkg.forms.MyForm), built with the arguments in `kwargs`.
    coupling.name and its settings are then unused, and refused on the command line."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    """_target_ only: its keyword arguments. `coupling.KEY=VALUE` (or +coupling.KEY=VALUE) for
    a KEY that is not one of the keys above lands here, as does coupling.kwargs.KEY=VALUE."""

    def __post_init__(self) -> None:
        _check(
            bool(self._target_) or not self.kwargs,
            f"coupling.kwargs are arguments of a form chosen by coupling._target_, which is not set; "
            f"got coupling.kwargs.{next(iter(self.kwargs), '')}",
        )
        _check_choices(self, "coupling.")
        form = form_class(self.name)
        form.check(self)
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
            self.eta_final is None or 0 < self.eta_final <= self.eta_max,
            f"coupling.eta_final must be in (0, coupling.eta_max={self.eta_max}]; got {self.eta_final}",
        )
        _check(self.temperature > 0, f"coupling.temperature must be > 0; got {self.temperature}")
        _check(self.every >= 1, f"coupling.every must be >= 1; got {self.every}")
        _check(self.outer_lr > 0, f"coupling.outer_lr must be > 0; got {self.outer_lr}")
        _check(
            0 <= self.outer_momentum < 1,
            f"coupling.outer_momentum must be in [0, 1); got {self.outer_momentum}",
        )
        _check(self.fragments >= 1, f"coupling.fragments must be >= 1; got {self.fragments}")
        for key in ("via_optimizer", "fragments"):  # they change what the coupling builds
            changed = getattr(self, key) != _DEFAULTS[key]
            _check(
                not changed or key in form.settings,
                f"coupling.{key} is only for coupling.name={_or(forms_reading(key))}; got {self.name}",
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


def locate_form(cfg: CouplingConfig) -> type[Form]:
    """The class of the form `cfg` chooses: the built-in coupling.name, or coupling._target_
    imported (a ConfigError naming it where it is no replica_dist.forms.Form)."""
    if not cfg._target_:
        return form_class(cfg.name)
    target = locate_target("coupling._target_", cfg._target_, "a coupling form")
    if not (isinstance(target, type) and issubclass(target, Form)):
        raise ConfigError(
            f"coupling._target_={cfg._target_}: not a subclass of replica_dist.forms.Form "
            f"(PullForm for a pull toward the mean)"
        )
    return target


def form_words(cfg: CouplingConfig) -> str:
    """The form as the user chose it, to name it in a message."""
    return f"coupling._target_={cfg._target_}" if cfg._target_ else f"coupling.name={cfg.name}"


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CouplingConfig)}


def forms_reading(key: str) -> tuple[str, ...]:
    """The built-in forms whose settings include coupling.`key`."""
    return tuple(name for name, form in FORMS.items() if key in form.settings)


def _or(names: tuple[str, ...]) -> str:
    return " or ".join(", ".join(names).rsplit(", ", 1))


COUPLING_SETTINGS = tuple(key for key in _DEFAULTS if key not in ("_target_", "kwargs"))
"""The built-in forms' keys (coupling.name among them)."""

COUPLING_APPLIES_TO: dict[str, tuple[str, tuple[str, ...]]] = {
    f"coupling.{key}": ("coupling", forms_reading(key)) for key in COUPLING_SETTINGS if key != "name"
}
"""The coupling's rows of replica_dist.config.overrides.APPLIES_TO, from the forms' settings."""
