"""Step time, communication and memory of every way to couple replicas, side by side.

    torchrun --standalone --nproc_per_node=2 -m replica_dist.experiments.bench [--steps 320] [--warmup 30]
        [--hidden 1024,1024] [--batch 64] [--report FILE.md] [--json FILE.json] [overrides...]
    launch/bench.sh                 # the same, with the settings behind docs/benchmark.md

Trains the same model on the same batches once per variant and round, one after another in this one
torchrun job, through the trainer itself (`loop.train`, with a StepTimer cutting each step
into compute / communication / update):

    independent          coupling=none: no communication at all
    coupled sync         coupling=tanh dist.overlap=false: all_reduce after backward
    coupled overlapped   coupling=tanh: all_reduce in flight during forward and backward
    linear overlapped    coupling=linear: the same without the elementwise tanh
    coupled every 4, 16  coupling=tanh coupling.every=k (overlapped)
    average every 4      coupling=average coupling.every=4 (local SGD)
    diloco every 16      coupling=diloco coupling.every=16 (outer Nesterov step on the mean)
    coupled every 4 int8 coupling=tanh coupling.every=4 dist.compress=int8
    average every 16 in 4 fragments
                         coupling=average coupling.every=16 coupling.fragments=4 (left out
                         for a model of fewer than 4 tensors)
    ddp                  coupling=ddp (DistributedDataParallel, gradients bucketed and overlapped)
    PyTorch averager     torch's PeriodicModelAverager(period=4) after each optimizer step,
                         in a plain loop (it is not part of the trainer)
    plain loop           the loop a user writes with no coupling at all: zero_grad, forward,
                         backward, optimizer.step (the trainer's fused optimizer), nothing else

then times a raw all_reduce of a flat buffer as large as the coupling's next to the
coupling's own exchange (`dist.ReplicaExchange`: buckets, guard words, the division), and the
bf16 and int8 exchanges each next to a raw all_reduce of as many bytes as they send,
alternating each pair after a barrier each, and prints the tables.
Bytes per step and per sample (of the rank's batch): what each rank hands to collectives,
counted: the trainer's variants by the coupling's own counter (summary.json's
comm.bytes_sent_per_rank over the run's steps; the diagnostics' exact exchanges on logging
steps are not counted), ddp by a counting comm hook in an extra untimed run, the PyTorch
averager at its all_reduce.
Step times are rank 0's, leaving out the first `--warmup` steps and the last (it logs and
evaluates). With --pipelined nothing is cut into sections and nothing synchronises inside the
timed steps: a step's time is the wall time between the ends of consecutive steps, so on a GPU
the host runs ahead as in training and the mean is the throughput (StepTimer says more).
Peak memory: on CUDA torch's allocator peak; on CPU the process's peak resident set, reset
every step (/proc/self/clear_refs), with large allocations served by mmap so that freed
memory leaves the resident set. Overhead is a variant's peak minus `independent`'s.
Extra arguments are trainer overrides applied to every variant (e.g. dist.backend=nccl).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as tdist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager
from torch.distributed.elastic.multiprocessing.errors import record

from replica_dist import dist
from replica_dist.config import Config, load_config
from replica_dist.data import build_datasets
from replica_dist.evaluate import LOSSES
from replica_dist.flat import FlatState
from replica_dist.guard import Guard
from replica_dist.loop import build_optimizer, rank_batches, replica_seed, train
from replica_dist.model import build_model
from replica_dist.timing import SECTIONS, StepTimer

VARIANTS = {
    "independent": ["coupling=none"],
    "coupled sync": ["coupling=tanh", "dist.overlap=false"],
    "coupled overlapped": ["coupling=tanh", "dist.overlap=true"],
    "linear overlapped": ["coupling=linear", "dist.overlap=true"],
    "coupled every 4": ["coupling=tanh", "coupling.every=4"],
    "coupled every 16": ["coupling=tanh", "coupling.every=16"],
    "average every 4": ["coupling=average", "coupling.every=4"],
    "diloco every 16": ["coupling=diloco", "coupling.every=16"],
    "coupled every 4 int8": ["coupling=tanh", "coupling.every=4", "dist.compress=int8"],
    "average every 16 in 4 fragments": ["coupling=average", "coupling.every=16", "coupling.fragments=4"],
    "ddp": ["coupling=ddp"],
}
PLAIN = "plain loop"
FRAGMENTED = "average every 16 in 4 fragments"
FRAGMENTS = 4


class SyntheticImages(torch.utils.data.Dataset):
    """Random 3x32x32 images with labels of 10 classes, made once from a fixed seed: the
    ResNet-18 workload's data (the benchmark times steps; what they learn does not matter)."""

    def __init__(self, train: bool = True, size: int = 4096):
        generator = torch.Generator().manual_seed(0 if train else 1)
        self.x = torch.randn(size, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, 10, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int):
        return self.x[index], int(self.y[index])


