"""Evaluation of an unlearned model against the retrain reference.

One evaluator per task, registered in `EVALUATORS` under the task's name: `ClassificationEvaluator` here,
`DiffusionEvaluator` in diffusion.py. An evaluator is built once per job from its splits, spec and dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
from torch import nn

from unlearn.data.base import ImageDataset
from unlearn.data.scenarios import Splits
from unlearn.evaluation.diffusion import DiffusionEvaluator
from unlearn.evaluation.language_modelling import LanguageModellingEvaluator
from unlearn.errors import DivergedError
from unlearn.evaluation.metrics import accuracy_from_probs, gap, kl_divergence, non_finite_outputs, probabilities
from unlearn.evaluation.mia import mia_efficacy
from unlearn.spec import JobSpec, Registry


@dataclass
class Outputs:
    """A model's softmax outputs on the evaluation splits (kept to compute KL vs retrain)."""

    target: np.ndarray
    retain: np.ndarray
    test: np.ndarray


def outputs(model: nn.Module, splits: Splits) -> Outputs:
    return Outputs(probabilities(model, splits.target.x), probabilities(model, splits.retain.x),
                   probabilities(model, splits.test.x))


def classification_metrics(out: Outputs, splits: Splits, mia: bool = True, seed: int = 0) -> dict[str, float]:
    """FA (on the target concept), RA, TA and MIA-efficacy, in percent."""
    for name in ("target", "retain", "test"):
        if not np.isfinite(getattr(out, name)).all():
            raise DivergedError(non_finite_outputs(name))
    result = {
        "FA": accuracy_from_probs(out.target, splits.target.y),
        "RA": accuracy_from_probs(out.retain, splits.retain.y),
        "TA": accuracy_from_probs(out.test, splits.test.y),
    }
    if mia:
        result["MIA"] = mia_efficacy(out.retain, splits.retain.y, out.test, splits.test.y,
                                     out.target, splits.target.y, seed=seed)
    return result


def versus_reference(metrics: dict[str, float], out: Outputs, ref_metrics: dict[str, float],
                     ref_out: Outputs) -> dict[str, float]:
    """Gap (Avg.D) and KL(retrain || model) on the test set."""
    return {"gap": gap(metrics, ref_metrics), "KL": kl_divergence(ref_out.test, out.test)}


class Evaluator(Protocol):
    """What the job and Tune ask of a task's evaluator."""

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Any]:
        """The model's metrics, and the outputs `compare` needs."""

    def compare(self, metrics: dict[str, float], out: Any, ref_metrics: dict[str, float],
                ref_out: Any) -> dict[str, float]:
        """Metrics against the reference (retrain) model."""

    def artifacts(self, model: nn.Module, name: str, folder: Path, out: Any = None) -> list[Path]:
        """Files to attach to the model's run (`out`: what `evaluate` returned for it, where at hand)."""


class ClassificationEvaluator:
    """FA/RA/TA/MIA of a model on a job's splits, and Gap/KL against a reference."""

    def __init__(self, splits: Splits, mia: bool = True, seed: int = 0) -> None:
        self.splits, self.mia, self.seed = splits, mia, seed

    @classmethod
    def for_job(cls, splits: Splits, spec: JobSpec, dataset: ImageDataset) -> "ClassificationEvaluator":
        """The evaluator a job's spec asks for (MIA on or off, the job's seed)."""
        return cls(splits, mia=spec.eval.mia, seed=spec.seed)

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Outputs]:
        out = outputs(model, self.splits)
        return classification_metrics(out, self.splits, self.mia, self.seed), out

    def compare(self, metrics: dict[str, float], out: Outputs, ref_metrics: dict[str, float],
                ref_out: Outputs) -> dict[str, float]:
        return versus_reference(metrics, out, ref_metrics, ref_out)

    def artifacts(self, model: nn.Module, name: str, folder: Path, out: Any = None) -> list[Path]:
        """Extra files to attach to a method's run (none for classifiers)."""
        return []


EvaluatorFactory = Callable[[Splits, JobSpec, ImageDataset], Evaluator]

EVALUATORS: Registry[EvaluatorFactory] = Registry("evaluator", "task")
EVALUATORS.register("classification", ClassificationEvaluator.for_job)
EVALUATORS.register("diffusion", DiffusionEvaluator)
EVALUATORS.register("language_modelling", LanguageModellingEvaluator)


def build_evaluator(task: str, splits: Splits, spec: JobSpec, dataset: ImageDataset) -> Evaluator:
    """The evaluator of a task's models on a job's splits (what `unlearn.tasks.Task.evaluator` returns)."""
    return EVALUATORS.lookup(task)(splits, spec, dataset)


__all__ = ["EVALUATORS", "Evaluator", "EvaluatorFactory", "Outputs", "outputs", "classification_metrics",
           "versus_reference", "ClassificationEvaluator", "build_evaluator"]
