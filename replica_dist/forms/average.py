"""average: every `every` steps, w = the mean of the post-step weights (local SGD, model averaging)."""

from __future__ import annotations

from replica_dist.forms.base import FEATURES, Form, periodic_fragment


class Average(Form):
    """Local SGD: the replicas train apart and, every `every` steps, after the optimizer step,
    each takes their mean (PyTorch's PeriodicModelAverager does the same)."""

    name = "average"
    moment = "after"
    settings = ("every", "fragments")
    supports = frozenset(FEATURES)

    def __init__(self, every: int = 1, fragments: int = 1):
        self.every, self.fragments = every, fragments

    @classmethod
    def from_config(cls, cfg, steps: int) -> Average:
        return cls(cfg.every, cfg.fragments)

    def fragment_at(self, step: int) -> int | None:
        return periodic_fragment(step, self.every, self.fragments)

    def words(self) -> list[str]:
        return [self.name] + ([f"every {self.every}"] if self.every != 1 else [])
