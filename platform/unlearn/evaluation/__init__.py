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


__all__ = ["Outputs", "outputs", "classification_metrics", "versus_reference"]
