"""Every collective the trainer issues, each one small and typed.

All ranks must call these in the same order on every code path; a rank that skips one
leaves the others waiting until `dist.timeout_s`. The replica mean is SUM then divide,
because gloo gained ReduceOp.AVG only recently.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as tdist

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
        tdist.destroy_process_group()


def rank() -> int:
    return tdist.get_rank()


def world_size() -> int:
    return tdist.get_world_size()


class CollectiveError(RuntimeError):
    """A collective that failed or timed out (a peer died, or stopped calling collectives)."""


_step = 0


def set_step(step: int) -> None:
    """Record the training step, so that a failed collective can say where it failed."""
    global _step
    _step = step


@contextmanager
def _collective(name: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as err:
        first_line = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        where = f"step {_step}" if _step else "start-up"
        raise CollectiveError(f"{name} failed at {where} on rank {rank()}: {first_line}") from err


def replica_mean(flat: torch.Tensor) -> torch.Tensor:
    """The mean over replicas of `flat` (left untouched), in a new tensor: one all_reduce."""
    total = flat.clone()
    with _collective("all_reduce (replica mean)"):
        tdist.all_reduce(total, op=tdist.ReduceOp.SUM)
    return total.div_(world_size())


def replica_mean_and_rows(
    flat: torch.Tensor, row: list[float], what: str = "replica mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean over replicas of `flat` (left untouched), and a (world_size, len(row)) table
    whose row r holds rank r's `row` (small integers, exact in any float type): one all_reduce
    of one buffer, each rank filling its own row of the table behind the weights."""
    n, k = world_size(), len(row)
    buffer = torch.zeros(flat.numel() + n * k, dtype=flat.dtype, device=flat.device)
    buffer[: flat.numel()] = flat
    buffer[flat.numel() + rank() * k : flat.numel() + (rank() + 1) * k] = torch.tensor(row, dtype=flat.dtype)
    with _collective(f"all_reduce ({what})"):
        tdist.all_reduce(buffer, op=tdist.ReduceOp.SUM)
    return buffer[: flat.numel()].div_(n), buffer[flat.numel() :].view(n, k).cpu()


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


def gather_rows(values: list[float], device: torch.device) -> torch.Tensor:
    """A (world_size, len(values)) float64 table whose row r holds rank r's `values` (a NaN
    stays in its row): one all_reduce."""
    _, table = replica_mean_and_rows(
        torch.empty(0, dtype=torch.float64, device=device), values, "per-rank values"
    )
    return table
