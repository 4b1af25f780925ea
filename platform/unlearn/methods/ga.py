"""GA: gradient ascent on the forget data (minimise -loss), few steps, small learning rate."""

from __future__ import annotations

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import ForgetBatchParams, hparam, loguniform


class GAParams(ForgetBatchParams):
    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 1e-1), family={"mlp": 0.032},
                       paper="Thudi et al. 2022; SalUn sweeps 1e-5..1e-3; mlp 0.032 (3 epochs), chosen on "
                             "benchmarks/results/defaults-selection-digits-mlp.md (validation split; digits classes "
                             "0, 4, 7 x seeds 0, 1; lowest mean Gap, 25.2: GA's edge moves with the class, and its "
                             "points that forget every class all collapse the model)")
    epochs: float = hparam(3.0, gt=0, le=1000, help="passes over the forget data")


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
