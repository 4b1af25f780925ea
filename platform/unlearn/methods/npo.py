"""NPO: negative preference optimisation on the forget answers, against the frozen original (Zhang et al. 2024).

Per forget sequence −(2/β) log σ(−β (log p_θ(y|x) − log p_ref(y|x))), with log-probs summed over the answer
tokens and p_ref the original (`token_losses.npo_loss`): it starts at GA's gradient and fades as p_θ falls below
p_ref, NPO's bound on GA's collapse. The per-sequence losses are averaged over every sequence of the global batch
(`ctx.row_mean`). As open-unlearning's NPO, a retain NLL term is added (`retain_weight` 1; the NPO paper's plain
form is `retain_weight: 0`, its NPO+RT this one).
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.lm_task import sequence_logprob
from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.grad_diff import answer_nll
from unlearn.methods.lm_defaults import (OPEN_UNLEARNING, lm_batch_size, lm_epochs, lm_lr, lm_optimizer,
                                         lm_weight_decay)
from unlearn.methods.token_losses import npo_loss
from unlearn.params import ForgetBatchParams, hparam, loguniform

NPO_CONFIG = f"{OPEN_UNLEARNING} configs/trainer/NPO.yaml"


def forget_sequence_mean(ctx: Context, per_sequence: torch.Tensor) -> torch.Tensor:
    """The mean of per-sequence losses over every sequence of the global batch (this worker's share of it)."""
    return ctx.row_mean(per_sequence.sum(), len(per_sequence))


def retain_term(ctx: Context, retain: Batch, weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """weight · the retain answers' token-mean NLL (nothing computed at weight 0: the plain NPO / SimNPO)."""
    if weight == 0:
        return torch.zeros((), device=ctx.device), {}
    nll = answer_nll(ctx, ctx.model, retain)
    return weight * nll, {"retain_nll": nll.item()}


class NPOParams(ForgetBatchParams):
    lr: float = lm_lr(1e-4,
                      "forget NLL 0.17 -> 0.39 / 0.10 -> 0.59, retain 0.15 -> 0.16 / 0.10 -> 0.30 at seeds 1 / 2 (3e-4: "
                      "retain 1.07 at seed 2)")
    epochs: float = lm_epochs()
    batch_size: int = lm_batch_size()
    optimizer: Literal["sgd", "adam", "adamw"] = lm_optimizer()
    weight_decay: float = lm_weight_decay()
    beta: float = hparam(0.1, gt=0, le=100, search=loguniform(0.01, 1.0),
                         paper=f"Zhang et al. 2024 (NPO) on TOFU: beta 0.1; {NPO_CONFIG}: beta 0.1",
                         help="inverse temperature β of the preference loss")
    forget_weight: float = hparam(1.0, ge=0, le=100, paper=f"{NPO_CONFIG}: gamma 1.0",
                                  help="weight of the NPO term (open-unlearning's gamma)")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=loguniform(0.1, 10.0),
                                  paper=f"{NPO_CONFIG}: alpha 1.0 with retain_loss_type NLL (the NPO paper's NPO+RT); "
                                        "0 gives the paper's plain NPO",
                                  help="weight of the retain answers' NLL (open-unlearning's alpha)")


@register
class NPO(Method):
    name = "npo"
    uses = frozenset({"forget", "retain"})
    primary = "forget"
    tasks = frozenset({"language_modelling"})
    Params = NPOParams
    paper = "Zhang et al. 2024, Negative Preference Optimization (NPO); settings of open-unlearning's NPO"
    summary = "lower the forget answers' likelihood relative to the original, bounded (plus retain NLL)"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        policy, _ = sequence_logprob(ctx.model, forget)
        with torch.no_grad():
            reference, _ = sequence_logprob(ctx.original, forget)
        npo = forget_sequence_mean(ctx, npo_loss(policy, reference, p.beta))
        kept, logged = retain_term(ctx, retain, p.retain_weight)
        self.apply(ctx, p.forget_weight * npo + kept)
        return {"npo_loss": npo.item(), **logged}
