"""U-LiRA (Hayes et al. 2024): a per-example likelihood-ratio attack on unlearning.

The question it asks, per forget sample x: does the model under attack look like one that *unlearned* x
or like one *retrained* without it? Shadow models answer what each looks like for x: K shadow originals on
random halves of the training data (each row in exactly K/2 halves, LiRA's balanced design); from each, the
forget rows in its half are unlearned by the method under test and also retrained away. x's feature is the
logit-scaled confidence of its label, φ = log p_y − log(1 − p_y). Gaussians are fitted to φ(x) under the
"unlearned" shadows (the half that trained on x) and under the "retrained" shadows (every shadow retrain: none
trained on x); the attack's score is Λ(x) = log N(φ; μ_U(x), σ_U) − log N(φ; μ_R(x), σ_R).

Evaluation: each forget row is attacked twice, on the model that unlearned it (a member: the attack should
say "unlearned") and on the job's retrain (a non-member). Balanced accuracy uses the attack's natural
decision Λ > 0 (no threshold fitted on the evaluated models); TPR at 1% FPR sweeps the threshold. 50% balanced
accuracy means the unlearned model is indistinguishable from retrain, per example.

σ: with 8–16 shadows a per-example variance is noisy, so each side's variance is pooled over the examples
(LiRA's "fixed variance" variant, which the LiRA paper recommends for few shadows); means stay per example.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

MIN_STD = 1e-3  # floor on a pooled std (a side whose φ is constant would give an infinite likelihood ratio)
TPR_AT_FPR = 0.01


def logit_confidence(logits: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray) -> np.ndarray:
    """φ = log p_y − log(1 − p_y) from logits, computed stably as z_y − logsumexp(z_{≠y})."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(np.asarray(y), dtype=torch.long)
    true = z.gather(1, y[:, None])[:, 0]
    others = z.scatter(1, y[:, None], -math.inf)
    return (true - torch.logsumexp(others, dim=1)).numpy()


def membership_plan(n_rows: int, n_shadows: int, seed: int, share: float = 1.0) -> np.ndarray:
    """bool [n_shadows, n_rows]: which rows each shadow trains on; every row is in exactly
    round(share · n_shadows) shadows (LiRA's balanced design; share 1: every shadow trains on every row)."""
    holding = int(round(share * n_shadows))
    if n_shadows < 2 or holding < 2:
        raise ValueError(f"U-LiRA needs at least 2 shadows holding each row, got {n_shadows} x share {share}")
    rng = np.random.default_rng([seed, n_shadows, 0x51A])
    keys = rng.random((n_shadows, n_rows))
    # per row, the `holding` shadows with the lowest keys train on it (a random subset of shadows per row)
    ranks = keys.argsort(axis=0).argsort(axis=0)
    return ranks < holding


@dataclass
class ShadowFit:
    """Per-example Gaussians of φ under 'unlearned' and 'retrained' shadows (means per row, pooled stds)."""

    mu_u: np.ndarray
    sd_u: float
    mu_r: np.ndarray
    sd_r: float

    def score(self, phi: np.ndarray) -> np.ndarray:
        """Λ = log N(φ; μ_U, σ_U) − log N(φ; μ_R, σ_R), per row."""
        return _log_normal(phi, self.mu_u, self.sd_u) - _log_normal(phi, self.mu_r, self.sd_r)


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: float) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - math.log(sd)


def _pooled(phi: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-column mean over the masked rows and the std of the residuals pooled over every column."""
    counts = mask.sum(axis=0)
    if (counts == 0).any():
        raise ValueError("a forget row has no shadow on one side of the test (too few shadow models)")
    mu = np.where(mask, phi, 0.0).sum(axis=0) / counts
    resid = np.where(mask, phi - mu, 0.0)
    dof = max(int(mask.sum() - mask.shape[1]), 1)  # one mean per column spent
    return mu, max(float(np.sqrt((resid ** 2).sum() / dof)), MIN_STD)


def fit_shadows(phi_u: np.ndarray, in_u: np.ndarray, phi_r: np.ndarray, in_r: np.ndarray) -> ShadowFit:
    """`phi_*` [shadows, rows]: φ of every forget row under each shadow; `in_*` marks the shadows that count
    for the row on that side (unlearned: the shadows whose half held the row; retrained: those never trained
    on it)."""
    mu_u, sd_u = _pooled(np.asarray(phi_u, dtype=np.float64), np.asarray(in_u, dtype=bool))
    mu_r, sd_r = _pooled(np.asarray(phi_r, dtype=np.float64), np.asarray(in_r, dtype=bool))
    return ShadowFit(mu_u, sd_u, mu_r, sd_r)


def attack(fit: ShadowFit, phi_unlearned: np.ndarray, phi_retrained: np.ndarray) -> dict[str, float]:
    """The attack on each forget row twice: under the model that unlearned it (positive) and under retrain
    (negative). Balanced accuracy at Λ > 0 and TPR at 1% FPR, in percent, and the number of decisions."""
    pos = fit.score(np.asarray(phi_unlearned, dtype=np.float64))
    neg = fit.score(np.asarray(phi_retrained, dtype=np.float64))
    tpr, tnr = float(np.mean(pos > 0)), float(np.mean(neg <= 0))
    return {"ULiRA_BA": 100.0 * (tpr + tnr) / 2, "ULiRA_TPR": 100.0 * tpr_at_fpr(pos, neg, TPR_AT_FPR),
            "ULiRA_n": float(len(pos) + len(neg))}


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, fpr: float) -> float:
    """The highest share of positives scored above a threshold that at most `fpr` of negatives exceed."""
    neg_sorted = np.sort(neg)[::-1]
    allowed = int(math.floor(fpr * len(neg)))  # negatives allowed above the threshold
    threshold = neg_sorted[allowed] if allowed < len(neg_sorted) else -math.inf
    return float(np.mean(pos > threshold))
