"""SimNPO: NPO without a reference model, on length-normalised log-probabilities (Fan et al. 2024).

Per forget sequence −(2/β) log σ(−(β/|y|) log p_θ(y|x) − γ) (`token_losses.simnpo_loss`): the answer's
log-probability divided by its token count |y|, with a margin γ, so long and short answers are pushed alike. The
per-sequence losses are averaged over every sequence of the global batch (`ctx.row_mean`); as open-unlearning's
SimNPO, a retain NLL term is added.

The margin is the paper's γ, outside β; open-unlearning's (and SimNPO's own code's) `delta` sits inside the β
product: their delta is our margin / β (both default to 0).
"""

from __future__ import annotations

from typing import Literal

from unlearn.lm_task import sequence_logprob
from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.lm_defaults import (OPEN_UNLEARNING, lm_batch_size, lm_epochs, lm_lr, lm_optimizer,
                                         lm_weight_decay)
from unlearn.methods.npo import forget_sequence_mean, retain_term
from unlearn.methods.token_losses import simnpo_loss
from unlearn.params import ForgetBatchParams, hparam, loguniform, uniform

SIMNPO_CONFIG = f"{OPEN_UNLEARNING} configs/trainer/SimNPO.yaml"


class SimNPOParams(ForgetBatchParams):
    lr: float = lm_lr(1e-2,
                      "forget NLL 0.17 -> 2.28 / 0.10 -> 2.66, retain 0.15 -> 0.34 / 0.10 -> 0.32 at seeds 1 / 2 (the "
                      "grid's largest: its forget term weighs 0.125)")
    epochs: float = lm_epochs()
    batch_size: int = lm_batch_size()
    optimizer: Literal["sgd", "adam", "adamw"] = lm_optimizer()
    weight_decay: float = lm_weight_decay()
    beta: float = hparam(4.5, gt=0, le=100, search=loguniform(0.5, 10.0),
                         paper=f"{SIMNPO_CONFIG}: beta 4.5 (METHODS.md's 2.5 is the SimNPO paper's TOFU value)",
                         help="inverse temperature β")
    margin: float = hparam(0.0, ge=-100, le=100, search=uniform(0.0, 2.0),
                           paper=f"{SIMNPO_CONFIG}: delta 0.0 (the paper's γ = β · delta)",
                           help="the paper's reward margin γ (open-unlearning's delta × β)")
    forget_weight: float = hparam(0.125, ge=0, le=100, search=loguniform(0.01, 1.0),
                                  paper=f"{SIMNPO_CONFIG}: gamma 0.125 (Unlearn-Simple's npo_coeff)",
                                  help="weight of the SimNPO term (open-unlearning's gamma)")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=loguniform(0.1, 10.0),
                                  paper=f"{SIMNPO_CONFIG}: alpha 1.0 with retain_loss_type NLL",
                                  help="weight of the retain answers' NLL (open-unlearning's alpha)")


@register
class SimNPO(Method):
    name = "simnpo"
    uses = frozenset({"forget", "retain"})
    primary = "forget"
    tasks = frozenset({"language_modelling"})
    Params = SimNPOParams
    paper = "Fan et al. 2024, Simplicity Prevails (SimNPO); settings of open-unlearning's SimNPO"
    summary = "reference-free NPO on length-normalised forget log-probabilities (plus retain NLL)"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        logp, tokens = sequence_logprob(ctx.model, forget)
        simnpo = forget_sequence_mean(ctx, simnpo_loss(logp, tokens, p.beta, p.margin))
        kept, logged = retain_term(ctx, retain, p.retain_weight)
        self.apply(ctx, p.forget_weight * simnpo + kept)
        return {"simnpo_loss": simnpo.item(), **logged}
