"""Your own model and data in a plain torchrun loop, each process a replica, coupled by replica_dist.

torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300
torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300 --stop-at 100  # ...then
torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300                # resumes
"""

import argparse
import os

import torch
import torch.distributed as dist

from replica_dist import ReplicaCoupling

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--stop-at", type=int, default=0, help="save a checkpoint after this step and stop")
parser.add_argument("--checkpoint", default="own_loop_checkpoint")
args = parser.parse_args()

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(rank)  # every replica starts from its own weights
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
coupling = ReplicaCoupling(model, optimizer, "tanh", eta=0.001, eta_final=0.4, steps=args.steps)
data = torch.Generator().manual_seed(100 + rank)  # this replica's own stream of data
teacher = torch.randn(8, generator=torch.Generator().manual_seed(0)) / 8**0.5

path = f"{args.checkpoint}.rank{rank}.pt"
if os.path.exists(path):  # resume: the coupling's state_dict holds the step and the guard
    saved = torch.load(path)
    for obj, key in ((model, "model"), (optimizer, "optimizer"), (coupling, "coupling")):
        obj.load_state_dict(saved[key])
    data.set_state(saved["data"])

while coupling.step_count < args.steps:
    x = torch.randn(32, 8, generator=data)
    y = torch.sin(x @ teacher).unsqueeze(1)
    coupling.begin_step()  # before the forward pass: the mean is computed while we work
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    # In place of optimizer.step(). Its guard decides on the device; agree=True reads the
    # outcome back (and raises if a replica went non-finite) before we save.
    coupling.step(loss, agree=coupling.step_count + 1 == args.stop_at)
    if coupling.step_count == args.stop_at:
        state = {"model": model, "optimizer": optimizer, "coupling": coupling}
        torch.save({k: v.state_dict() for k, v in state.items()} | {"data": data.get_state()}, path)
        break
if rank == 0:
    print(f"step {coupling.step_count}: loss {loss.item():.4f}")
torch.save(model.state_dict(), f"{args.checkpoint}.final.rank{rank}.pt")
dist.destroy_process_group()
