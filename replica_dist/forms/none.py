"""none: independent replicas, the baseline without coupling."""

from __future__ import annotations

from replica_dist.forms.base import Form


class Uncoupled(Form):
    """Independent replicas: they exchange only the guard's words, on the steps that ask for it
    (observed or agreed steps). Their mean of weights is no model (`couples` is false)."""

    name = "none"
    supports = frozenset({"remap", "replica_dp", "sharded"})
    why_not = {"compression": "it exchanges no weights"}
