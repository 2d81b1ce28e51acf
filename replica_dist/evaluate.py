"""Losses and evaluation of one model's outputs."""

from __future__ import annotations

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


@torch.no_grad()
def evaluate_models(
    replica: nn.Module,
    center: nn.Module,
    splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
    task: str,
    loss: str,
    mesh: dist.Mesh,
) -> dict[str, dict[str, float]]:
    """Loss (and accuracy) of this replica, the center (a model holding the mean weights and
    mean floating buffers) and the ensemble (mean of the replicas' output probabilities, or
    outputs for regression) on each split, as {"replica": {"<split>/<metric>": value}, ...}.
    One all_reduce, of every split's predictions at once."""
    replica_predictions = {split: predict(replica, x, task) for split, (x, _) in splits.items()}
    ensemble_flat = dist.replica_mean(torch.cat([p.flatten() for p in replica_predictions.values()]), mesh)
    ensemble_predictions, offset = {}, 0
    for split, prediction in replica_predictions.items():
        ensemble_predictions[split] = ensemble_flat[offset : offset + prediction.numel()].view_as(prediction)
        offset += prediction.numel()
    results = {"replica": {}, "center": {}, "ensemble": {}}
    for split, (x, y) in splits.items():
        for model_name, prediction in (
            ("replica", replica_predictions[split]),
            ("center", predict(center, x, task)),
            ("ensemble", ensemble_predictions[split]),
        ):
            for metric, value in score(prediction, y, task, loss).items():
                results[model_name][f"{split}/{metric}"] = value
    return results
