"""diloco: every H steps an outer SGD step with (Nesterov) momentum on the weights of the last
sync, along the replicas' mean pseudo-gradient (DiLoCo, arXiv 2311.08105)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica_dist.errors import ConfigError
from replica_dist.forms.base import Form, periodic_fragment

if TYPE_CHECKING:  # at run time the tensors' own methods: the config reads this module without torch
    import torch

    from replica_dist.flat import FlatState


class DiLoCo(Form):
    """Every H = `every` steps, after the optimizer step, one outer step on the anchor (the
    weights at the last sync, the same on every replica) along the replicas' mean
    pseudo-gradient, anchor - w; then every replica loads the new anchor.

    The outer optimizer is torch.optim.SGD (momentum outer_momentum, Nesterov unless
    outer_nesterov=false, lr outer_lr) on the anchor's parameters, so the update is PyTorch's:
    buf <- mu*buf + delta; anchor <- anchor - lr*(delta + mu*buf) (Nesterov), or
    anchor - lr*buf. It holds two more copies of the parameters (the anchor, the momentum).

    Floating buffers (BatchNorm's running statistics) are no parameters: they take the
    replicas' mean at each sync (as with average), not the outer step, whose momentum could
    extrapolate a running variance below zero. With outer_lr=1 and outer_momentum=0 the
    outer step lands on the mean too, and diloco is average up to rounding.

    The first anchor is the replicas' mean of their starting weights (one all_reduce at
    construction), loaded into every replica, so all begin identical as under DDP. A failed
    sync (a replica's non-finite step) is skipped: the anchor and momentum stay, each replica
    keeps its weights and the next sync spans 2H steps. No remap: the outer state belongs to
    the replicas that saved it."""

    name = "diloco"
    moment = "after"
    settings = ("every", "fragments", "outer_lr", "outer_momentum", "outer_nesterov")
    supports = frozenset({"compression", "replica_dp"})
    why_not = {
        "remap": "its outer state, the weights at the last sync and their momentum, belongs to the "
        "replicas that saved it",
        "sharded": "its outer state on local shards is not built yet",
    }

    def __init__(
        self,
        every: int = 1,
        fragments: int = 1,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
    ):
        self.every, self.fragments = every, fragments
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.nesterov = outer_nesterov and outer_momentum > 0

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.every < 1:
            raise ConfigError(
                f"coupling.every (the outer period H of coupling.name=diloco) must be >= 1; got {cfg.every}"
            )

    @classmethod
    def from_config(cls, cfg, steps: int) -> DiLoCo:
        return cls(cfg.every, cfg.fragments, cfg.outer_lr, cfg.outer_momentum, cfg.outer_nesterov)

    def fragment_at(self, step: int) -> int | None:
        return periodic_fragment(step, self.every, self.fragments)

    def attach(self, state: FlatState, fragments: list[FlatState], replica_mean) -> None:
        """Start from the replicas' mean, and build one outer parameter per fragment: a slice
        of the anchor, so that a fragment's outer step moves only its own part."""
        self.anchor = replica_mean(state.pack())
        state.load(self.anchor)
        param_numel = sum(t.numel() for t in state.tensors[: state.num_params])
        self.parts = []  # per fragment: (its parameters' slice of the anchor or None, its buffers' slice)
        self.offsets = []
        for part in fragments:
            end = part.offset + part.numel
            split = min(max(part.offset, param_numel), end)
            params = self.anchor[part.offset : split] if split > part.offset else None
            self.parts.append((params, self.anchor[split:end]))
            self.offsets.append((part.offset, end))
        from torch.optim import SGD  # here: the config imports this module, and no torch (forms/__init__)

        self.outer = SGD(
            [params for params, _ in self.parts if params is not None],
            lr=self.outer_lr,
            momentum=self.outer_momentum,
            nesterov=self.nesterov,
            fused=True,
        )
        if self.outer_momentum > 0:
            # A fused SGD's first step would fill the buffer from the gradient whatever its
            # found_inf says; a zero buffer gives the same first step (mu*0 + delta) and lets
            # a skipped first step leave it untouched, on the device.
            for params in self.outer.param_groups[0]["params"]:
                self.outer.state[params]["momentum_buffer"] = params.new_zeros(params.shape)

    def send_(self, part: FlatState, flat: torch.Tensor, fragment: int) -> torch.Tensor:
        """The pseudo-gradient, anchor - w after the step."""
        part.pack(out=flat)
        return flat.neg_().add_(self._anchor_of(fragment))

    def receive_(
        self, part: FlatState, mean: torch.Tensor, apply: torch.Tensor, fragment: int, spare: torch.Tensor
    ) -> None:
        """The outer step along the mean pseudo-gradient where `apply` holds, then every
        replica loads the anchor; a skipped sync keeps each replica's own weights, chosen on
        the device in `spare`, with no read back."""
        self._outer_step_(fragment, mean, apply)
        weights = part.pack(out=spare)
        part.load(self._anchor_of(fragment).where(apply, weights))

    def _outer_step_(self, fragment: int, mean_delta: torch.Tensor, apply: torch.Tensor) -> None:
        """The outer step of `fragment` along `mean_delta` (laid out as that fragment), only
        where `apply` (a device bool) holds: a skipped sync leaves its anchor and momentum as
        they were, on the device. The optimizer steps only the parameter whose gradient is
        set: this fragment's."""
        params, buffers = self.parts[fragment]
        if params is not None:
            params.grad = mean_delta[: params.numel()]
            self.outer.found_inf = (~apply).float()
            try:
                self.outer.step()
            finally:
                del self.outer.found_inf
                params.grad = None
        if buffers.numel():
            mean_buffers = buffers - mean_delta[mean_delta.numel() - buffers.numel() :]
            buffers.copy_(mean_buffers.where(apply, buffers))

    def _anchor_of(self, fragment: int) -> torch.Tensor:
        first, end = self.offsets[fragment]
        return self.anchor[first:end]

    def state_dict(self) -> dict:
        return {"anchor": self.anchor.clone(), "outer_optimizer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.anchor.copy_(state["anchor"])
        self.outer.load_state_dict(state["outer_optimizer"])

    def words(self) -> list[str]:
        return [
            self.name,
            f"H {self.every}",
            f"outer lr {self.outer_lr:.3g}",
            f"{'Nesterov ' if self.nesterov else ''}momentum {self.outer_momentum:.3g}",
        ]
