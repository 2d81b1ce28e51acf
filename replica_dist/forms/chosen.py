"""The form that ReplicaCoupling's arguments, or the trainer's coupling settings, choose."""

from __future__ import annotations

import difflib
import re

from replica_dist.config import CouplingConfig
from replica_dist.config.coupling import locate_form
from replica_dist.errors import ConfigError, CouplingError
from replica_dist.forms import FORMS, Form, form_class

FORM_SETTINGS = {name: form.settings for name, form in FORMS.items()}
"""The schedule's settings (CouplingConfig's fields) that each built-in form reads;
ReplicaCoupling refuses any other, which would change nothing."""

CONSTANT_ETA = {"eta_growth": 0.0}
"""ReplicaCoupling's schedule when neither eta_growth= nor eta_final= asks for one: a constant
eta (the trainer's default, CouplingConfig's, is relative to the run's length)."""


def form_of_arguments(form: str | Form, steps: int | None, schedule: dict) -> Form:
    """The form ReplicaCoupling's arguments ask for: a form object as it is, or a built-in
    form's name with its settings; a CouplingError naming the argument as the caller wrote it
    (`eta=`, not `coupling.eta`) for any that is unknown, means nothing for `form`, or holds a
    bad value."""
    if isinstance(form, Form):
        if schedule:
            raise CouplingError(
                f"{next(iter(schedule))}= is a setting of a built-in form by name; "
                f"{type(form).__name__} takes its settings in its own constructor"
            )
        return form
    if form not in FORMS:
        raise CouplingError(
            f"form must be one of {', '.join(FORMS)} or a form object (a forms.Form); got {form!r}"
        )
    settings = FORMS[form].settings
    known = [f for f in CouplingConfig.__dataclass_fields__ if f != "name"]
    unknown = sorted(set(schedule) - set(known))
    if unknown:
        close = difflib.get_close_matches(unknown[0], known, n=1)
        hint = f" (did you mean {close[0]}=?)" if close else ""
        raise CouplingError(f"ReplicaCoupling has no argument {unknown[0]}={hint}")
    unused = [key for key in schedule if key not in settings]
    if unused:
        used = ", ".join(f"{key}=" for key in settings) or "none of the schedule's settings"
        raise CouplingError(
            f"{', '.join(f'{key}=' for key in unused)} {'means' if len(unused) == 1 else 'mean'} "
            f"nothing for form {form!r}, which reads {used}"
        )
    try:
        asked = "eta_growth" in schedule or "eta_final" in schedule
        cfg = CouplingConfig(name=form, **(schedule if asked else CONSTANT_ETA | schedule))
    except ConfigError as err:
        raise CouplingError(as_arguments(str(err))) from None
    if cfg.eta_end is not None and steps is None:
        raise CouplingError("eta_final needs steps=, the run's length")
    return form_class(form).from_config(cfg, steps or 1)


def form_of_config(cfg: CouplingConfig, steps: int) -> Form:
    """The form the trainer's coupling settings describe: the built-in form coupling.name, or
    the user's coupling._target_ built with its arguments (coupling.kwargs), for a run of
    `steps` steps."""
    form = locate_form(cfg)  # the class the config checked when it was loaded
    return form(**cfg.kwargs) if cfg._target_ else form.from_config(cfg, steps)


def coupling_label(cfg: CouplingConfig) -> str:
    """The form of the trainer's coupling settings by name (summary.json's `coupling`): the
    built-in coupling.name, or a coupling._target_'s class name."""
    return cfg._target_.rsplit(".", 1)[-1] if cfg._target_ else cfg.name


def as_arguments(message: str) -> str:
    """A config message in ReplicaCoupling's words: coupling.name=linear as form linear,
    coupling.eta as eta=, dist.compress as compress=, guard.nonfinite as nonfinite=."""
    message = re.sub(r"coupling\.name=", "form ", message)
    return re.sub(r"(?:coupling|dist|guard)\.(\w+)=?", r"\1=", message)
