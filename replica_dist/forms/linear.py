"""linear: w += eta * (mean - w), elastic averaging (eta = lr * gamma of EASGD)."""

from __future__ import annotations

from replica_dist.errors import ConfigError
from replica_dist.forms.elastic import Elastic


class Linear(Elastic):
    """Elastic averaging: a pull proportional to the gap, which overshoots the mean beyond eta 1."""

    name = "linear"
    advice = ": the coupling may be too strong (a lower coupling.eta)"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.eta_max > 1:
            raise ConfigError(
                f"coupling.eta_max must be <= 1 for coupling.name=linear (beyond 1 the pull "
                f"overshoots the mean); got {cfg.eta_max}"
            )

    def _gap_scale(self, n: int) -> float:
        return 1.0 / n
