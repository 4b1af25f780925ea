"""Classification metrics: accuracy (FA/RA/TA), output distributions, KL vs retrain, Gap."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EVAL_BATCH = 512


def non_finite_outputs(split: str) -> str:
    """The DivergedError message for a model whose outputs on `split` hold inf/NaN."""
    return f"outputs on the {split} split are not finite (the weights overflowed; try a lower lr)"


@torch.no_grad()
def probabilities(model: nn.Module, x: np.ndarray, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Softmax outputs of `model` on images `x` (eval mode, batched, on the model's device)."""
    if len(x) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size])).to(device)
        out.append(F.softmax(model(xb).float(), dim=1).cpu())
    model.train(was_training)
    return torch.cat(out).numpy()


def accuracy_from_probs(probs: np.ndarray, y: np.ndarray) -> float:
    """Percent of rows whose arg-max is the label (NaN for an empty set)."""
    if len(y) == 0:
        return float("nan")
    return float(100.0 * np.mean(probs.argmax(1) == y))


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray, batch_size: int = EVAL_BATCH) -> float:
    """Percent correct of `model` on (x, y)."""
    return accuracy_from_probs(probabilities(model, x, batch_size), y)


def kl_divergence(p_ref: np.ndarray, p: np.ndarray, eps: float = 1e-12) -> float:
    """Mean over rows of KL(p_ref || p) in nats: how far the unlearned outputs are from retrain's."""
    p_ref = np.clip(p_ref, eps, 1.0)
    p = np.clip(p, eps, 1.0)
    return float(np.mean(np.sum(p_ref * (np.log(p_ref) - np.log(p)), axis=1)))


GAP_METRICS = ("FA", "RA", "TA", "MIA")


def gap(metrics: dict[str, float], reference: dict[str, float]) -> float:
    """Avg.D: mean absolute difference to the reference over FA, RA, TA, MIA (those both have)."""
    diffs = [abs(metrics[k] - reference[k]) for k in GAP_METRICS
             if k in metrics and k in reference and metrics[k] is not None and reference[k] is not None]
    return float(np.mean(diffs)) if diffs else float("nan")
