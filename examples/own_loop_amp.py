"""examples/own_loop.py's loop in fp16 mixed precision, with torch.amp.GradScaler.

torchrun --standalone --nproc_per_node=2 examples/own_loop_amp.py --steps 300

The scaler works as in PyTorch's recipe, with coupling.step(loss, scaler=scaler) in place of
scaler.step(optimizer): a replica whose scaled gradients overflow leaves out its own optimizer
step (its scale halves, on that replica only), while the coupling's pull and exchanges go on
as on any other step; the guard does not count it. On a GPU autocast runs on "cuda"; here, on
the CPU, fp16 autocast shows the same path. bf16 autocast needs no scaler, and nothing from
the coupling. --overflow-at N puts an inf into replica 1's gradient at step N, to show a skip.
"""

import argparse
import sys

import torch
import torch.distributed as dist

from replica_dist import ReplicaCoupling

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=300)
parser.add_argument("--overflow-at", type=int, default=0, help="an overflow in replica 1 at this step")
args = parser.parse_args()

dist.init_process_group("gloo")  # "nccl" with one GPU per process, and device "cuda"
rank, device = dist.get_rank(), "cpu"
torch.manual_seed(rank)  # every replica starts from its own weights
model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(device)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, fused=True)
coupling = ReplicaCoupling(model, optimizer, "tanh", eta=0.001, eta_final=0.4, steps=args.steps)
scaler = torch.amp.GradScaler(device)
data = torch.Generator().manual_seed(100 + rank)  # this replica's own stream of data
teacher = torch.randn(8, generator=torch.Generator().manual_seed(0)) / 8**0.5

overflows = 0
for step in range(1, args.steps + 1):
    x = torch.randn(32, 8, generator=data).to(device)
    y = torch.sin(x @ teacher.to(device)).unsqueeze(1)
    coupling.begin_step()
    with torch.autocast(device, dtype=torch.float16):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
    optimizer.zero_grad()
    scaler.scale(loss).backward()
    if step == args.overflow_at and rank == 1:
        model[0].weight.grad[0, 0] = float("inf")
    scale = scaler.get_scale()
    coupling.step(loss, scaler=scaler)  # in place of scaler.step(optimizer)
    scaler.update()
    overflows += scaler.get_scale() < scale  # the scaler lowers its scale after an overflow
coupling.finish()  # the last read back of the guard
scale = scaler.get_scale()
# One write per line: both ranks print to one terminal, and print() writes the line and its end apart.
sys.stdout.write(
    f"replica {rank}: step {coupling.step_count}: loss {loss.item():.4f}, {overflows} overflowed, scale {scale:g}\n"
)
sys.stdout.flush()
dist.destroy_process_group()
