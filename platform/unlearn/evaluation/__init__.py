"""Evaluation of an unlearned model against the retrain reference."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import nn

from unlearn.data.scenarios import Splits
from unlearn.evaluation.metrics import accuracy_from_probs, gap, kl_divergence, probabilities
from unlearn.evaluation.mia import mia_efficacy


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


class ClassificationEvaluator:
    """FA/RA/TA/MIA of a model on a job's splits, and Gap/KL against a reference."""

    def __init__(self, splits: Splits, mia: bool = True, seed: int = 0) -> None:
        self.splits, self.mia, self.seed = splits, mia, seed

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], Outputs]:
        out = outputs(model, self.splits)
        return classification_metrics(out, self.splits, self.mia, self.seed), out

    def compare(self, metrics: dict[str, float], out: Outputs, ref_metrics: dict[str, float],
                ref_out: Outputs) -> dict[str, float]:
        return versus_reference(metrics, out, ref_metrics, ref_out)

    def artifacts(self, model: nn.Module, name: str, folder) -> list:
        """Extra files to attach to a method's run (none for classifiers)."""
        return []


def build_evaluator(task: str, splits: Splits, spec, dataset):
    """The evaluator of a task: classification metrics, or diffusion FA/FD (evaluation/diffusion.py)."""
    if task == "classification":
        return ClassificationEvaluator(splits, mia=spec.eval.mia, seed=spec.seed)
    from unlearn.evaluation.diffusion import DiffusionEvaluator

    return DiffusionEvaluator(splits, spec, dataset)


__all__ = ["Outputs", "outputs", "classification_metrics", "versus_reference", "ClassificationEvaluator",
           "build_evaluator"]
