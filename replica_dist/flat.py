"""One flat buffer that mirrors every parameter and floating-point buffer of a model.

The coupling exchanges the whole replica with one all_reduce on this buffer instead of one
call per tensor. Integer buffers (BatchNorm's step counter) are not weights and stay local.
"""

from __future__ import annotations

import torch
from torch import nn


class FlatState:
    def __init__(self, model: nn.Module):
        params = list(model.named_parameters())
        buffers = [(n, b) for n, b in model.named_buffers() if b.is_floating_point()]
        self.names = [name for name, _ in params + buffers]
        self.tensors = [t for _, t in params + buffers]
        self.num_params = len(params)
        """The first `num_params` entries are parameters, the rest floating buffers."""
        sizes = [t.numel() for t in self.tensors]
        first = self.tensors[0]
        self.buffer = torch.empty(sum(sizes), dtype=first.dtype, device=first.device)
        self._views = self.views(self.buffer)

    @property
    def floating_buffers(self) -> list[torch.Tensor]:
        return self.tensors[self.num_params :]

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-tensor views into a flat vector laid out like this state (no copy)."""
        views, offset = [], 0
        for t in self.tensors:
            views.append(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        return views

    def pack(self) -> torch.Tensor:
        """Copy the model's current weights into the (reused) flat buffer and return it."""
        with torch.no_grad():
            torch._foreach_copy_(self._views, self.tensors)
        return self.buffer

    def load(self, flat: torch.Tensor) -> None:
        """Overwrite the model's weights with the values in `flat`."""
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self.views(flat))

    def add(self, flat: torch.Tensor) -> None:
        """Add `flat` to the model's weights."""
        with torch.no_grad():
            torch._foreach_add_(self.tensors, self.views(flat))

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
