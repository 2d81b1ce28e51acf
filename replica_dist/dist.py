"""Every collective the trainer issues, each one small and typed.

All ranks must call these in the same order on every code path; a rank that skips one
leaves the others waiting until `dist.timeout_s`. The replica mean is SUM then divide,
because gloo gained ReduceOp.AVG only recently.

With parallel.dp = D > 1 the world is a (replicas, D) DeviceMesh: "replica" collectives run
within this rank's column of the mesh (the ranks with its dp index, one per replica), DDP
within its row (the D ranks of its replica). With D = 1 both are the whole world and no
group is created.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as tdist
from torch.distributed.device_mesh import init_device_mesh

from replica_dist.config import ConfigError, DistConfig


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
    replica's number. `step` is the training step, named by a collective that fails."""

    replicas: tdist.ProcessGroup | None = None
    within: tdist.ProcessGroup | None = None
    step: int = 0

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


def init_mesh(dp: int, device: torch.device) -> Mesh:
    """The world arranged as (replicas, dp) ranks, rank = replica * dp + dp index; every rank
    calls this once before training (with dp > 1 it creates the groups, a collective)."""
    if world_size() % dp:
        raise ConfigError(f"parallel.dp={dp} must divide the world size {world_size()}")
    if dp == 1:
        return Mesh()
    mesh = init_device_mesh(device.type, (world_size() // dp, dp), mesh_dim_names=("replica", "dp"))
    return Mesh(mesh.get_group("replica"), mesh.get_group("dp"))


class CollectiveError(RuntimeError):
    """A collective that failed or timed out (a peer died, or stopped calling collectives)."""


@contextmanager
def _collective(name: str, step: int = 0) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        where = f"step {step}" if step else "start-up"
        raise CollectiveError(f"{name} failed at {where} on rank {rank()}: {first_line}") from err


def replica_mean(flat: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The mean over replicas of `flat` (left untouched), in a new tensor: one all_reduce."""
    total = flat.clone()
    with _collective("all_reduce (replica mean)", mesh.step):
        tdist.all_reduce(total, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return total.div_(mesh.num_replicas)


class ReplicaExchange:
    """The coupling's all_reduce, on one buffer allocated once: `flat` (the weights, filled by
    the caller) followed by a (replicas, row_len) table in which each replica fills its own
    row (the guard's word: small integers, exact in any float type). The buffer is reduced in
    buckets of at most `bucket_bytes`, each an all_reduce of a slice of it (no copies), all in
    flight together; `start` returns at once, `wait` gives the mean and the table. On CUDA
    nothing leaves the GPU."""

    def __init__(
        self,
        numel: int,
        row_len: int,
        dtype: torch.dtype,
        device: torch.device,
        bucket_bytes: float,
        mesh: Mesh,
    ):
        self.mesh = mesh
        n = self.mesh.num_replicas
        self.buffer = torch.zeros(numel + n * row_len, dtype=dtype, device=device)
        self.flat = self.buffer[:numel]
        self.table = self.buffer[numel:].view(n, row_len)
        per_bucket = max(1, int(bucket_bytes // self.buffer.element_size()))
        self.buckets = list(self.buffer.split(per_bucket))
        self._works: list[tdist.Work] = []

    def start(self, row: torch.Tensor) -> None:
        """Put `row` (a device vector) into this replica's row of the table and start reducing
        the buffer (its `flat` part must hold this replica's weights). Touch nothing in it
        until `wait`."""
        self.table.zero_()
        self.table[self.mesh.replica].copy_(row)
        with _collective("all_reduce (replica mean)", self.mesh.step):
            self._works = [
                tdist.all_reduce(bucket, op=tdist.ReduceOp.SUM, group=self.mesh.replicas, async_op=True)
                for bucket in self.buckets
            ]

    def wait(self, divide: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The replicas' mean (in `flat`, overwritten; their sum with divide=False) and every
        replica's row (on the device, the same on every rank; with parallel.dp > 1 the
        largest over the replica's ranks). Nothing is read back to the host."""
        with _collective("all_reduce (replica mean)", self.mesh.step):
            for work in self._works:
                work.wait()
        self._works = []
        flat = self.flat.div_(self.mesh.num_replicas) if divide else self.flat
        return flat, _agree_within_replica(self.table, self.mesh)


def _agree_within_replica(table: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """The elementwise max of `table` over the ranks of this rank's replica: with dp > 1 a rank
    sees only the rows of its own mesh column, and a stop or a non-finite value seen by one
    rank must reach all of them (one tiny all_reduce, only when dp > 1)."""
    if mesh.within is None:
        return table
    with _collective("all_reduce (guard words across dp)", mesh.step):
        tdist.all_reduce(table, op=tdist.ReduceOp.MAX, group=mesh.within)
    return table


def broadcast_(flat: torch.Tensor, src: int = 0) -> None:
    """Overwrite `flat` on every rank with rank `src`'s values."""
    with _collective("broadcast"):
        tdist.broadcast(flat, src=src)


def broadcast_object(value: object, src: int = 0) -> object:
    """Rank `src`'s picklable `value`, on every rank (for start-up decisions, not hot paths)."""
    holder = [value]
    with _collective("broadcast_object_list"):
        tdist.broadcast_object_list(holder, src=src)
    return holder[0]


def barrier() -> None:
    """Wait until every rank has arrived here."""
    with _collective("barrier"):
        tdist.barrier()


def gather_rows(values: list[float], device: torch.device, mesh: Mesh) -> torch.Tensor:
    """A (replicas, len(values)) float64 host table whose row r holds replica r's `values` (a
    NaN stays in its row): one all_reduce."""
    table = torch.zeros(mesh.num_replicas, len(values), dtype=torch.float64, device=device)
    table[mesh.replica] = torch.tensor(values, dtype=torch.float64)
    with _collective("all_reduce (per-replica values)", mesh.step):
        tdist.all_reduce(table, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return table.cpu()


def share_words(word: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """Every replica's guard word, as `ReplicaExchange.wait` gives them (on the device),
    without the weights: one small all_reduce."""
    table = torch.zeros(mesh.num_replicas, len(word), dtype=word.dtype, device=word.device)
    table[mesh.replica].copy_(word)
    with _collective("all_reduce (guard words)", mesh.step):
        tdist.all_reduce(table, op=tdist.ReduceOp.SUM, group=mesh.replicas)
    return _agree_within_replica(table, mesh)


def first_failure(failure: str | None) -> str | None:
    """After a step that can fail on some ranks only (a write to a full or read-only disk),
    the message of the lowest-ranked rank that failed, on every rank; None if none did.

    Every rank calls it at the same point, failed or not, so that no rank is left waiting in
    a collective for one that stopped. One all_reduce of one integer; a broadcast of the
    message follows only when a rank failed, and then on every rank."""
    # Gloo reduces CPU tensors; NCCL only reduces tensors on this rank's GPU.
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
    lowest = torch.tensor([world_size() if failure is None else rank()], dtype=torch.int64, device=device)
    with _collective("all_reduce (write failures)"):
        tdist.all_reduce(lowest, op=tdist.ReduceOp.MIN)
    source = int(lowest.item())
    if source == world_size():
        return None
    return str(broadcast_object(failure, src=source))
