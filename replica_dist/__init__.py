"""replica_dist: coupled replicas of one network, one process each, pulled toward their mean."""

from replica_dist.coupling import CouplingError, ReplicaCoupling

__all__ = ["CouplingError", "ReplicaCoupling"]
