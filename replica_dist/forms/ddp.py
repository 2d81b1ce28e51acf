"""ddp: no pull; DistributedDataParallel averages the gradients, so the replicas stay one model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica_dist.forms.base import Form

if TYPE_CHECKING:
    import torch


class DataParallel(Form):
    """The baseline of data parallel training: every replica starts from the same weights
    (DDP broadcasts rank 0's) and steps on the mean gradient, so all stay identical. No
    remap (the replicas must stay identical) and no parallel.dp (data parallel already)."""

    name = "ddp"
    why_not = {
        "compression": "it averages gradients in DDP's own all_reduce",
        "remap": "its replicas must stay identical",
        "replica_dp": "ddp is data parallel over the whole world already",
    }

    def wrap(self, model: torch.nn.Module, group) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group)
