"""Your own model and data in a plain torchrun loop, each process a replica, coupled by replica_dist.

torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300
torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300 --stop-at 100  # ...then
torchrun --standalone --nproc_per_node=2 examples/own_loop.py --steps 300 --resume       # resumes

Resuming is explicit: a run finds a checkpoint left by --stop-at and refuses to start over it
unless told --resume (or the checkpoint is deleted). A run that reaches --steps deletes its
checkpoint: its final weights, <checkpoint>.final.rank<r>.pt, supersede it.
"""

import argparse
import os
import sys

import torch
import torch.distributed as dist

from replica_dist import ReplicaCoupling

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--stop-at", type=int, default=0, help="save a checkpoint after this step and stop")
parser.add_argument("--resume", action="store_true", help="continue from the checkpoint that --stop-at left")
parser.add_argument("--checkpoint", default="own_loop_checkpoint")
args = parser.parse_args()
if not 0 <= args.stop_at < args.steps:
    parser.error(f"--stop-at must be below --steps ({args.steps}); got {args.stop_at}")
rank = int(os.environ["RANK"])
path = f"{args.checkpoint}.rank{rank}.pt"
if args.resume != os.path.exists(path):  # before any collective: every rank leaves alike
    if args.resume:
        parser.error(f"--resume: there is no checkpoint {path} (a run with --stop-at leaves one)")
    parser.error(f"{path} exists (left by --stop-at): add --resume to continue from it, or delete it")

dist.init_process_group("gloo")
torch.manual_seed(rank)  # every replica starts from its own weights
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
coupling = ReplicaCoupling(model, optimizer, "tanh", eta=0.001, eta_final=0.4, steps=args.steps)
data = torch.Generator().manual_seed(100 + rank)  # this replica's own stream of data
teacher = torch.randn(8, generator=torch.Generator().manual_seed(0)) / 8**0.5

if args.resume:  # the coupling's state_dict holds the step and the guard
    saved = torch.load(path)
    for obj, key in ((model, "model"), (optimizer, "optimizer"), (coupling, "coupling")):
        obj.load_state_dict(saved[key])
    data.set_state(saved["data"])

loss = None
while coupling.step_count < args.steps:
    x = torch.randn(32, 8, generator=data)
    y = torch.sin(x @ teacher).unsqueeze(1)
    coupling.begin_step()  # before the forward pass: the mean is computed while we work
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    # In place of optimizer.step(). Its guard decides on the device and reads the outcome
    # back every 100th step by itself (check_every); agree=True reads it back on this very
    # step (and raises if a replica went non-finite) before we save.
    coupling.step(loss, agree=coupling.step_count + 1 == args.stop_at)
    if coupling.step_count == args.stop_at:
        state = {"model": model, "optimizer": optimizer, "coupling": coupling}
        torch.save({k: v.state_dict() for k, v in state.items()} | {"data": data.get_state()}, path)
        if rank == 0:
            print(f"step {coupling.step_count}: loss {loss.item():.4f}; saved, continue with --resume")
        dist.destroy_process_group()
        sys.exit(0)
coupling.finish()  # the last read back: a non-finite value after the last check raises here
last = f"loss {loss.item():.4f}" if loss is not None else "no step left to train"  # resumed at the end
if rank == 0:
    print(f"step {coupling.step_count}: {last}")
torch.save(model.state_dict(), f"{args.checkpoint}.final.rank{rank}.pt")
if args.resume:  # the final weights supersede it; a rerun starts afresh
    os.remove(path)
dist.destroy_process_group()