WORKLOADS = {
    "mlp": {"title": "mlp {hidden} on digits", "overrides": [], "batch": 64},
    "resnet18": {
        "title": "torchvision resnet18 on synthetic 3x32x32 images (10 classes)",
        "overrides": [
            "model._target_=torchvision.models.resnet18",
            "model.num_classes=10",
            "data._target_=replica_dist.experiments.bench.SyntheticImages",
            "+data.kwargs.size=1024",
            "data.pin_memory=true",  # a GPU's usual recipe: batches copied without waiting (CPU: no effect)
        ],
        "batch": 128,
    },
}
"""What the benchmark trains: the ~1M-weight mlp on digits, or what users train on GPUs."""
AVERAGER = "PyTorch averager every 4"
AVERAGER_PERIOD = 4
HOST_COPY_STEPS = 10
DDP_COUNT_STEPS = 8
"""Steps of the untimed ddp run in which a comm hook counts the gradient buckets' bytes."""


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _cpu_peak_since_last_call() -> int:
    peak = _status_bytes("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the peak starts again from the current size
    return peak


def _memory_probe(device: torch.device):
    if device.type == "cuda":

        def cuda_peak_since_last_call() -> int:
            peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            return peak

        return cuda_peak_since_last_call
    # glibc keeps freed blocks below its (moving) mmap threshold in the heap, where they count as
    # resident forever; a fixed 64 KiB threshold returns every tensor of note to the system.
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.mallopt(m_trim_threshold, 64 * 1024)
    return _cpu_peak_since_last_call


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_stats(steps: list[dict[str, float]], peak_bytes: list[int], samples_per_step: int) -> dict:
    """Statistics of the measured steps (warm-up already left out) of one variant."""
    totals = [sum(s.values()) for s in steps]
    ms = sorted(t * 1e3 for t in totals)
    return {
        "p50_ms": statistics.median(ms),
        "p90_ms": ms[int(0.9 * (len(ms) - 1))],
        "mean_ms": statistics.fmean(ms),
        "samples_per_s": samples_per_step / statistics.fmean(totals),
        **{f"{s}_ms": statistics.fmean(step.get(s, 0.0) for step in steps) * 1e3 for s in SECTIONS},
        "peak_bytes": max(peak_bytes),
    }


def _run_plain_loop(cfg: Config, device: torch.device, timer: StepTimer, averager=None) -> None:
    """The loop a user writes with no coupling, on the trainer's data, model and optimizer;
    with `averager`, the plain loop PyTorch's model-averaging docs show."""
    mesh = dist.init_mesh(1, device)
    train_set, _, data = build_datasets(cfg.data, cfg.seed, torch.float32)
    batches = rank_batches(cfg, train_set, device, mesh)
    model = build_model(cfg.model, data.input_shape, data.num_outputs, replica_seed(cfg.seed, dist.rank()))
    model = model.to(device)
    optimizer = build_optimizer(cfg.optim, model.parameters())
    loss_fn = LOSSES[data.loss]
    for _ in range(cfg.train.steps):
        timer.start_step()
        with timer.section("compute"):
            x, y = batches.next()
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer.section("update"):
            optimizer.step()
        if averager is not None:
            with timer.section("communication"):
                averager.average_parameters(model.parameters())
        timer.end_step()


@contextlib.contextmanager
def _counting_all_reduce(counter: list[int]):
    """torch.distributed.all_reduce counting the bytes of every tensor handed to it, in
    counter[0]: the PyTorch averager looks it up in the module at each call."""
    original = tdist.all_reduce

    def counting(tensor, *args, **kwargs):
        counter[0] += tensor.numel() * tensor.element_size()
        return original(tensor, *args, **kwargs)

    tdist.all_reduce = counting
    try:
        yield
    finally:
        tdist.all_reduce = original


@contextlib.contextmanager
def _counting_ddp(counter: list[int]):
    """DistributedDataParallel (which coupling=ddp looks up in torch.nn.parallel when it wraps
    the model) with a comm hook that adds each gradient bucket's bytes to counter[0] and then
    all_reduces it as DDP does without a hook (allreduce_hook). A Python hook per bucket is
    not DDP's own C++ path: the timed runs go without it."""
    original = torch.nn.parallel.DistributedDataParallel

    def hook(group, bucket):
        buffer = bucket.buffer()
        counter[0] += buffer.numel() * buffer.element_size()
        return default_hooks.allreduce_hook(group, bucket)

    class Counting(original):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(self.process_group, hook)

    torch.nn.parallel.DistributedDataParallel = Counting
    try:
        yield
    finally:
        torch.nn.parallel.DistributedDataParallel = original


def _bytes_stats(nbytes: int, steps: int, batch: int) -> dict:
    """Bytes a rank sent over `steps` steps of `batch` samples (its own), per step and per sample."""
    per_step = nbytes / steps
    return {
        "bytes_sent": nbytes,
        "bytes_steps": steps,
        "bytes_per_step": per_step,
        "bytes_per_sample": per_step / batch,
    }


class _HostCopyCounter(StepTimer):
    """Records every copy between host and GPU that the training steps make (op and bytes),
    through a dispatch mode active from the start to the end of each step."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        from torch.utils._python_dispatch import TorchDispatchMode

        copies = self.copies = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tensors = [t for t in (*args, out) if isinstance(t, torch.Tensor)]
                scalar_read = func is torch.ops.aten._local_scalar_dense.default and args[0].is_cuda
                if scalar_read or len({t.device.type for t in tensors}) > 1:
                    moved = min(tensors, key=lambda t: t.numel())
                    copies.append((str(func.overloadpacket), moved.numel() * moved.element_size()))
                return out

        self._mode = Mode()

    def start_step(self) -> None:
        super().start_step()
        self._mode.__enter__()

    def end_step(self) -> None:
        self._mode.__exit__(None, None, None)
        super().end_step()


COMPRESSED = ("bf16", "int8")


def _raw_name(compress: str) -> str:
    return f"raw all_reduce, {compress} exchange's bytes"


def _bandwidths(numel: int, device: torch.device, bucket_bytes: float, iterations: int, chunk: int) -> dict:
    """Seconds per exchange (median) of the coupling's exchange of `numel` weights, plain
    and compressed (bf16, int8: quantising and the decompressing adds included), each next to
    a raw all_reduce of a flat buffer of the bytes it sends, the two of a pair alternated so
    that both see the same machine."""
    weights = torch.randn(numel, generator=torch.Generator().manual_seed(0)).to(device)
    row = torch.zeros(Guard.WORD_LENGTH, device=device)
    pairs = []
    for compress in ("none", *COMPRESSED):
        exchange = dist.ReplicaExchange(
            numel, Guard.WORD_LENGTH, torch.float32, device, bucket_bytes, dist.Mesh(), compress, chunk
        )

        def fill(exchange=exchange):  # the exchange leaves the mean there; int8 scales depend on it
            exchange.flat.copy_(weights)

        def run(exchange=exchange):
            exchange.start(row)
            exchange.wait()

        fill()
        run()  # its bytes, and a first call of each collective, before any timing
        if compress == "none":
            names = ("raw all_reduce", "coupling exchange")
            raw = torch.zeros_like(exchange.buffer)
        else:
            names = (_raw_name(compress), f"{compress} exchange")
            raw = torch.zeros(exchange.last_bytes, dtype=torch.uint8, device=device)

        def raw_all_reduce(raw=raw):
            tdist.all_reduce(raw)

        pairs.append(
            [
                (names[0], raw.numel() * raw.element_size(), lambda: None, raw_all_reduce),
                (names[1], exchange.last_bytes, fill, run),
            ]
        )
    times = {name: [] for pair in pairs for name, *_ in pair}
    for i in range(iterations + 5):
        for pair in pairs:
            for name, _, setup, fn in pair if i % 2 else pair[::-1]:  # neither always goes first
                setup()
                _sync(device)
                tdist.barrier()  # a rank that arrives late would charge its lateness to the other's timing
                began = time.perf_counter()
                fn()
                _sync(device)
                if i >= 5:
                    times[name].append(time.perf_counter() - began)
    n = dist.world_size()
    result = {}
    for name, nbytes, *_ in (entry for pair in pairs for entry in pair):
        t = statistics.median(times[name])
        algbw = nbytes / t  # busbw / algbw = 2(n-1)/n, the share of the bytes each rank must move
        result[name] = {
            "bytes": nbytes,
            "ms": t * 1e3,
            "algbw_GBps": algbw / 1e9,
            "busbw_GBps": algbw * 2 * (n - 1) / n / 1e9,
        }
    result["bytes"] = result["coupling exchange"]["bytes"]
    return result


def _machine(device: torch.device, backend: str) -> str:
    if device.type == "cuda":
        what = torch.cuda.get_device_name(device)
    else:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        what = f"{names[0] if names else platform.processor()}, {os.cpu_count()} cores"
    return (
        f"{what}; {platform.system()} {platform.release()}; torch {torch.__version__}; "
        f"backend {backend}; {dist.world_size()} ranks; threads per rank {torch.get_num_threads()}"
    )


def _table(results: dict, param_bytes: int) -> list[str]:
    lines = [
        "| variant | p50 ms | p90 ms | mean ms | x plain | x ddp | samples/s | compute ms | comm ms "
        "| update ms | peak MiB | overhead / param bytes | bytes/step | bytes/sample |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = results.get("independent", next(iter(results.values())))["peak_bytes"]

    def against(name: str, r: dict) -> str:  # mean step time over that of `name`
        return f"{r['mean_ms'] / results[name]['mean_ms']:.3f}" if name in results else "-"

    def sections(r: dict) -> str:  # "-" for pipelined timing, which cuts nothing
        cut = [r[f"{s}_ms"] for s in SECTIONS]
        return " | ".join(f"{ms:.2f}" for ms in cut) if any(cut) else " | ".join(["-"] * len(cut))

    for name, r in results.items():
        lines.append(
            f"| {name} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['mean_ms']:.2f} | {against(PLAIN, r)} "
            f"| {against('ddp', r)} | {r['samples_per_s']:.0f} "
            f"| {sections(r)} "
            f"| {r['peak_bytes'] / 2**20:.1f} | {(r['peak_bytes'] - base) / param_bytes:.2f} "
            f"| {r['bytes_per_step']:,.0f} | {r['bytes_per_sample']:,.1f} |"
        )
    return lines


def _ratios(results: dict, bandwidth: dict, param_bytes: int) -> dict[str, tuple[float, str]]:
    """The targets of the benchmark, for the variants that ran."""
    mean = {name: r["mean_ms"] for name, r in results.items()}
    peak = {name: r["peak_bytes"] for name, r in results.items()}
    ratios = {
        "coupling / raw all_reduce bus bandwidth": (  # = the algbw ratio, also for one rank
            bandwidth["coupling exchange"]["algbw_GBps"] / bandwidth["raw all_reduce"]["algbw_GBps"],
            ">= 0.9",
        )
    }
    for compress in COMPRESSED:
        exchange, raw = bandwidth[f"{compress} exchange"], bandwidth[_raw_name(compress)]
        ratios[f"{compress} exchange / raw all_reduce of its bytes, bus bandwidth"] = (
            exchange["algbw_GBps"] / raw["algbw_GBps"],
            "-",
        )
    for name, (variant, base, values, target) in {
        "independent / plain loop step time": ("independent", PLAIN, mean, "<= 1.03"),
        "overlapped / ddp step time": ("coupled overlapped", "ddp", mean, "<= 1.0"),
        "linear overlapped / ddp step time": ("linear overlapped", "ddp", mean, "<= 1.0"),
        "every 16 / independent step time": ("coupled every 16", "independent", mean, "<= 1.10"),
    }.items():
        if variant in values and base in values:
            ratios[name] = (values[variant] / values[base], target)
    if "coupled overlapped" in peak and "independent" in peak:
        overhead = (peak["coupled overlapped"] - peak["independent"]) / param_bytes
        ratios["overlapped memory overhead / param bytes"] = (overhead, "<= 2")
    return ratios


def report(
    args,
    machine: str,
    results: dict,
    bandwidth: dict,
    param_bytes: int,
    numel: int,
    host_copies: list,
    compress_chunk: int = 1024,
) -> str:
    lines = [
        f"Machine: {machine}.",
        f"Model: {WORKLOADS[args.workload]['title'].format(hidden=args.hidden)}, {numel:,} weights ({param_bytes / 2**20:.2f} MiB float32); "
        f"batch {args.batch} per rank; {args.rounds} rounds of {args.steps} steps per variant, "
        f"the first {args.warmup} and the last (it logs) of each not counted.",
        *(
            [
                "Timing: pipelined. Nothing synchronises inside the timed steps: a step's time is the wall time "
                "from the end of the step before it to its own end, so the host runs ahead of a GPU as in "
                "training and the mean is the throughput; a single step's time (p50, p90) says less, "
                "and there are no sections."
            ]
            if args.pipelined
            else []
        ),
        "",
        *_table(results, param_bytes),
        "",
        f"Bytes: what a rank hands to the collectives that couple it, per training step (all "
        f"{args.steps} steps of a run, warm-up included: whole periods when --steps is a multiple of 16) "
        "and per sample of its own batch; not what the "
        "wire carries (a ring all_reduce moves about 2(R-1)/R times its input per rank, the compressed "
        "exchange's all_gather R-1 times its payload). Counted: the trainer's variants by the "
        "coupling (summary.json's comm.bytes_sent_per_rank), without the diagnostics' exact exchanges "
        "on logging steps (the first and the last); ddp by a comm hook that counts DDP's gradient "
        f"buckets, in an extra untimed run of {DDP_COUNT_STEPS} steps (DDP's broadcast of buffers, "
        "none in the mlp, not counted); the PyTorch averager at its all_reduce.",
        "",
        f"The coupling's exchange buffer, allocated once: {bandwidth['bytes']:,} bytes, "
        f"{bandwidth['bytes'] / param_bytes:.4f} x the parameter bytes (weights, floating buffers, guard words).",
        "",
        f"The coupling's exchange, plain and compressed (dist.compress_chunk {compress_chunk}), each next to "
        f"a raw all_reduce of the bytes it sends, median of {args.bandwidth_iterations}, each pair "
        "alternated; algbw = bytes / time, busbw = algbw x 2(R-1)/R (a compressed exchange's time "
        "includes quantising and adding the R payloads):",
        "",
        "| all_reduce | bytes | ms | algbw GB/s | busbw GB/s |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {name} | {b['bytes']:,} | {b['ms']:.3f} | {b['algbw_GBps']:.3f} | {b['busbw_GBps']:.3f} |"
            for name, b in bandwidth.items()
            if name != "bytes"
        ),
        "",
        "| ratio | measured | target |",
        "|---|---:|---|",
        *(
            f"| {name} | {value:.3f} | {target} |"
            for name, (value, target) in _ratios(results, bandwidth, param_bytes).items()
        ),
    ]
    if host_copies:
        per_step = {}
        for op, nbytes in host_copies:
            per_step[(op, nbytes)] = per_step.get((op, nbytes), 0) + 1
        lines += [
            "",
            f"Copies between host and GPU in {HOST_COPY_STEPS} overlapped coupled steps (op, bytes: count):",
            "",
            *(f"- `{op}`, {nbytes} bytes: {count}" for (op, nbytes), count in sorted(per_step.items())),
        ]
    return "\n".join(lines) + "\n"


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser(
        prog="replica_dist.experiments.bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--steps", type=int, default=320)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--hidden", default="1024,1024", help="widths of the mlp's hidden layers")
    parser.add_argument(
        "--batch", type=int, help="minibatch per rank (default: 64 for mlp, 128 for resnet18)"
    )
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="mlp",
        help="resnet18 needs torchvision (the vision extra)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="passes through all variants")
    parser.add_argument(
        "--pipelined",
        action="store_true",
        help="time whole steps without synchronising inside them (a GPU's throughput; no sections)",
    )
    parser.add_argument("--bandwidth-iterations", type=int, default=50)
    parser.add_argument("--variants", default=",".join([PLAIN, *VARIANTS, AVERAGER]), help="comma-separated")
    parser.add_argument("--report", type=Path, help="also write the report (markdown) here")
    parser.add_argument("--json", type=Path, help="also write every number (JSON) here")
    parser.add_argument("--work", type=Path, default=Path("runs/bench"), help="scratch run directories")
    args, overrides = parser.parse_known_args(argv)
    if args.batch is None:
        args.batch = WORKLOADS[args.workload]["batch"]
    if args.warmup >= args.steps - 1:
        parser.error(f"--warmup ({args.warmup}) must be below --steps - 1 ({args.steps - 1})")
    unknown = set(args.variants.split(",")) - {PLAIN, *VARIANTS, AVERAGER}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {[PLAIN, *VARIANTS, AVERAGER]}")
    return args, overrides


@record
def main(argv: list[str]) -> int:
    args, overrides = _parse(argv)
    logging.getLogger("replica_dist").setLevel(logging.WARNING)  # the trainer's progress lines
    common = [
        *WORKLOADS[args.workload]["overrides"],
        *([f"model.hidden=[{args.hidden}]"] if args.workload == "mlp" else []),
        f"train.batch_size={args.batch}",
        "log.every=1000000",
        "eval.every=1000000",
        "checkpoint.every=0",
        *overrides,
    ]
    base_cfg, _ = load_config(common)
    common.append(f"train.steps={args.steps}")
    device = dist.init(base_cfg.dist)
    try:
        peak_memory = _memory_probe(device)
        work = args.work / os.environ.get("TORCHELASTIC_RUN_ID", "local")
        names = args.variants.split(",")
        _, _, data = build_datasets(base_cfg.data, base_cfg.seed, torch.float32)
        model = build_model(base_cfg.model, data.input_shape, data.num_outputs, 0)
        flat = FlatState(model)
        numel, tensors = flat.numel, len(flat.tensors)
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        if FRAGMENTED in names and tensors < FRAGMENTS:
            names.remove(FRAGMENTED)
            if dist.rank() == 0:
                print(f"{FRAGMENTED}: left out, the model has {tensors} tensors", file=sys.stderr)
        steps, peaks = {name: [] for name in names}, {name: [] for name in names}
        sent = {}  # name: (bytes a rank handed to the coupling's collectives, over how many steps)
        # Rounds, each through every variant: a slow spell of the machine or a cold first run
        # spreads over all variants instead of landing on one.
        for round_ in range(args.rounds):
            for name in names:
                cfg, _ = load_config(common + VARIANTS.get(name, []))
                timer = StepTimer(device, peak_memory, pipelined=args.pipelined)
                if name == PLAIN:
                    _run_plain_loop(cfg, device, timer)
                    sent[name] = (0, cfg.train.steps)  # no collective at all
                elif name == AVERAGER:
                    averager = PeriodicModelAverager(period=AVERAGER_PERIOD, warmup_steps=0)
                    counter = [0]
                    with _counting_all_reduce(counter):
                        _run_plain_loop(cfg, device, timer, averager)
                    sent[name] = (counter[0], cfg.train.steps)
                else:
                    summary = train(cfg, work / f"{name.replace(' ', '_')}_{round_}", device, timer=timer)
                    sent[name] = (summary["comm"]["bytes_sent_per_rank"], cfg.train.steps)
                # The last step logs and evaluates (full-size copies of the weights): not counted.
                gc.collect()  # the variant's DDP reducer and the like, before the next one starts
                steps[name] += timer.steps[args.warmup : -1]
                peaks[name] += timer.peak_bytes[args.warmup : -1]
                if dist.rank() == 0:
                    mean_ms = sum(map(sum, (s.values() for s in timer.steps[args.warmup : -1])))
                    mean_ms *= 1e3 / (args.steps - args.warmup - 1)
                    print(f"round {round_ + 1}, {name}: {mean_ms:.2f} ms/step", file=sys.stderr, flush=True)
        if "ddp" in names:  # DDP's all_reduce is its own: counted by a hook, untimed
            cfg, _ = load_config(common[:-1] + [f"train.steps={DDP_COUNT_STEPS}"] + VARIANTS["ddp"])
            counter = [0]
            with _counting_ddp(counter):
                train(cfg, work / "ddp_bytes", device)
            sent["ddp"] = (counter[0], DDP_COUNT_STEPS)
        results = {
            name: {
                **_step_stats(steps[name], peaks[name], args.batch * dist.world_size()),
                **_bytes_stats(*sent[name], args.batch),
            }
            for name in names
        }
        chunk = base_cfg.dist.compress_chunk
        bandwidth = _bandwidths(
            numel, device, base_cfg.dist.bucket_mb * 2**20, args.bandwidth_iterations, chunk
        )
        host_copies = []
        if device.type == "cuda":  # the weights must never leave the GPU
            steps = [f"train.steps={HOST_COPY_STEPS}"]
            cfg, _ = load_config(common[:-1] + steps + VARIANTS["coupled overlapped"])
            counter = _HostCopyCounter(device)
            train(cfg, work / "host_copies", device, timer=counter)
            host_copies = counter.copies
        dist.barrier()
        if dist.rank() == 0:
            machine = _machine(device, tdist.get_backend())
            text = report(args, machine, results, bandwidth, param_bytes, numel, host_copies, chunk)
            print(text, end="")
            if args.report:
                args.report.write_text(text)
            if args.json:
                args.json.write_text(
                    json.dumps(
                        {
                            "machine": machine,
                            "timing": "pipelined" if args.pipelined else "sectioned",
                            "model": {"numel": numel, "tensors": tensors, "param_bytes": param_bytes},
                            "steps": results,
                            "all_reduce": bandwidth,
                        },
                        indent=2,
                    )
                    + "\n"
                )
            shutil.rmtree(work, ignore_errors=True)
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
