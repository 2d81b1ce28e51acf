"""The schema of live fault tolerance: ft.*, and what a run under ft.enabled may not ask for yet.

Under ft.enabled each replica is its own torchrun job, and the replicas meet through torchft's
Lighthouse (replica_dist.ft). This module loads neither torch nor torchft: the launcher reads
the config before either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from replica_dist.config.checks import _check
from replica_dist.config.coupling import form_words
from replica_dist.forms import FORMS

LIGHTHOUSE_ENV = "TORCHFT_LIGHTHOUSE"
"""The environment variable torchft's Manager reads the Lighthouse's address from."""
FT_FEATURE = "fault_tolerant"
"""The forms' feature (Form.supports) of a step defined with replicas missing."""


def ft_forms() -> list[str]:
    """The built-in forms whose step with missing replicas is defined, in the registry's order."""
    return [name for name, form in FORMS.items() if FT_FEATURE in form.supports]


def majority(replicas: int) -> int:
    """The smallest number of replicas that is more than half of `replicas`."""
    return replicas // 2 + 1


@dataclass
class FtConfig:
    enabled: bool = False
    """Live fault tolerance: this job trains one replica (ft.replica_id) of a run of ft.replicas
    replica jobs that meet through torchft's Lighthouse (ft.lighthouse) at every step; a lost
    replica does not stop the others, and it heals from a live one when its job restarts it.
    Needs the ft extra (pip install 'replica_dist[ft]'); see docs/fault_tolerance.md."""
    lighthouse: str = ""
    """The Lighthouse's address (http://HOST:PORT); '' takes the TORCHFT_LIGHTHOUSE environment
    variable, as torchft does."""
    replica_id: int = 0
    """This job's replica, 0 to ft.replicas - 1: its data shard, its initial weights, its files."""
    replicas: int = 2
    """How many replica jobs the run has (each its own torchrun job)."""
    min_replicas: int | None = None
    """The fewest replicas a step's quorum may hold (no split brain); unset, a majority of
    ft.replicas (ft.replicas // 2 + 1)."""
    timeout_s: float = 10.0
    """Seconds a collective among the replicas may take (the exchange of weights, the state a
    healing replica receives) before it fails and the step goes on without it: what bounds
    the time to notice a lost replica in an exchange. Must be below ft.quorum_timeout_s."""
    quorum_timeout_s: float = 60.0
    """Seconds a step waits for a quorum of ft.min_replicas replicas before the job fails (and
    torchrun restarts it). Above ft.timeout_s: a quorum may wait for a lost replica's
    heartbeat to expire or for a healing one to receive its state."""

    def __post_init__(self) -> None:
        if self.enabled and not self.lighthouse:
            self.lighthouse = os.environ.get(LIGHTHOUSE_ENV, "")
        _check(
            not self.enabled or bool(self.lighthouse),
            f"ft.lighthouse must be set (or the {LIGHTHOUSE_ENV} environment variable) when ft.enabled=true",
        )
        _check(self.replicas >= 1, f"ft.replicas must be >= 1; got {self.replicas}")
        _check(
            0 <= self.replica_id < self.replicas,
            f"ft.replica_id must be in [0, ft.replicas={self.replicas}); got {self.replica_id}",
        )
        _check(
            self.min_replicas is None or 1 <= self.min_replicas <= self.replicas,
            f"ft.min_replicas must be in [1, ft.replicas={self.replicas}]; got {self.min_replicas}",
        )
        _check(self.timeout_s > 0, f"ft.timeout_s must be > 0; got {self.timeout_s}")
        _check(
            self.quorum_timeout_s > self.timeout_s,
            f"ft.quorum_timeout_s must be > ft.timeout_s={self.timeout_s}; got {self.quorum_timeout_s}",
        )

    @property
    def quorum(self) -> int:
        """ft.min_replicas, or its default: a majority of ft.replicas."""
        return self.min_replicas if self.min_replicas is not None else majority(self.replicas)


def check_ft_run(cfg) -> None:
    """What a run under ft.enabled (`cfg`, a Config) cannot ask for yet, one ConfigError each."""
    if not cfg.ft.enabled:
        return
    _check(
        not cfg.coupling._target_ and cfg.coupling.name in ft_forms(),
        f"{form_words(cfg.coupling)} is not available with ft.enabled yet (a step with missing replicas is defined for "
        f"{', '.join(ft_forms())} only)",
    )
    refused = (
        (f"parallel.dp={cfg.parallel.dp}", cfg.parallel.dp == 1, "each replica job is one rank for now"),
        (
            f"parallel.shard={cfg.parallel.shard}",
            cfg.parallel.shard == 1,
            "each replica job is one rank for now",
        ),
        (
            f"dist.compress={cfg.dist.compress}",
            cfg.dist.compress == "none",
            "torchft's allreduce sends the weights as they are",
        ),
        (
            f"coupling.fragments={cfg.coupling.fragments}",
            cfg.coupling.fragments == 1,
            "the exchange sends the whole model",
        ),
        ("coupling.via_optimizer=true", not cfg.coupling.via_optimizer, "the pull is added to the weights"),
        ("checkpoint.remap=true", not cfg.checkpoint.remap, "a replica job keeps its own replica"),
        (
            f"train.epochs={cfg.train.epochs}",
            cfg.train.epochs == 0,
            "set train.steps: every replica takes as many",
        ),
        ("train.init_from", not cfg.train.init_from, "a replica starts from its own seed, or heals"),
        (f"init={cfg.init}", cfg.init == "independent", "a replica's first weights come from its own seed"),
    )
    for setting, ok, why in refused:
        _check(ok, f"{setting} is not available with ft.enabled yet ({why})")
