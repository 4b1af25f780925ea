"""SalUn: random-label unlearning restricted to the salient weights.

Saliency = |∇θ ℓ(D_f)| at θ0 (the mean forget-loss gradient: per-sample sums and the count are
all-reduced first); the mask keeps the top `saliency_fraction` of all weights (one threshold over every
parameter tensor). Training is RL's loss (and RL's schedule: the release's forget pass then retain pass per epoch, or both
batches every step) with the gradient outside the mask zeroed. For diffusion
models the forgotten label is steered to a random other class's noise prediction (SalUn's DDPM code).
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.rl import RELEASE_SCHEDULE, release_epoch_steps, scheduled_random_label_loss
from unlearn.methods.whole_set import flatten, mean_gradient, unflatten
from unlearn.params import DIVERGES_FROZEN, ForgetBatchParams, forget_batch_norm_stats, hparam, loguniform, uniform


def top_fraction_mask(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """0/1 masks keeping the `fraction` highest scores over all tensors together (exactly that many)."""
    flat = flatten(scores)
    keep = int(round(fraction * flat.numel()))
    mask = torch.zeros_like(flat)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = 1.0
    return unflatten(mask, scores)


class SalUnParams(ForgetBatchParams):
    norm_stats: Literal["update", "frozen"] = forget_batch_norm_stats(
        family={"cnn": "update"}, why=DIVERGES_FROZEN.format(what="collapsed to chance (RA 5.3%; updating: RA 98.0)"))
    lr: float = hparam(0.01, gt=0, le=10, search=loguniform(1e-4, 0.1),
                       paper="SalUn release (classification, RL-based): lr ~0.01-0.013, SGD momentum 0.9",
                       help="learning rate")
    epochs: float = hparam(4.0, gt=0, le=1000, search=loguniform(1, 20),
                           paper="SalUn release: 10 epochs over D_f ∪ D_r; 4 on digits (as rl)",
                           help="epochs: a forget pass then a retain pass each (`paired`: retain passes, each step "
                                "also taking a forget batch)")
    schedule: Literal["release", "paired"] = hparam("release", paper=RELEASE_SCHEDULE,
                                                    help="release: a forget pass then a retain pass per epoch; "
                                                         "paired: a forget and a retain batch every step (diffusion "
                                                         "always pairs, as SalUn's DDPM script)")
    saliency_fraction: float = hparam(0.5, gt=0, le=1, search=uniform(0.1, 0.9),
                                      paper="SalUn release: mask of the top 50% of |gradient| weights",
                                      help="share of all weights that may change")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=loguniform(1e-4, 2.0),
                                  paper="SalUn release: 1 for classification (its DDPM script uses 1e-3)",
                                  help="weight of the retain loss")


@register
class SalUn(Method):
    name = "salun"
    uses = frozenset({"forget", "retain"})
    primary = "retain"
    tasks = frozenset({"classification", "diffusion"})
    Params = SalUnParams
    paper = "Fan et al. 2024, SalUn: gradient-based weight saliency (OPTML-Group/Unlearn-Saliency)"
    summary = "random labels on the forget data, updating only the weights most salient to it"

    def setup(self, ctx: Context) -> None:
        gradient = mean_gradient(ctx, ctx.original, ctx.forget_batches())
        self.mask = top_fraction_mask({n: g.abs() for n, g in gradient.items()}, self.params.saliency_fraction)

    def epoch_steps(self, forget_size: int, retain_size: int, task: str) -> int | None:
        return release_epoch_steps(self.params, forget_size, retain_size, task)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss, logged = scheduled_random_label_loss(ctx, forget, retain, self.params)
        self.apply(ctx, loss, self.mask)
        return logged
