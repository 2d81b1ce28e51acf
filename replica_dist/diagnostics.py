"""What the loop measures on logging and evaluation steps, and where it writes it.

Each replica writes its own TensorBoard run `tb/replica_<r>/`; rank 0 also writes
`tb/center/` and `tb/ensemble/`. The other ranks hold NullLoggers for those, so no code
here or in the loop asks which rank it is on.

Every call that writes (the constructor, log_step, evaluate) writes and flushes this rank's
files, then agrees with the other ranks (dist.first_failure, one small all_reduce): a write
that fails on one rank (a full disk) raises RunError on every rank at the same step, naming
the file and the cause, instead of one rank stopping while the others wait in a collective.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from replica_dist import checkpoint, dist
from replica_dist.errors import RunError
from replica_dist.evaluate import evaluate_models
from replica_dist.flat import FlatState
from replica_dist.metrics import (
    MetricLogger,
    NullLogger,
    TensorBoardLogger,
    center_layer_stats,
    pairwise_overlaps,
    replica_layer_stats,
    replica_overlaps,
    squared_norms,
)


class Diagnostics:
    def __init__(
        self,
        run_dir: Path,
        mesh: dist.Mesh,
        state: FlatState,
        center: nn.Module,
        device: torch.device,
        first_step: int,
        gather=None,
    ):
        """`state`: the layout of the vectors the diagnostics read (the unsharded model's);
        `gather`: what makes one of those from one of the coupling's (its state's `gather`, for
        a sharded replica; by default they are already)."""
        self.mesh = mesh
        self.gather = gather or (lambda flat: flat)
        replica = mesh.replica
        writes = mesh.dp_rank == 0  # the ranks of one replica are identical: its first one writes
        self.state = state
        self.names = state.names[: state.num_params]
        self.center = center
        self.center_state = FlatState(center)
        self.device = device
        self.checkpoints = run_dir / "checkpoints"
        # On a resumed run, TensorBoard hides what the interrupted run logged from first_step on.
        purge_step = first_step if first_step > 1 else None
        self.replica_log: MetricLogger = NullLogger()
        self.center_log: MetricLogger = NullLogger()
        self.ensemble_log: MetricLogger = NullLogger()
        failure = None
        try:
            # With parallel.dp > 1 the ranks of one replica are identical: its first one writes.
            if writes:
                self.replica_log = TensorBoardLogger(run_dir / "tb" / f"replica_{replica}", purge_step)
            if writes and replica == 0:
                self.center_log = TensorBoardLogger(run_dir / "tb" / "center", purge_step)
                self.ensemble_log = TensorBoardLogger(run_dir / "tb" / "ensemble", purge_step)
        except OSError as err:
            failure = self._cannot_write(err)
        try:
            self._stop_if_any(failure)
        except RunError:
            self.close()  # the loop's `finally` that closes them is not entered yet
            raise
        self.center_accuracy = math.nan
        """The center's test accuracy at the latest evaluation, for the progress line."""

    def _cannot_write(self, err: OSError) -> str:
        where = err.filename or self.checkpoints.parent / "tb"
        return checkpoint.cannot_write("TensorBoard events", where, err, self.checkpoints)

    @staticmethod
    def _stop_if_any(failure: str | None) -> None:
        failure = dist.first_failure(failure)
        if failure is not None:
            raise RunError(failure)

    def _flush(self) -> None:
        """Write this rank's logged values, then stop every rank together if any rank's write
        failed: one small all_reduce, on every rank, on every logging or evaluation step."""
        failure = None
        for logger in (self.replica_log, self.center_log, self.ensemble_log):
            try:
                logger.flush()
            except OSError as err:
                failure = self._cannot_write(err)
                break
        self._stop_if_any(failure)

    def params(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return self.state.views(flat)[: self.state.num_params]

    def log_step(self, step: int, loss: float, coupling, after, mean_after) -> torch.Tensor:
        """Per-layer statistics of the step for this replica and the center, from what the
        coupling observed (the weights before the step, their mean, the weights after the
        optimizer step) and the weights after the step with their mean; returns every
        replica's loss (a skipped step's may be non-finite: the guard has decided on it)."""
        seen = {key: self.gather(flat) for key, flat in coupling.observed.items()}  # same order everywhere
        before, after_optimizer, mean_before = seen["before"], seen["after_optimizer"], seen["mean_before"]
        eta, skipped_steps = coupling.eta, coupling.guard.skipped_steps
        weights, center = self.params(after), self.params(mean_after)
        # One small all_reduce: every replica's loss and per-layer ‖w‖², row by row.
        table = dist.gather_rows([loss, *squared_norms(weights)], self.device, self.mesh)
        losses = table[:, 0]
        self.replica_log.log(
            {
                "train/loss": loss,
                "coupling/eta": eta,
                "guard/skipped_steps": skipped_steps,
                "comm/bytes_sent": coupling.bytes_sent,  # cumulative, this rank's coupling exchanges
            }
            | replica_layer_stats(
                self.names, self.params(before), self.params(after_optimizer), weights, center
            )
            | replica_overlaps(self.names, weights, center),
            step,
        )
        self.center_log.log(
            {"train/replica_mean_loss": losses.nanmean().item()}
            | center_layer_stats(self.names, self.params(mean_before), center)
            | pairwise_overlaps(self.names, center, table[:, 1:]),
            step,
        )
        self._flush()
        return losses

    def evaluate(
        self, step: int, replica: nn.Module, mean_after: torch.Tensor, splits, task: str, loss: str
    ) -> dict:
        """Train-set and test metrics of this replica, the center and the ensemble."""
        self.center_state.load(mean_after)
        evaluation = evaluate_models(replica, self.center, splits, task, loss, self.mesh)
        self.replica_log.log(evaluation["replica"], step)
        self.center_log.log(evaluation["center"], step)
        self.ensemble_log.log(evaluation["ensemble"], step)
        self.center_accuracy = evaluation["center"].get("test/accuracy", math.nan)
        self._flush()
        return evaluation

    def close(self) -> None:
        """Close the files. Quietly: every value logged was flushed and agreed on by the step
        that logged it, so a failure here can only repeat one already reported."""
        for logger in (self.replica_log, self.center_log, self.ensemble_log):
            try:
                logger.close()
            except OSError:
                pass
