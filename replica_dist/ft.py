"""The replicas' exchange through torchft (ft.enabled): one replica per torchrun job.

Each step a replica asks torchft's Lighthouse for a quorum (`Manager.start_quorum`: who takes
part, and a replica that is behind receives a live one's state), then the coupling's exchange
runs as `Manager.allreduce` over torchft's ProcessGroupGloo, which torchft rebuilds for every
new membership. An exchange that fails (a replica died in it, a timeout) does not raise: the
Manager swallows the error and `should_commit()` says False (as it does for an exchange among
fewer than ft.min_replicas), and this replica then takes its local step without the pull (`FtExchange.wait` hands back its own weights as the "mean" of one
replica, a gap of exactly zero for tanh and linear).

The guard's words ride in the same buffer as before (dist.ReplicaExchange): a table of one row
per replica *id* (0 to ft.replicas - 1, fixed, whoever takes part), each row a presence flag
followed by the guard's word. The buffer is summed (torchft's allreduce with ReduceOp.SUM in
place of its default average), so the words arrive exact, the rows of the replicas that did
not take part are zero (a zero word is a clean one), and the presence flags name the
participants; the weights' sum is divided by their number, as dist.ReplicaExchange does.

Only this module and replica_dist.ft_loop import torchft (the ft extra), and only under
ft.enabled.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as tdist

from replica_dist import dist
from replica_dist.coupling import ReplicaCoupling
from replica_dist.errors import ConfigError
from replica_dist.guard import Guard


def import_torchft():
    """The torchft module, or a ConfigError saying how to install it."""
    try:
        import torchft
    except ImportError as err:
        raise ConfigError(f"ft.enabled=true needs torchft (pip install 'replica_dist[ft]'): {err}") from None
    return torchft


@dataclass
class FtMesh(dist.Mesh):
    """dist.Mesh for a replica that is its own job: the trainer's own collectives stay within
    the job (a world of one rank), the coupling's go through `manager`. `num_replicas` is the
    number of replicas whose weights the latest exchange averaged (1: it failed, or none ran)."""

    replica_id: int = 0
    replica_count: int = 1
    """ft.replicas: the rows of the exchange's table."""
    manager: object = None
    """torchft.Manager of this replica job."""
    participants: list[int] = field(default_factory=lambda: [])
    """The replicas (ids) whose weights the latest exchange averaged; [] before one or after
    one that failed."""
    committed: bool = False
    """Manager.should_commit() of this step (`commit`): its exchange completed among at least
    ft.min_replicas replicas."""
    in_flight: list = field(default_factory=lambda: [])
    """The exchanges started this step (torchft Work objects), which `commit` waits for."""

    def commit(self) -> bool:
        """After the backward pass, before ReplicaCoupling.step: wait for this step's exchange
        (torchft reports a failure to the Manager instead of raising), then ask the Manager
        whether the step commits (`committed`, which FtExchange.wait reads)."""
        for work in self.in_flight:
            work.wait()
        self.in_flight = []
        self.committed = self.manager.should_commit()
        return self.committed

    @property
    def replica(self) -> int:
        return self.replica_id

    @property
    def num_replicas(self) -> int:
        return max(1, len(self.participants))

    @property
    def dp_rank(self) -> int:
        return 0


class FtExchange:
    """dist.ReplicaExchange's interface (`flat`, `start`, `wait`, the bytes counted) over
    torchft's Manager.allreduce; see the module's docstring for the table of words."""

    residual = None  # no compression under ft (check_ft_run refuses dist.compress)

    def __init__(self, numel: int, row_len: int, dtype: torch.dtype, device: torch.device, mesh: FtMesh):
        self.mesh = mesh
        self.buffer = torch.zeros(numel + mesh.replica_count * (1 + row_len), dtype=dtype, device=device)
        self.flat = self.buffer[:numel]
        self.table = self.buffer[numel:].view(mesh.replica_count, 1 + row_len)
        self._own_weights = torch.empty(numel, dtype=dtype, device=device)
        self._own_row = torch.zeros_like(self.table)
        self.bytes_sent = 0
        self.last_bytes = 0

    def start(self, row: torch.Tensor, exact: bool = False) -> None:
        """Send this replica's weights (in `flat`) and word `row`; returns at once."""
        replica = self.mesh.replica_id
        self._own_weights.copy_(self.flat)
        self.table.zero_()
        self.table[replica, 0] = 1.0
        self.table[replica, 1:].copy_(row)
        self._own_row.copy_(self.table)
        self.mesh.in_flight.append(self.mesh.manager.allreduce(self.buffer, reduce_op=tdist.ReduceOp.SUM))
        self.last_bytes = self.buffer.numel() * self.buffer.element_size()
        self.bytes_sent += self.last_bytes

    def wait(self, divide: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The participants' mean of the weights (their sum with divide=False) and the table of
        words (one row per replica id), as dist.ReplicaExchange.wait. Where the exchange
        failed (mesh.committed is False), this replica's own weights and word, a mean of one."""
        if self.mesh.in_flight:
            raise RuntimeError("FtExchange.wait before FtMesh.commit: commit waits for the exchange first")
        if self.mesh.committed:
            present = self.table[:, 0].tolist()
            self.mesh.participants = [r for r, flag in enumerate(present) if flag == 1.0]
            n = self.mesh.manager.num_participants()
            if len(self.mesh.participants) != n or sum(present) != n:
                raise ConfigError(
                    f"ft.replica_id: {n} replicas took part in an exchange but their rows say {present}: "
                    f"give every replica job of a run its own ft.replica_id"
                )
            if divide:
                self.flat.div_(n)
        else:  # the buffer may hold anything: what this replica sent, as a mean of one
            self.mesh.participants = []
            self.flat.copy_(self._own_weights)
            self.table.copy_(self._own_row)
        return self.flat, self.table[:, 1:]


class FtCoupling(ReplicaCoupling):
    """ReplicaCoupling whose exchanges run through the FtMesh's torchft Manager."""

    def _new_exchange(self, numel: int, compressed: bool = True) -> FtExchange:
        return FtExchange(numel, Guard.WORD_LENGTH, self.state.dtype, self._device, self.mesh)


def build_manager(
    ft, state_dict, load_state_dict, store_addr: str | None = None, store_port: int | None = None
):
    """This replica job's torchft Manager (ft: the FtConfig): a synchronous quorum every step
    (a healing replica has its state before the step's exchange starts), each replica's own
    initial weights (init_sync=False), the timeouts of ft.timeout_s and ft.quorum_timeout_s.
    The job's TCPStore is torchrun's (MASTER_ADDR, MASTER_PORT) unless given."""
    torchft = import_torchft()
    from torchft.process_group import ProcessGroupGloo

    timeout = timedelta(seconds=ft.timeout_s)
    return torchft.Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=load_state_dict,
        state_dict=state_dict,
        min_replica_size=ft.quorum,
        use_async_quorum=False,
        timeout=timeout,
        quorum_timeout=timedelta(seconds=ft.quorum_timeout_s),
        connect_timeout=timedelta(seconds=ft.quorum_timeout_s),
        rank=0,
        world_size=1,
        store_addr=store_addr,
        store_port=store_port,
        lighthouse_addr=ft.lighthouse,
        replica_id=str(ft.replica_id),
        init_sync=False,
    )
