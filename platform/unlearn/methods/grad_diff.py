"""GradDiff: gradient ascent on the forget answers and descent on the retain answers, in one step.

loss = forget_weight · (−NLL on forget) + retain_weight · NLL on retain (open-unlearning's GradDiff with
retain_loss_type NLL; `token_losses.grad_diff_loss`). Each NLL is the mean over every answer token of the global
batch (`ctx.row_mean` over `ctx.scored_rows`), so a worker holding few answer tokens weighs no more than its tokens.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.lm_defaults import (OPEN_UNLEARNING, lm_batch_size, lm_epochs, lm_lr, lm_optimizer,
                                         lm_weight_decay)
from unlearn.methods.token_losses import grad_diff_loss
from unlearn.params import ForgetBatchParams, hparam, loguniform

GRAD_DIFF_CONFIG = f"{OPEN_UNLEARNING} configs/trainer/GradDiff.yaml"


def answer_nll(ctx: Context, model: nn.Module, batch: Batch) -> torch.Tensor:
    """The NLL of a batch's answer tokens, averaged over every answer token of the global batch (this worker's
    share of that mean: see `Context.row_mean`)."""
    rows, targets = ctx.scored_rows(model, batch)
    return ctx.row_mean(F.cross_entropy(rows, targets, reduction="sum"), len(targets))


class GradDiffParams(ForgetBatchParams):
    lr: float = lm_lr(3e-4,
                      "forget NLL 0.17 -> 1.49 / 0.10 -> 1.94, retain 0.15 -> 0.22 / 0.10 -> 0.31 at seeds 1 / 2 (1e-3: "
                      "retain 0.50 at seed 1)")
    epochs: float = lm_epochs()
    batch_size: int = lm_batch_size()
    optimizer: Literal["sgd", "adam", "adamw"] = lm_optimizer()
    weight_decay: float = lm_weight_decay()
    forget_weight: float = hparam(1.0, ge=0, le=100, search=loguniform(0.1, 10.0),
                                  paper=f"{GRAD_DIFF_CONFIG}: gamma 1.0",
                                  help="weight of the forget term (-NLL; open-unlearning's gamma)")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=loguniform(0.1, 10.0),
                                  paper=f"{GRAD_DIFF_CONFIG}: alpha 1.0 (retain_loss_type NLL)",
                                  help="weight of the retain NLL (open-unlearning's alpha)")


@register
class GradDiff(Method):
    name = "grad_diff"
    uses = frozenset({"forget", "retain"})
    primary = "forget"
    tasks = frozenset({"language_modelling"})
    Params = GradDiffParams
    paper = ("Liu et al. 2022 (gradient difference); TOFU's baseline (Maini et al. 2024) as open-unlearning "
             "implements it")
    summary = "ascend the forget answers' NLL while descending the retain answers'"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        forget_nll = answer_nll(ctx, ctx.model, forget)
        retain_nll = answer_nll(ctx, ctx.model, retain)
        self.apply(ctx, grad_diff_loss(forget_nll, retain_nll, gamma=p.forget_weight, alpha=p.retain_weight))
        return {"forget_nll": forget_nll.item(), "retain_nll": retain_nll.item()}
