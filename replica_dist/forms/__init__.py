"""Coupling forms as plug-ins: one module per form, and the registry that everything else reads.

    tanh     w <- w_opt + eta * tanh((mean - w) / T)    the note's rule (T = 1)
    linear   w <- w_opt + eta * (mean - w)              elastic averaging (eta = lr*gamma)
    average  w <- mean of the post-step weights         local SGD / model averaging
    diloco   anchor <- OuterSGD(anchor, mean(anchor - w)) and w <- anchor, after the step
    none     independent replicas
    ddp      DistributedDataParallel: the gradients averaged, one model

For tanh and linear, `w` and `mean` are the weights *before* the step, so all replicas move
at once from the same mean (the note's loop let replica 2 see replica 1's new weights; we
do not). ReplicaCoupling, the config, the progress line and the reports look a form up here
(`FORMS`, `form_class`) and ask it; none of them names one.

A form of one's own subclasses PullForm (or Form) and is used as
``ReplicaCoupling(model, optimizer, MyForm(...))`` or, in the trainer,
``coupling._target_=my_pkg.MyForm coupling.KEY=VALUE ...`` (its keyword arguments).

The config reads this registry (names, settings, checks) in a process that has not loaded
torch (the launcher's): the form modules use torch only through the tensors they are handed,
and import anything else from torch where it is first used.
"""

from __future__ import annotations

from replica_dist.forms.average import Average
from replica_dist.forms.base import FEATURES, Form, PullForm, fragment_bounds, periodic_fragment
from replica_dist.forms.ddp import DataParallel
from replica_dist.forms.diloco import DiLoCo
from replica_dist.forms.elastic import eta_at
from replica_dist.forms.linear import Linear
from replica_dist.forms.none import Uncoupled
from replica_dist.forms.tanh import Tanh

FORMS: dict[str, type[Form]] = {
    form.name: form for form in (Tanh, Linear, Average, Uncoupled, DataParallel, DiLoCo)
}
"""The built-in forms by their coupling.name, in the order the docs list them."""
DEFAULT_FORM = Tanh.name
"""The trainer's coupling.name when none is chosen (CouplingConfig's default, ReplicaCoupling's)."""


def form_class(name: str) -> type[Form]:
    """The built-in form called `name`; KeyError naming the choices otherwise."""
    try:
        return FORMS[name]
    except KeyError:
        raise KeyError(f"no coupling form {name!r}; the forms are {', '.join(FORMS)}") from None


def fragment_at(cfg, step: int) -> int | None:
    """The fragment that the trainer's coupling settings `cfg` (a CouplingConfig of a built-in
    form) couple at `step` (counted from 1), or None."""
    return form_class(cfg.name).from_config(cfg, 1).fragment_at(step)


__all__ = [
    "DEFAULT_FORM",
    "FEATURES",
    "FORMS",
    "Form",
    "PullForm",
    "eta_at",
    "form_class",
    "fragment_at",
    "fragment_bounds",
    "periodic_fragment",
]
