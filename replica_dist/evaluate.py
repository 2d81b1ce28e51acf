"""Losses and evaluation of one model's outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
