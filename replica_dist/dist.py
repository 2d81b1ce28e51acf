"""Every collective the trainer issues, each one small and typed.

All ranks must call these in the same order on every code path; a rank that skips one
leaves the others waiting until `dist.timeout_s`. The replica mean is SUM then divide,
because gloo gained ReduceOp.AVG only recently.

With parallel.dp = D > 1 the world is a (replicas, D) DeviceMesh: "replica" collectives run
within this rank's column of the mesh (the ranks with its dp index, one per replica), DDP
within its row (the D ranks of its replica). With parallel.shard = S > 1 it is a (replicas,
S) mesh in the same way, FSDP2 within a row (replica_dist.shard) and the replica mean of
each rank's local shard within a column. With D = S = 1 both are the whole world and no
group is created.
"""

from __future__ import annotations

import gc
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from replica_dist.config import (
    COMPRESSIONS,  # noqa: F401 (the exchange's choices, as dist.COMPRESSIONS)
    ConfigError,
    DistConfig,
    check_compression,
)


def init(cfg: DistConfig) -> torch.device:
    """Join the process group torchrun describes in the environment (or a world of one when
    started without torchrun) and return this rank's device."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device=cuda but CUDA is not available; use dist.device=cpu or auto")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise ConfigError("dist.backend=nccl needs CUDA; use dist.backend=gloo or auto")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    # More ranks than GPUs share them round-robin (gloo only: NCCL refuses two ranks per GPU).
    device = torch.device("cuda", local_rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=cfg.timeout_s)
    if "RANK" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        tdist.init_process_group(
            backend,
            store=_store(rank, world_size, timeout),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    else:
        tdist.init_process_group(backend, store=tdist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return device


def _store(rank: int, world_size: int, timeout: timedelta) -> tdist.Store:
    """The rendezvous store torchrun describes, with keys private to this restart attempt.

    After `torchrun --max-restarts` restarts the workers, the store can still hold the
    previous attempt's gloo addresses, and a new worker may read them before its peer has
    replaced them ("connectFullMesh failed ... Connection refused", seen with torch 2.13).
    A prefix per attempt keeps attempts apart."""
    agent_hosts_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = tdist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=not agent_hosts_store and rank == 0,
        timeout=timeout,
        multi_tenant=not agent_hosts_store,
    )
    return tdist.PrefixStore(
        f"replica_dist/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store
    )


def teardown() -> None:
    if tdist.is_initialized():
        # Objects in reference cycles (a DDP reducer, say) can hold the process group past
        # destroy_process_group, to be freed during interpreter exit; the likely cause of one
        # abort at exit ("terminate called without an active exception") after the benchmark's
        # 20 DDP runs. Collected here, they go while everything is still alive.
        gc.collect()
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank()


def world_size() -> int:
    return tdist.get_world_size()


@dataclass
class Mesh:
    """This rank's place in a world of replicas x dp ranks, handed to whatever communicates.

    `replicas` holds one rank per replica, those with this rank's dp index (None: the whole
    world, one replica per rank); `within` the ranks of this rank's own replica, among which
    DDP averages gradients (None: this rank alone). A rank's index in `replicas` is its
    replica's number. `step` is the training step, named by a collective that fails.
    `device_mesh`: with parallel.shard > 1, the (replica, shard) DeviceMesh that each replica
    is sharded over ("shard", the ranks of `within`); None otherwise."""

    replicas: tdist.ProcessGroup | None = None
    within: tdist.ProcessGroup | None = None
    step: int = 0
    device_mesh: DeviceMesh | None = None

    @property
    def sharded(self) -> bool:
        """Whether each replica is sharded over the ranks of `within` (parallel.shard > 1)."""
        return self.device_mesh is not None

    @property
    def num_replicas(self) -> int:
        return tdist.get_world_size(self.replicas)

    @property
    def replica(self) -> int:
        """The replica this rank trains."""
        return tdist.get_rank(self.replicas)

    @property
    def dp_rank(self) -> int:
        """This rank's place among the ranks of its replica (0 writes the replica's files)."""
        return tdist.get_rank(self.within) if self.within is not None else 0


def init_mesh(dp: int, device: torch.device, shard: int = 1) -> Mesh:
    """The world arranged as (replicas, dp) ranks, rank = replica * dp + dp index, or as
    (replicas, shard) ranks the same way (parallel.dp and parallel.shard are not combined);
    every rank calls this once before training (with dp or shard > 1 it creates the groups,
    a collective)."""
    key, per_replica = ("parallel.shard", shard) if shard > 1 else ("parallel.dp", dp)
    if world_size() % per_replica:
        raise ConfigError(f"{key}={per_replica} must divide the world size {world_size()}")
    if per_replica == 1:
        return Mesh()
    name = "shard" if shard > 1 else "dp"
    mesh = init_device_mesh(
        device.type, (world_size() // per_replica, per_replica), mesh_dim_names=("replica", name)
    )
    return Mesh(mesh.get_group("replica"), mesh.get_group(name), device_mesh=mesh if shard > 1 else None)


class CollectiveError(RuntimeError):
    """A collective that failed or timed out (a peer died, or stopped calling collectives)."""


@contextmanager
def collective(name: str, step: int = 0) -> Iterator[None]:
    """Around a collective call (here or in a caller's own, as coupling.py's): its failure, a
    RuntimeError from the process group, becomes one CollectiveError naming `name`, the step
    (0: start-up) and this rank, with the first line of the cause."""
    try:
        yield
    except RuntimeError as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        where = f"step {step}" if step else "start-up"
        raise CollectiveError(f"{name} failed at {where} on rank {rank()}: {first_line}") from err


def replica_mean(flat: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The mean over replicas of `flat` (left untouched), in a new tensor: one all_reduce."""
    total = flat.clone()
    with collective("all_reduce (replica mean)", mesh.step):
        tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return total.div_(mesh.num_replicas)


