"""Losses and evaluation of one model's outputs."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from replica_dist import dist

LOSSES = {
    "cross_entropy": F.cross_entropy,
    "mse": F.mse_loss,
    "sse": lambda output, target: F.mse_loss(output, target, reduction="sum"),
}


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    """Class probabilities (classification) or outputs (regression), in eval mode."""
    was_training = model.training
    model.eval()
    output = model(x)
    model.train(was_training)
    return output.softmax(dim=1) if task == "classification" else output


@torch.no_grad()
def score(prediction: torch.Tensor, y: torch.Tensor, task: str, loss: str) -> dict[str, float]:
    """Loss (and accuracy) of predictions made by `predict` (or a mean of several)."""
    if task == "classification":
        log_probs = prediction.clamp_min(torch.finfo(prediction.dtype).tiny).log()
        return {
            "loss": F.nll_loss(log_probs, y).item(),
            "accuracy": (prediction.argmax(dim=1) == y).double().mean().item(),
        }
    return {"loss": LOSSES[loss](prediction, y).item()}


class _Totals:
    """Sums over a stream of batches, kept on the device (no host sync per batch)."""

    def __init__(self):
        self.loss = self.correct = None
        self.count = self.elements = 0

    def add(self, prediction: torch.Tensor, y: torch.Tensor, task: str, loss: str) -> None:
        if task == "classification":
            log_probs = prediction.clamp_min(torch.finfo(prediction.dtype).tiny).log()
            batch_loss = F.nll_loss(log_probs, y, reduction="sum").double()
            correct = (prediction.argmax(dim=1) == y).sum()
            self.correct = correct if self.correct is None else self.correct + correct
        else:
            batch_loss = F.mse_loss(prediction, y, reduction="sum").double()
        self.loss = batch_loss if self.loss is None else self.loss + batch_loss
        self.count += len(y)
        self.elements += y.numel()

    def result(self, task: str, loss: str) -> dict[str, float]:
        """As `score` would give on all the batches at once (sums in float64, so up to rounding)."""
        if task == "classification":
            return {"loss": self.loss.item() / self.count, "accuracy": self.correct.item() / self.count}
        total = self.loss.item()
        return {"loss": total if loss == "sse" else total / self.elements}


@torch.no_grad()
def stream_score(model: nn.Module, batches: Iterable, task: str, loss: str) -> dict[str, float]:
    """`score(predict(model, x), y)` over (x, y) batches, for data that need not fit in memory."""
    totals = _Totals()
    for x, y in batches:
        totals.add(predict(model, x, task), y, task, loss)
    return totals.result(task, loss)


@torch.no_grad()
def evaluate_models(
    replica: nn.Module,
    center: nn.Module,
    splits: dict[str, Iterable],
    task: str,
    loss: str,
    mesh: dist.Mesh,
) -> dict[str, dict[str, float]]:
    """Loss (and accuracy) of this replica, the center (a model holding the mean weights and
    mean floating buffers) and the ensemble (mean of the replicas' output probabilities, or
    outputs for regression) on each split, as {"replica": {"<split>/<metric>": value}, ...}.
    Each split is an iterable of (x, y) batches on the device (data.TensorStream or
    data.DatasetStream), the same on every rank; one all_reduce per batch, of its predictions."""
    results = {"replica": {}, "center": {}, "ensemble": {}}
    for split, batches in splits.items():
        totals = {name: _Totals() for name in results}
        for x, y in batches:
            replica_prediction = predict(replica, x, task)
            totals["replica"].add(replica_prediction, y, task, loss)
            totals["center"].add(predict(center, x, task), y, task, loss)
            totals["ensemble"].add(dist.replica_mean(replica_prediction, mesh), y, task, loss)
        for model_name, total in totals.items():
            for metric, value in total.result(task, loss).items():
                results[model_name][f"{split}/{metric}"] = value
    return results
