"""What a plain step of ReplicaCoupling costs over the loop a user writes, in one process.

    python -m replica_dist.experiments.step_overhead [--rounds 40] [--steps 100] [--hidden 1024,1024]

The benchmark (bench.py) runs each variant in its own stretch of time, so a slow spell of a
noisy machine lands on one variant; here four loops on four copies of the same model take
turns every `--steps` steps, in one process and one thread, and each is given its median over
`--rounds` turns:

    plain loop             zero_grad, forward, backward, a fused SGD step
    plain loop + one read  the same, then torch.aminmax of every gradient: the one pass over
                           the gradients that the guard's finite test must make on every step
    ReplicaCoupling none   begin_step, forward, backward, step (the guard's test, its
                           bookkeeping, the optimizer step masked on the device), with the
                           default periodic read back (an exchange of the guard's words
                           and one host read every check_every = 100 steps)
    ... check_every=0      the same without the periodic read back: the difference is its cost

The model and optimizer are the trainer's own (its default mlp and fused SGD, as the benchmark
builds them) for digits' 64 inputs and 10 classes, on random data, batch 64, on the CPU (or
the first GPU with --device cuda, timed with the stream drained at each turn's end).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as tdist
import torch.nn.functional as F

from replica_dist.config import load_config
from replica_dist.coupling import DEFAULT_CHECK_EVERY, ReplicaCoupling
from replica_dist.loop import build_optimizer
from replica_dist.model import build_model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="replica_dist.experiments.step_overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--rounds", type=int, default=40, help="turns of each loop")
    parser.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_CHECK_EVERY,
        help="steps in one turn (by default check_every: each turn holds one periodic read back)",
    )
    parser.add_argument("--hidden", default="1024,1024", help="widths of the mlp's hidden layers")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cfg, _ = load_config([f"model.hidden=[{args.hidden}]"])

    def model_and_optimizer() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(cfg.model, (64,), 10, cfg.seed).to(device)
        return model, build_optimizer(cfg.optim, model.parameters())

    if device.type == "cpu":
        torch.set_num_threads(1)
    store = tdist.FileStore(str(Path(tempfile.mkdtemp(prefix="step_overhead_")) / "store"), 1)
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        x = torch.randn(64, 64, device=device)
        y = torch.randint(0, 10, (64,), device=device)
        plain_model, plain_optimizer = model_and_optimizer()
        read_model, read_optimizer = model_and_optimizer()
        coupled_model, coupled_optimizer = model_and_optimizer()
        coupling = ReplicaCoupling(coupled_model, coupled_optimizer, "none")
        unchecked_model, unchecked_optimizer = model_and_optimizer()
        unchecked = ReplicaCoupling(unchecked_model, unchecked_optimizer, "none", check_every=0)

        def plain():
            plain_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(plain_model(x), y).backward()
            plain_optimizer.step()

        def plain_and_one_read():
            read_optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(read_model(x), y).backward()
            for p in read_model.parameters():
                torch.aminmax(p.grad)
            read_optimizer.step()

        def coupled_loop(coupling, model, optimizer):
            def loop():
                coupling.begin_step()
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                coupling.step(loss)

            return loop

        loops = {
            "plain loop": plain,
            "plain loop + one read": plain_and_one_read,
            "ReplicaCoupling none": coupled_loop(coupling, coupled_model, coupled_optimizer),
            "... check_every=0": coupled_loop(unchecked, unchecked_model, unchecked_optimizer),
        }
        for loop in loops.values():  # warm-up: the optimizers' state, the allocator
            for _ in range(args.steps):
                loop()
        times: dict[str, list[float]] = {name: [] for name in loops}
        for turn in range(args.rounds):
            # Each turn reverses the order: neither loop always runs right after the same one.
            for name, loop in list(loops.items())[:: 1 if turn % 2 else -1]:
                began = time.perf_counter()
                for _ in range(args.steps):
                    loop()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[name].append((time.perf_counter() - began) / args.steps * 1e3)
        medians = {name: statistics.median(ms) for name, ms in times.items()}
        base = medians["plain loop"]
        print(
            f"mlp 64-{args.hidden}-10, batch 64, {device}; median over {args.rounds} turns of "
            f"{args.steps} steps, loops alternating"
        )
        for name, ms in medians.items():
            print(f"{name:24s} {ms:8.3f} ms/step  {ms - base:+.3f} ms  x{ms / base:.3f}")
    finally:
        tdist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
