"""Sharded replicas (parallel.shard = S > 1): each replica's model split over S ranks by FSDP2.

The wrapping policy (`shard_replica`): `fully_shard` each child module of the model's root
that holds parameters (for the presets every Linear, Conv2d and BatchNorm layer), then the
root itself (whatever parameters are left). Each child is one unit of communication: its
parameters are all-gathered for its forward and its backward and freed after, its gradients
reduce-scattered, so a rank holds 1/S of the parameters, gradients and optimizer state, and
a layer's whole parameters only while that layer computes. Buffers (BatchNorm's statistics) are not sharded: every rank of a
replica keeps them whole, and as the ranks read the same batches, the same.

The model is built whole first, from the replica's seed, and sharded after, so that its
weights are the unsharded run's. Each parameter is then a DTensor whose local shard
(`to_local()`) is what the coupling exchanges (replica_dist.flat); `full_state_dict`,
`WholeModel` and `WholeOptimizer` gather the whole weights for the files that must hold them
(weights/*.pt, and the checkpoints of this first version, which hold whole state dicts on
every rank; sharded checkpoints, torch.distributed.checkpoint, are the next step).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from replica_dist.errors import ConfigError
from replica_dist.flat import FlatState


def shard_replica(model: nn.Module, mesh: DeviceMesh, start_alike: bool = False) -> nn.Module:
    """`model`, fully_shard-ed in place over `mesh` (1-D: the replica's shard ranks; 2-D
    (replica, shard): hybrid sharded data parallel) by the policy above. `start_alike`: every
    replica first takes rank 0's weights (a broadcast over the world, as DDP's at its start)."""
    if start_alike:
        state = FlatState(model)
        initial = state.pack()
        tdist.broadcast(initial, src=0)
        state.load(initial)
    tied = _tied_across_children(model)
    if tied:
        raise ConfigError(
            f"parallel.shard={mesh.size(mesh.ndim - 1)}: {' and '.join(tied)} are one parameter in two of "
            f"the model's children, which the policy (each child module with parameters, then the root) "
            f"would shard as two FSDP units; untie them, or set parallel.shard=1"
        )
    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def follow_first_replica_buffers(model: nn.Module, replicas: tdist.ProcessGroup) -> None:
    """Before every forward pass that trains (grad enabled), overwrite `model`'s buffers
    (BatchNorm's statistics) with the first replica's, over `replicas` (one rank per replica):
    what DistributedDataParallel does (broadcast_buffers) and FSDP2 does not, so that hybrid
    sharded data parallel keeps DDP's buffers."""
    buffers = list(model.buffers())
    if not buffers:
        return

    def broadcast_buffers(module: nn.Module, args) -> None:
        if torch.is_grad_enabled():
            for buffer in buffers:
                tdist.broadcast(buffer, group=replicas, group_src=0)

    model.register_forward_pre_hook(broadcast_buffers)


def _tied_across_children(model: nn.Module) -> list[str]:
    """The names of the first parameter that two of the model's children share, or []."""
    owners: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names = owners.setdefault(id(param), [])
        if names and names[0].split(".")[0] != name.split(".")[0]:
            return [names[0], name]
        names.append(name)
    return []


def _whole(value):
    return value.full_tensor() if isinstance(value, DTensor) else value


def _like(value, template: torch.Tensor):
    """A whole tensor `value` as `template` holds it: its local part when `template` is a DTensor
    of the same shape (sliced here, no communication), else as it is (a step count, a None)."""
    if isinstance(value, torch.Tensor) and isinstance(template, DTensor) and value.shape == template.shape:
        return distribute_tensor(
            value.to(template.device), template.device_mesh, template.placements, src_data_rank=None
        )
    return value


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with whole tensors, on every rank of its replica (a collective
    among them: one all_gather per sharded tensor), with the keys of the unsharded model."""
    return {name: _whole(value) for name, value in model.state_dict().items()}


class WholeModel:
    """Stands in for a sharded model where replica_dist.run_state saves and restores one: its
    state dict as whole tensors, the same on every rank of its replica (a collective among
    them), and loaded from whole tensors, each rank copying its own part into the tensors it
    has (the coupling holds views of them), so that a resumed run goes on bit for bit."""

    def __init__(self, model: nn.Module):
        self.module = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return full_state_dict(self.module)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        mine = self.module.state_dict()
        self.module.load_state_dict({name: _like(value, mine[name]) for name, value in state.items()})


class WholeOptimizer:
    """Stands in for the optimizer of a sharded model as WholeModel does for the model: each
    parameter's state (momentum, Adam's moments) as whole tensors."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        per_param = {i: {k: _whole(v) for k, v in s.items()} for i, s in state["state"].items()}
        return state | {"state": per_param}

    def load_state_dict(self, state: dict) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        per_param = {i: {k: _like(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}
        self.optimizer.load_state_dict(state | {"state": per_param})
