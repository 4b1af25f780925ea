"""RL (random labels): train on the forget data relabelled at random with wrong labels, plus the retain data."""

from __future__ import annotations

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import MethodParams, hparam, loguniform, uniform


def random_other_labels(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A uniformly drawn label different from each sample's own."""
    offset = torch.randint(1, num_classes, y.shape, device=y.device)
    return (y + offset) % num_classes


def random_label_loss(ctx: Context, forget: Batch, retain: Batch, retain_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean relabelling loss of the forget batch under random wrong labels + retain_weight × mean retain loss.

    Classification: cross-entropy to the wrong labels. Diffusion (`ctx.relabel`, SalUn's DDPM variant): the
    prediction under the forgotten label is pulled to the detached prediction under the wrong label, so the
    forgotten label learns to draw another class.
    """
    wrong = random_other_labels(forget.y, ctx.num_classes)
    forget_loss = ctx.relabel_loss(ctx.model, forget, wrong).mean()
    retain_loss = ctx.loss(ctx.model, retain).mean()
    return forget_loss + retain_weight * retain_loss, {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()}


class RLParams(MethodParams):
    lr: float = hparam(0.01, gt=0, le=10, search=loguniform(1e-4, 0.1),
                       paper="Golatkar et al. 2020; settings of SalUn's RL baseline (lr ~0.01, SGD momentum 0.9)",
                       help="learning rate")
    epochs: float = hparam(4.0, gt=0, le=1000, search=loguniform(1, 20),
                           paper="SalUn's RL baseline: 10 epochs over D_f ∪ D_r; 4 retain passes on digits (one pass "
                                 "leaves RA 10-25 points down, the retain data must repair it)",
                           help="passes over the retain data (each step also takes a forget batch)")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=uniform(0.0, 2.0),
                                  paper="SalUn (classification): forget and retain batches weigh the same",
                                  help="weight of the retain loss")


@register
class RL(Method):
    name = "rl"
    uses = frozenset({"forget", "retain"})
    primary = "retain"
    tasks = frozenset({"classification"})
    Params = RLParams
    paper = "Golatkar et al. 2020 (random labels); as run by Fan et al. 2024 (SalUn)"
    summary = "fine-tune on the forget data with random wrong labels plus the retain data"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss, logged = random_label_loss(ctx, forget, retain, self.params.retain_weight)
        self.apply(ctx, loss)
        return logged
