"""GA: gradient ascent on the forget data (minimise -loss), few steps, small learning rate."""

from __future__ import annotations

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from typing import Literal

from unlearn.methods.lm_defaults import (CAUSAL_LM, LM_BATCH, LM_EPOCHS, LM_OPTIMIZER, LM_WEIGHT_DECAY,
                                        causal_lm_note)
from unlearn.params import ForgetBatchParams, hparam, loguniform

GA_LM_LR = 1e-4  # open-unlearning's GradAscent runs at the TOFU recipe's rate; 1e-4 is the CURE methods' LM rate


class GAParams(ForgetBatchParams):
    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 1e-1), family={"mlp": 0.032, CAUSAL_LM: GA_LM_LR},
                       paper="Thudi et al. 2022; SalUn sweeps 1e-5..1e-3; mlp 0.032 (3 epochs), chosen on "
                             "benchmarks/results/defaults-selection-digits-mlp.md (validation split; digits classes "
                             "0, 4, 7 x seeds 0, 1; lowest mean Gap, 25.2: GA's edge moves with the class, and its "
                             "points that forget every class all collapse the model); causal_lm 1e-4: the rate the "
                             "LM selection gave the other forget-only methods (DELETE / GSR / GHR / GROGU), not "
                             "selected for GA (`unlearn tune` searches it)")
    epochs: float = hparam(3.0, gt=0, le=1000, family={CAUSAL_LM: LM_EPOCHS}, paper=causal_lm_note("epochs"),
                           help="passes over the forget data")
    batch_size: int = hparam(64, ge=1, le=65536, family={CAUSAL_LM: LM_BATCH}, paper=causal_lm_note("batch_size"),
                             help="global batch size (split across workers)")
    optimizer: Literal["sgd", "adam", "adamw"] = hparam("sgd", family={CAUSAL_LM: LM_OPTIMIZER},
                                                        paper=causal_lm_note("optimizer"), help="optimizer")
    weight_decay: float = hparam(5e-4, ge=0, le=1, family={CAUSAL_LM: LM_WEIGHT_DECAY},
                                 paper=causal_lm_note("weight_decay"), help="weight decay")


@register
class GA(Method):
    name = "ga"
    uses = frozenset({"forget"})
    tasks = frozenset({"classification", "diffusion", "language_modelling"})
    Params = GAParams
    paper = "Thudi et al. 2022 (gradient ascent)"
    summary = "gradient ascent on the forget set"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss = ctx.loss(ctx.model, forget).mean()
        self.apply(ctx, -loss)
        return {"forget_loss": loss.item()}