INT8_LEVELS = 127
"""int8 codes run from -127 to 127 (symmetric: -128 is never used, so that -q is a code)."""


def chunk_absmax(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """max |x| over each run of `chunk` elements of the vector `x` (the last run may be shorter),
    in float32; a run holding a NaN or an inf gets +inf (torch.amax propagates NaN, but a NaN
    given to an all_reduce MAX is kept or dropped depending on the backend's comparison)."""
    full = x.numel() // chunk * chunk
    parts = [x[:full].view(-1, chunk).abs().amax(1)]
    if full < x.numel():
        parts.append(x[full:].abs().amax().reshape(1))
    return torch.cat(parts).float().nan_to_num_(nan=math.inf, posinf=math.inf)


def quantize_int8(
    x: torch.Tensor, scale: torch.Tensor, chunk: int, out: torch.Tensor, scratch: torch.Tensor | None = None
) -> torch.Tensor:
    """q = round(x / scale) clamped to [-127, 127], with one scale per `chunk` elements, into the
    int8 vector `out`. A chunk whose scale is 0 holds only zeros and gets q = 0; a chunk whose
    scale is inf (it held a non-finite value) gets q = 0 too, which `dequantize_int8` turns
    into NaN (0 * inf): a non-finite weight never comes back as a finite one. `scratch`: a
    vector like `x` to work in (else one is allocated)."""
    scale = torch.where(scale > 0, scale, 1.0).to(x.dtype)
    full = x.numel() // chunk * chunk
    q = torch.empty_like(x) if scratch is None else scratch
    torch.div(x[:full].view(-1, chunk), scale[: full // chunk, None], out=q[:full].view(-1, chunk))
    if full < x.numel():
        torch.div(x[full:], scale[-1], out=q[full:])
    q.round_().clamp_(-INT8_LEVELS, INT8_LEVELS).nan_to_num_(nan=0.0)
    return out.copy_(q)


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, chunk: int, out: torch.Tensor) -> torch.Tensor:
    """q * scale, chunk by chunk, into `out` (the buffer's dtype): one rounding per element."""
    scale = scale.to(out.dtype)
    full = q.numel() // chunk * chunk
    torch.mul(q[:full].view(-1, chunk), scale[: full // chunk, None], out=out[:full].view(-1, chunk))
    if full < q.numel():
        torch.mul(q[full:], scale[-1], out=out[full:])
    return out


class ReplicaExchange:
    """The coupling's all_reduce, on one buffer allocated once: `flat` (the weights, filled by
    the caller) followed by a (replicas, row_len) table in which each replica fills its own
    row (the guard's word: small integers, exact in any float type). The buffer is reduced in
    buckets of at most `bucket_bytes`, each an all_reduce of a slice of it (no copies), all in
    flight together; `start` returns at once, `wait` gives the mean and the table. On CUDA
    nothing leaves the GPU.

    With `compress` = bf16 or int8 the weights travel compressed and the table alone is
    all_reduced (in the buffer's float type: the guard's words must stay exact). A compressed
    all_reduce would add in the compressed type (int8 overflows, bf16 loses the low bits at
    every hop, in an order that differs between ranks), so instead each rank compresses its
    own weights, the ranks all_gather the payloads (in buckets of `bucket_bytes`, async), and
    every rank decompresses them and adds them in the buffer's dtype (fp32, or fp64 with
    train.dtype=float64) in replica order: the same operations on the same bytes, so the
    result is bit-identical on every rank. bf16 is a cast (round to nearest even). int8 is
    symmetric with one scale per `chunk` elements on which all ranks agree: the chunk's
    largest |w| over all replicas (one all_reduce MAX of numel/chunk float32 values, before
    quantising: `start` waits for it), scale = max/127, q = round(w/scale) in [-127, 127];
    the round trip is off by at most half a step (scale/2) per element. A non-finite weight
    makes its whole chunk of the sum non-finite on every rank, never a finite code; the guard
    has seen it in the replica's own tensors already (guard.inspect) and masks the step.

    `error_feedback` (compressed only): each rank keeps residual = sent - decompress(compress(
    sent)) and adds it to what it sends next time. The sum over exchanges of what a replica
    sent then equals the sum of its true weights minus the last residual, so a rounding error
    does not persist in one direction from exchange to exchange: a weight that barely moves
    (a constant bias of up to half a step without feedback) is sent, on average over
    exchanges, exactly. One exchange's error can reach a whole step (the previous residual
    plus the new one); the tanh and linear pulls integrate the mean over many steps and see
    the average. The residual is state: `residual`, saved in the coupling's state_dict.

    `bytes_sent` (cumulative) and `last_bytes` (the latest `start`): the bytes this rank hands
    to collectives as its own input: the buffer for an all_reduce; for an all_gather its own
    payload (not the n payloads it receives); the int8 scales' all_reduce; the table. Not what
    the wire carries (a ring all_reduce sends about twice its input); that depends on the
    backend's algorithm, and this is the quantity the choices here change.
    `start(row, exact=True)` sends the plain buffer even when compressed, without touching
    the residual (the trainer's diagnostics, which must see the true mean)."""

    def __init__(
        self,
        numel: int,
        row_len: int,
        dtype: torch.dtype,
        device: torch.device,
        bucket_bytes: float,
        mesh: Mesh,
        compress: str = "none",
        chunk: int = 1024,
        error_feedback: bool = False,
    ):
        check_compression(compress, error_feedback, prefix="")
        self.mesh = mesh
        n = self.mesh.num_replicas
        self.buffer = torch.zeros(numel + n * row_len, dtype=dtype, device=device)
        self.flat = self.buffer[:numel]
        self.table = self.buffer[numel:].view(n, row_len)
        per_bucket = max(1, int(bucket_bytes // self.buffer.element_size()))
        self.buckets = list(self.buffer.split(per_bucket))
        self._works: list[tdist.Work] = []
        self.compress, self.chunk = compress, chunk
        self.bytes_sent = 0
        self.last_bytes = 0
        self.residual = torch.zeros(numel, dtype=dtype, device=device) if error_feedback else None
        self._compressed_in_flight = False
        if compress != "none":
            payload = torch.int8 if compress == "int8" else torch.bfloat16
            self._send = torch.empty(numel, dtype=payload, device=device)
            self._received = torch.empty(n, numel, dtype=payload, device=device)
            per = max(1, int(bucket_bytes // self._send.element_size()))
            self._spans = [(s, min(s + per, numel)) for s in range(0, numel, per)]
            self._scale = torch.empty(0)
            # int8: the quantiser's scratch, then each term dequantised before it is added.
            self._term = torch.empty(numel, dtype=dtype, device=device) if compress == "int8" else None

    def start(self, row: torch.Tensor, exact: bool = False) -> None:
        """Put `row` (a device vector) into this replica's row of the table and start reducing
        the buffer (its `flat` part must hold this replica's weights). Touch nothing in it
        until `wait`. Compressed (and not `exact`): the int8 scales are agreed on first (a
        small blocking all_reduce), the weights then travel as an async all_gather."""
        self.table.zero_()
        self.table[self.mesh.replica].copy_(row)
        self._compressed_in_flight = self.compress != "none" and not exact
        group = self.mesh.replicas
        with collective("all_reduce (replica mean)", self.mesh.step):
            if not self._compressed_in_flight:
                self._works = [
                    tdist.all_reduce(bucket, op=tdist.ReduceOp.SUM, group=group, async_op=True)
                    for bucket in self.buckets
                ]
                self._count(self.buffer.numel() * self.buffer.element_size())
                return
            sent = self._compress_own()
            n = self.mesh.num_replicas
            self._works = [
                tdist.all_gather(
                    [self._received[r, s:e] for r in range(n)], self._send[s:e], group=group, async_op=True
                )
                for s, e in self._spans
            ]
            self._works.append(
                tdist.all_reduce(self.table, op=tdist.ReduceOp.SUM, group=group, async_op=True)
            )
        self._count(
            sent
            + self._send.numel() * self._send.element_size()
            + self.table.numel() * self.table.element_size()
        )

    def _count(self, nbytes: int) -> None:
        self.last_bytes = nbytes
        self.bytes_sent += nbytes

    def _compress_own(self) -> int:
        """This replica's weights (plus the residual) into `_send`; updates the residual.
        Returns the bytes of the scales' all_reduce (0 for bf16)."""
        x = self.flat
        if self.residual is not None:
            x.add_(self.residual)  # `flat` is overwritten by the result in `wait`
        scale_bytes = 0
        if self.compress == "int8":
            absmax = chunk_absmax(x, self.chunk)
            tdist.all_reduce(absmax, op=tdist.ReduceOp.MAX, group=self.mesh.replicas)
            scale_bytes = absmax.numel() * absmax.element_size()
            self._scale = absmax.div_(INT8_LEVELS)
            quantize_int8(x, self._scale, self.chunk, out=self._send, scratch=self._term)
        else:
            self._send.copy_(x)
        if self.residual is not None:
            self._decompress(self._send, out=self.residual)
            torch.sub(x, self.residual, out=self.residual)
            # A non-finite weight (a step the guard refuses) must not poison later exchanges.
            self.residual.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return scale_bytes

    def _decompress(self, payload: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.compress == "int8":
            return dequantize_int8(payload, self._scale, self.chunk, out)
        return out.copy_(payload)

    def wait(self, divide: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The replicas' mean (in `flat`, overwritten; their sum with divide=False) and every
        replica's row (on the device, the same on every rank; with parallel.dp > 1 the
        largest over the replica's ranks). Nothing is read back to the host."""
        with collective("all_reduce (replica mean)", self.mesh.step):
            for work in self._works:
                work.wait()
        self._works = []
        if self._compressed_in_flight:
            self._compressed_in_flight = False
            total = self._decompress(self._received[0], out=self.flat)
            for r in range(1, self.mesh.num_replicas):
                if self._term is None:
                    total.add_(self._received[r])  # bf16 -> the buffer's dtype is exact
                else:
                    total.add_(self._decompress(self._received[r], out=self._term))
        flat = self.flat.div_(self.mesh.num_replicas) if divide else self.flat
        return flat, max_within_replica(self.table, self.mesh)


def max_within_replica(values: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The elementwise max of `values` (in place) over the ranks of this rank's replica: with
    dp > 1 a rank sees only the rows of its own mesh column, and a stop or a non-finite value
    seen by one rank must reach all of them; sharded, a non-finite value in one rank's shard
    is the whole replica's (one tiny all_reduce, only when a replica has several ranks)."""
    if mesh.within is None:
        return values
    with collective("all_reduce (guard words within a replica)", mesh.step):
        tdist.all_reduce(values, op=tdist.ReduceOp.MAX, group=mesh.within)
    return values


def broadcast_(flat: torch.Tensor, src: int = 0) -> None:
    """Overwrite `flat` on every rank with rank `src`'s values."""
    with collective("broadcast"):
        tdist.broadcast(flat, src=src)


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank `src`'s picklable `value`, on every rank (for start-up decisions, not hot paths)."""
    holder = [value]
    with collective("broadcast_object_list"):
        tdist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait until every rank has arrived here."""
    with collective("barrier"):
        tdist.barrier()


def gather_rows(values: list[float], device: torch.device, mesh: Mesh) -> torch.Tensor:
    """A (replicas, len(values)) float64 host table whose row r holds replica r's `values` (a
    NaN stays in its row): one all_reduce."""
    table = torch.zeros(mesh.num_replicas, len(values), dtype=torch.float64, device=device)
    table[mesh.replica] = torch.tensor(values, dtype=torch.float64)
    with collective("all_reduce (per-replica values)", mesh.step):
        tdist.all_reduce(table, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return table.cpu()


def share_words(word: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Every replica's guard word, as `ReplicaExchange.wait` gives them (on the device),
    without the weights: one small all_reduce."""
    table = torch.zeros(mesh.num_replicas, len(word), dtype=word.dtype, device=word.device)
    table[mesh.replica].copy_(word)
    with collective("all_reduce (guard words)", mesh.step):
        tdist.all_reduce(table, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return max_within_replica(table, mesh)


def first_failure(failure: str | None) -> str | None:
    """After a step that can fail on some ranks only (a write to a full or read-only disk),
    the message of the lowest-ranked rank that failed, on every rank; None if none did.

    Every rank calls it at the same point, failed or not, so that no rank is left waiting in
    a collective for one that stopped. One all_reduce of one integer; a broadcast of the
    message follows only when a rank failed, and then on every rank."""
    # Gloo reduces CPU tensors; NCCL only reduces tensors on this rank's GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    lowest = torch.tensor([world_size() if failure is None else rank()], dtype=torch.int64, device=device)
    with collective("all_reduce (write failures)"):
        tdist.all_reduce(lowest, op=tdist.ReduceOp.MIN)
    source = int(lowest.item())
    if source == world_size():
        return None
    return str(broadcast_object(failure, src=source))
