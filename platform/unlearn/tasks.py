"""Per-sample task losses: what `ctx.loss` computes for each kind of model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.methods.base import Batch, LossFn, RelabelFn


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each sample."""
    return F.cross_entropy(model(batch.x), batch.y, reduction="none")


def task_of(model_name: str) -> str:
    return "diffusion" if model_name == "ddpm" else "classification"


def loss_for(task: str, model: nn.Module | None = None) -> LossFn:
    """The per-sample loss of a task (diffusion: noise-prediction MSE, from the model's scheduler)."""
    if task == "classification":
        return classification_loss
    from unlearn.models.ddpm import diffusion_loss

    return diffusion_loss


def relabel_for(task: str) -> RelabelFn | None:
    """The task's relabelling loss, where plain relabelling through the task loss would be wrong.

    Diffusion: SalUn's pseudo-label loss (the task loss under other labels would train those labels to draw
    the forgotten images). Classification: None, the task loss under the new labels.
    """
    if task == "classification":
        return None
    from unlearn.models.ddpm import pseudo_label_loss

    return pseudo_label_loss
