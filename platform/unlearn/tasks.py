"""Tasks: what a kind of model is trained and judged by (classification, diffusion, language modelling).

A `Task` bundles the per-sample loss every method sees as `ctx.loss`, the relabelling loss of random-label
methods (`ctx.relabel`) and the evaluator its models are judged by (registered under the task's name in
`unlearn.evaluation.EVALUATORS`). Each model family declares its task in `unlearn.models.MODELS`, so
`task_of(model_name)` reads it there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.batch import Batch, LossFn, RelabelFn, RowsFn, SampleFn
from unlearn.data.base import ImageDataset
from unlearn.data.scenarios import Splits
from unlearn.evaluation import Evaluator, build_evaluator
from unlearn.models import MODELS
from unlearn.lm_task import bind_job, lm_loss, token_rows
from unlearn.models.ddpm import diffusion_loss, draw, pseudo_label_loss
from unlearn.spec import JobSpec, Registry


def classification_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of each sample."""
    return F.cross_entropy(model(batch.x), batch.y, reduction="none")


def classification_rows(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A classifier's scored rows: one per sample, its logits and label."""
    return model(batch.x), batch.y


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
    # the rows a distillation loss scores (`ctx.scored_rows`): a classifier's samples, a language model's answer
    # tokens; None: the task has none (diffusion)
    rows: RowsFn | None = None
    # True: a mean over rows divides by the global row count across workers (answer tokens fall unevenly)
    global_rows: bool = False
    # fits the job's sections to each other before any work (a language model and its dataset's tokenizer)
    bind: Callable[[JobSpec], JobSpec] | None = None

    def bound(self, spec: JobSpec) -> JobSpec:
        """The spec as this task runs it."""
        return self.bind(spec) if self.bind is not None else spec

    def evaluator(self, splits: Splits, spec: JobSpec, dataset: ImageDataset) -> Evaluator:
        """The evaluator of this task's models on a job's splits."""
        return build_evaluator(self.name, splits, spec, dataset)


TASKS: Registry[Task] = Registry("task", "task")
TASKS.register("classification", Task("classification", classification_loss, relabel=None, rows=classification_rows))
TASKS.register("diffusion", Task("diffusion", diffusion_loss, relabel=pseudo_label_loss, sample=draw))
TASKS.register("language_modelling", Task("language_modelling", lm_loss, relabel=None, rows=token_rows,
                                          global_rows=True, bind=bind_job))


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
