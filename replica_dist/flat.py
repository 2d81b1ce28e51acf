"""One flat vector that mirrors every parameter and floating-point buffer of a model.

The coupling exchanges the whole replica with one all_reduce of such a vector instead of one
call per tensor. Integer buffers (BatchNorm's step counter) are not weights and stay local.
The vectors live elsewhere (the coupling's exchange buffer, or a copy on logging steps), so
training holds no full-size copy of the model beyond the one it communicates.

Of a sharded model (replica_dist.shard: parameters that are DTensors) the vector holds this
rank's local shard of each parameter, and the whole floating buffers, which FSDP2 leaves
whole; `gather` makes a vector of the whole model from one of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class FlatState:
    def __init__(self, model: nn.Module):
        params = list(model.named_parameters())
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [name for name, _ in params + buffers]
        self._sharded = [t for _, t in params if isinstance(t, DTensor)]
        """The parameters that are DTensors (a sharded model's), each laid out in the vector as
        its local shard; empty for a model that is not sharded."""
        with torch.no_grad():  # views of the local shards, through which the weights are written
            self.tensors = [t.to_local() if isinstance(t, DTensor) else t for _, t in params + buffers]
        self.num_params = len(params)
        """The first `num_params` entries are parameters, the rest floating buffers."""
        self.numel = sum(t.numel() for t in self.tensors)
        self.offset = 0
        """Where this state's vector starts in the whole model's layout (a part's; see `part`)."""
        first = self.tensors[0]
        self.dtype, self.device = first.dtype, first.device
        # The floating buffers as they were before the forward pass moved them (small: BatchNorm).
        self._saved_buffers = [b.clone() for b in self.floating_buffers]
        self._viewed, self._views = None, []

    def part(self, first: int, end: int) -> FlatState:
        """Tensors first..end-1 of this layout as a state of their own (a coupling fragment):
        the same tensors and remembered buffers, shared, and a vector that is the slice
        [offset, offset + numel) of this state's."""
        part = object.__new__(FlatState)
        part.names, part.tensors = self.names[first:end], self.tensors[first:end]
        part.num_params = max(0, min(end, self.num_params) - first)
        part.numel = sum(t.numel() for t in part.tensors)
        part.offset = self.offset + sum(t.numel() for t in self.tensors[:first])
        part.dtype, part.device = self.dtype, self.device
        part._sharded = self._sharded[first:end]
        buffers_from = max(first, self.num_params) - self.num_params
        part._saved_buffers = self._saved_buffers[buffers_from : max(buffers_from, end - self.num_params)]
        part._viewed, part._views = None, []
        return part

    @property
    def parameters(self) -> list[torch.Tensor]:
        return self.tensors[: self.num_params]

    @property
    def floating_buffers(self) -> list[torch.Tensor]:
        return self.tensors[self.num_params :]

    @property
    def inspected(self) -> list:
        """The parameters as the guard reads them (`detach()` and `.grad`): the model's own, or
        of a sharded model each one's local shard (an empty shard has nothing to read)."""
        if not self._sharded:
            return self.parameters
        return [LocalShard(p) for p, local in zip(self._sharded, self.parameters) if local.numel()]

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """A vector laid out like this state, of the whole model: `flat` itself for a model that is
        not sharded; for a sharded one, a new vector laid out as the unsharded model's, each
        parameter's shards gathered from the ranks of its replica (a collective among them, one
        all_gather per parameter: for logging steps, not for training's)."""
        if not self._sharded:
            return flat
        views = self.views(flat)
        whole = [
            DTensor.from_local(
                local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
            ).full_tensor()
            for p, local in zip(self._sharded, views)
        ]
        return torch.cat([t.reshape(-1) for t in whole + views[self.num_params :]])

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views into a flat vector laid out like this state (no copy)."""
        views, offset = [], 0
        for t in self.tensors:
            views.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return views

    def _exchange_views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """views(flat) of the coupling's exchange buffer, kept from one call to the next: a
        coupled step subtracts from it and adds it, and making the views costs a slice and a
        view per tensor. Only for that long-lived buffer: the kept views hold their vector."""
        if flat is not self._viewed:
            self._viewed, self._views = flat, self.views(flat)
        return self._views

    def pack(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The model's current weights as one flat vector: copied into `out`, else a new one."""
        if out is None:
            out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            torch._foreach_copy_(self.views(out), self.tensors)
        return out

    def load(self, flat: torch.Tensor) -> None:
        """Overwrite the model's weights with the values in `flat`."""
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self.views(flat))

    def add(self, flat: torch.Tensor, alpha: float = 1.0) -> None:
        """Add `alpha` * `flat` (the coupling's exchange buffer: see _exchange_views) to the weights."""
        with torch.no_grad():
            torch._foreach_add_(self.tensors, self._exchange_views(flat), alpha=alpha)

    def save_buffers(self) -> None:
        """Remember the floating buffers, which the forward pass is about to move."""
        if self._saved_buffers:
            torch._foreach_copy_(self._saved_buffers, self.floating_buffers)

    def restore_buffers_unless(self, applied: torch.Tensor) -> None:
        """Put back the floating buffers remembered by `save_buffers` where `applied` (a
        device bool) is false: a skipped step, decided without a read back to the host."""
        if self._saved_buffers:
            kept = [
                torch.where(applied, b, saved) for b, saved in zip(self.floating_buffers, self._saved_buffers)
            ]
            torch._foreach_copy_(self.floating_buffers, kept)

    def subtract_from(self, flat: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """`flat` minus `alpha` * the weights from before this step, in place (the gap to the mean).
        Valid between the forward pass and the optimizer step: the parameters have not moved
        yet, and the floating buffers' earlier values were kept by `save_buffers`."""
        with torch.no_grad():
            torch._foreach_sub_(
                self._exchange_views(flat), self.tensors[: self.num_params] + self._saved_buffers, alpha=alpha
            )
        return flat

    def pack_before(self) -> torch.Tensor:
        """The weights from before this step as a new flat vector (valid where subtract_from is)."""
        out = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            torch._foreach_copy_(self.views(out), self.tensors[: self.num_params] + self._saved_buffers)
        return out

    def pull_through_optimizer(self, pull: torch.Tensor) -> None:
        """Enter `pull` into the gradients as the term -pull (the gradient of the coupling
        potential), so momentum and weight decay act on it. Floating buffers, which no
        optimizer steps, take their part of the pull directly."""
        parts = self.views(pull)
        with torch.no_grad():
            for param, part in zip(self.tensors[: self.num_params], parts):
                if param.grad is None:
                    param.grad = -part
                else:
                    param.grad.sub_(part)
            for buffer, part in zip(self.tensors[self.num_params :], parts[self.num_params :]):
                buffer.add_(part)


class LocalShard:
    """A sharded parameter as the guard reads a parameter (`detach()`, `.grad`): this rank's
    shard of its values and of its gradient."""

    __slots__ = ("param",)

    def __init__(self, param: DTensor):
        self.param = param

    def detach(self) -> torch.Tensor:
        return self.param.to_local().detach()

    @property
    def grad(self) -> torch.Tensor | None:
        grad = self.param.grad
        return None if grad is None else grad.to_local()
