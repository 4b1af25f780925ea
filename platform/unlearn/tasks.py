"""Tasks: what a kind of model is trained and judged by (classification, diffusion; later language modelling).

A `Task` bundles the per-sample loss every method sees as `ctx.loss`, the relabelling loss of random-label
methods (`ctx.relabel`) and the evaluator its models are judged by (registered under the task's name in
`unlearn.evaluation.EVALUATORS`). Each model family declares its task in `unlearn.models.MODELS`, so
`task_of(model_name)` reads it there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.batch import Batch, LossFn, RelabelFn, SampleFn
from unlearn.data.base import ImageDataset
from unlearn.data.scenarios import Splits
from unlearn.evaluation import Evaluator, build_evaluator
from unlearn.models import MODELS
from unlearn.models.ddpm import diffusion_loss, draw, pseudo_label_loss
from unlearn.spec import JobSpec, Registry


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each sample."""
    return F.cross_entropy(model(batch.x), batch.y, reduction="none")


@dataclass(frozen=True)
class Task:
    """The loss, relabelling and evaluator that methods and the engine see for one kind of model."""

    name: str
    loss: LossFn
    # None: relabelling is the task loss under the new labels. Diffusion: SalUn's pseudo-label loss (the task
    # loss under other labels would train those labels to draw the forgotten images).
    relabel: RelabelFn | None
    # generative tasks: how a model draws inputs (generative replay, e.g. SA); None for classifiers
    sample: SampleFn | None = None

    def evaluator(self, splits: Splits, spec: JobSpec, dataset: ImageDataset) -> Evaluator:
        """The evaluator of this task's models on a job's splits."""
        return build_evaluator(self.name, splits, spec, dataset)


TASKS: Registry[Task] = Registry("task", "task")
TASKS.register("classification", Task("classification", classification_loss, relabel=None))
TASKS.register("diffusion", Task("diffusion", diffusion_loss, relabel=pseudo_label_loss, sample=draw))


def get_task(name: str) -> Task:
    """The task registered under `name`."""
    return TASKS.lookup(name)


def task_of(model_name: str) -> str:
    """The task a model family serves, as its registry entry declares."""
    return MODELS.lookup(model_name).task


def loss_for(task: str) -> LossFn:
    """The per-sample loss of a task (diffusion: noise-prediction MSE)."""
    return get_task(task).loss


def sampler_for(task: str) -> SampleFn | None:
    """The task's sampler (generative tasks), else None."""
    return get_task(task).sample


def relabel_for(task: str) -> RelabelFn | None:
    """The task's relabelling loss, where plain relabelling through the task loss would be wrong."""
    return get_task(task).relabel


__all__ = ["TASKS", "Task", "classification_loss", "get_task", "loss_for", "relabel_for", "sampler_for", "task_of"]
