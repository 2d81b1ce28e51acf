"""Per-layer statistics and the TensorBoard loggers.

Metrics are flat {"group/name": float} dicts; per-layer tags use the parameter's own name
(`rate/fc1.weight`). Each replica writes its own run `tb/replica_<r>/`; rank 0 also writes
`tb/center/` and `tb/ensemble/`. Other ranks get a NullLogger for those, so the loop needs
no rank checks.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from pathlib import Path
from typing import Protocol

import torch
from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.record_writer import RecordWriter


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


_file_numbers = itertools.count()


class TensorBoardLogger:
    """Scalars of one TensorBoard run, in one new event file under `log_dir`.

    Written in the calling thread, unlike torch's SummaryWriter: its background thread prints
    a failed write as a traceback of its own and hands the OSError to the caller only at a
    later call, or not at all when it fails just as a flush returns. Here `log` encodes into
    memory and `flush` writes, raising the OSError of a failed write (a full disk, say); what
    did not fit is cut off again, so the file always ends with a whole record. The file
    holds what TensorBoard's writer puts there: a version event, with `purge_step` a restart
    marker (TensorBoard then hides this run's older values from that step on), and scalars
    as simple values.
    """

    def __init__(self, log_dir: Path, purge_step: int | None = None):
        log_dir.mkdir(parents=True, exist_ok=True)
        # TensorBoard's own naming: one file per writer, read in the order of their names.
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = log_dir / f"{name}.{next(_file_numbers)}"
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._written = 0
        self._pending = io.BytesIO()
        self._records = RecordWriter(self._pending)
        self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))
        if purge_step is not None:
            self._add(
                Event(wall_time=time.time(), step=purge_step, session_log=SessionLog(status=SessionLog.START))
            )
        self.flush()

    def _add(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Add scalars of `step`; they reach the file at the next flush."""
        wall_time = time.time()
        for tag, value in metrics.items():
            summary = Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
            self._add(Event(wall_time=wall_time, step=step, summary=summary))

    def flush(self) -> None:
        """Write what `log` added; raise OSError, naming this file, if the file system refuses
        (nothing of it is then kept: the file is cut back to its last whole record)."""
        data = self._pending.getvalue()
        self._pending.seek(0)
        self._pending.truncate()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as err:
            try:
                os.ftruncate(self._fd, self._written)
                os.lseek(self._fd, self._written, os.SEEK_SET)
            except OSError:
                pass  # the write's error is the one to report
            err.filename = err.filename or str(self.path)
            raise
        self._written += len(data)

    def close(self) -> None:
        """Flush and close the file (also when the flush fails)."""
        if self._fd < 0:
            return
        try:
            self.flush()
        finally:
            os.close(self._fd)
            self._fd = -1


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _as_floats(metrics: dict[str, torch.Tensor]) -> dict[str, float]:
    # One device-to-host transfer for all values, not one per tag.
    values = torch.stack(list(metrics.values())).tolist()
    return dict(zip(metrics.keys(), values))


@torch.no_grad()
def replica_layer_stats(
    names: list[str],
    before: list[torch.Tensor],
    after_optimizer: list[torch.Tensor],
    after: list[torch.Tensor],
    center: list[torch.Tensor],
) -> dict[str, float]:
    """One replica's per-layer view of a step, from its weights before the step, after the
    optimizer, after the coupling, and the center (mean of all replicas) after the step.

    rate: |mean(dw)|, the note's "learning rate of the layer" (a signed mean that includes
    the coupling's motion); update_ratio: |dw| / |w|; grad_step and coupling_step: norms of
    the optimizer's and the coupling's parts of dw (with coupling.via_optimizer the pull is
    inside the optimizer's part); dist_to_center: |w - center| after the step."""
    stats = {}
    for name, w0, w_opt, w1, c in zip(names, before, after_optimizer, after, center):
        stats |= _step_stats(name, w0, w1)
        stats[f"grad_step/{name}"] = (w_opt - w0).norm()
        stats[f"coupling_step/{name}"] = (w1 - w_opt).norm()
        stats[f"dist_to_center/{name}"] = (w1 - c).norm()
    return _as_floats(stats)


def _step_stats(name: str, w0: torch.Tensor, w1: torch.Tensor) -> dict[str, torch.Tensor]:
    """rate, update_ratio and weight_norm of one tensor moving from w0 to w1."""
    delta = w1 - w0
    return {
        f"rate/{name}": delta.mean().abs(),
        f"update_ratio/{name}": delta.norm() / w0.norm().clamp_min(torch.finfo(w0.dtype).tiny),
        f"weight_norm/{name}": w1.norm(),
    }


@torch.no_grad()
def center_layer_stats(
    names: list[str], before: list[torch.Tensor], after: list[torch.Tensor]
) -> dict[str, float]:
    """The center's (mean weights') per-layer rate, update ratio and norm over a step."""
    stats = {}
    for name, c0, c1 in zip(names, before, after):
        stats |= _step_stats(name, c0, c1)
    return _as_floats(stats)


@torch.no_grad()
def squared_norms(weights: list[torch.Tensor]) -> list[float]:
    """‖w‖² of each tensor, in float64 (the pairwise overlap subtracts large, close numbers)."""
    return torch.stack([w.double().pow(2).sum() for w in weights]).tolist()


@torch.no_grad()
def replica_overlaps(
    names: list[str], weights: list[torch.Tensor], center: list[torch.Tensor]
) -> dict[str, float]:
    """overlap/<name>: q_a = w_a·w̄ / (‖w_a‖‖w̄‖), this replica's cosine with the center."""
    stats = {}
    for name, w, c in zip(names, weights, center):
        w, c = w.double().flatten(), c.double().flatten()
        stats[f"overlap/{name}"] = (w @ c) / (w.norm() * c.norm()).clamp_min(torch.finfo(torch.float64).tiny)
    return _as_floats(stats)


@torch.no_grad()
def pairwise_overlaps(
    names: list[str], center: list[torch.Tensor], replica_squared_norms: torch.Tensor
) -> dict[str, float]:
    """pairwise_overlap/<name>: mean over pairs a≠b of w_a·w_b, divided by the mean of ‖w_a‖²
    (the cosine when all norms are equal), from the center alone and every replica's ‖w_a‖²
    (a (replicas, layers) table): Σ_{a≠b} w_a·w_b = ‖Σ_a w_a‖² − Σ_a ‖w_a‖², with Σ_a w_a = n·w̄.
    Needs no exchange of weights; empty for a single replica."""
    n = replica_squared_norms.shape[0]
    if n < 2:
        return {}
    stats = {}
    for i, (name, c) in enumerate(zip(names, center)):
        sum_of_squares = replica_squared_norms[:, i].sum()
        square_of_sum = n * n * c.double().pow(2).sum().cpu()
        mean_pair_dot = (square_of_sum - sum_of_squares) / (n * (n - 1))
        stats[f"pairwise_overlap/{name}"] = mean_pair_dot / (sum_of_squares / n).clamp_min(
            torch.finfo(torch.float64).tiny
        )
    return _as_floats(stats)
