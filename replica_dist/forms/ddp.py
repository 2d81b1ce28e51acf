"""ddp: no pull; DistributedDataParallel averages the gradients, so the replicas stay one model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from replica_dist.forms.base import Form

if TYPE_CHECKING:
    import torch


class DataParallel(Form):
    """The baseline of data parallel training: every replica starts from the same weights
    (DDP broadcasts rank 0's) and steps on the mean gradient, so all stay identical. No
    remap (the replicas must stay identical) and no parallel.dp (data parallel already).
    Sharded (parallel.shard > 1) it is hybrid sharded data parallel: fully_shard over both
    dimensions of the mesh, sharded within a replica and averaging gradients across them."""

    name = "ddp"
    supports = frozenset({"sharded"})
    why_not = {
        "compression": "it averages gradients in DDP's own all_reduce",
        "remap": "its replicas must stay identical",
        "replica_dp": "ddp is data parallel over the whole world already",
    }

    def wrap(self, model: torch.nn.Module, group) -> torch.nn.Module:
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, FSDPModule):  # hybrid sharded: fully_shard averages across replicas
            return model
        device = next(model.parameters()).device
        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=group)

    def shard(self, model: torch.nn.Module, device_mesh) -> torch.nn.Module:
        """HSDP: fully_shard over the whole (replica, shard) mesh, which replicates over its
        first dimension, every replica starting from rank 0's weights and taking the first
        replica's buffers at each training forward, as under DDP."""
        from replica_dist.shard import follow_first_replica_buffers, shard_replica

        model = shard_replica(model, device_mesh, start_alike=True)
        follow_first_replica_buffers(model, device_mesh.get_group("replica"))
        return model
