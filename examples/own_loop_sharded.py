"""A replica larger than one process: your own loop, each replica split over --shards ranks by
FSDP2 (fully_shard), the replicas coupled by replica_dist on each rank's local shard.

torchrun --standalone --nproc_per_node=4 examples/own_loop_sharded.py --shards 2 --steps 300

The world is replicas x shards ranks, rank = replica * shards + shard. The ranks of one replica
start from its weights and read its data (FSDP averages their gradients, which are then the
replica's own) and hold 1/shards of its parameters, gradients and momentum each; the coupling's
all_reduce runs among the ranks with the same shard index, each sending its shard. Each
replica's whole weights end in <out>.final.replica<r>.pt, a plain state_dict.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from replica_dist import ReplicaCoupling
from replica_dist.shard import full_state_dict, shard_replica

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--shards", type=int, default=2, help="ranks per replica")
parser.add_argument("--out", default="own_loop_sharded")
args = parser.parse_args()
world = int(os.environ["WORLD_SIZE"])
if args.shards < 1 or world % args.shards:  # before any collective: every rank leaves alike
    parser.error(f"--shards must divide the number of processes ({world}); got {args.shards}")

dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (world // args.shards, args.shards), mesh_dim_names=("replica", "shard"))
replica = mesh.get_local_rank("replica")
torch.manual_seed(replica)  # every replica starts from its own weights, whole on each of its ranks
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
model = shard_replica(model, mesh["shard"])  # each Linear one FSDP unit, then the root
# Not fused: torch's fused SGD has no rule for DTensors, the sharded parameters.
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
coupling = ReplicaCoupling(
    model, optimizer, "tanh", eta=0.001, eta_final=0.4, steps=args.steps, device_mesh=mesh
)
data = torch.Generator().manual_seed(100 + replica)  # this replica's own stream, on all its ranks
teacher = torch.randn(8, generator=torch.Generator().manual_seed(0)) / 8**0.5

for _ in range(args.steps):
    x = torch.randn(32, 8, generator=data)
    y = torch.sin(x @ teacher).unsqueeze(1)
    coupling.begin_step()
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    coupling.step(loss)
coupling.finish()
weights = full_state_dict(model)  # gathered from the replica's ranks (a collective among them)
if mesh.get_local_rank("shard") == 0:
    torch.save(weights, f"{args.out}.final.replica{replica}.pt")
    # One write per line: the replicas print to one terminal, and print() writes the line and its end apart.
    sys.stdout.write(f"replica {replica}: step {coupling.step_count}: loss {loss.item():.4f}\n")
dist.destroy_process_group()
