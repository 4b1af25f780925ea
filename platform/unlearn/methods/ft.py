"""FT: fine-tune the original model on the retain data only (catastrophic forgetting)."""

from __future__ import annotations

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import MethodParams, hparam, loguniform


class FTParams(MethodParams):
    lr: float = hparam(0.01, gt=0, le=10, search=loguniform(1e-4, 1e-1), paper="SalUn/l1-sparse: lr 0.01-0.1, 10 epochs")
    epochs: float = hparam(5.0, gt=0, le=1000, help="passes over the retain data")


@register
class FT(Method):
    name = "ft"
    uses = frozenset({"retain"})
    primary = "retain"
    tasks = frozenset({"classification", "diffusion", "language_modelling"})
    Params = FTParams
    paper = "Warnecke et al. 2023; settings as Jia et al. 2023 (l1-sparse)"
    summary = "fine-tune on the retain set"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss = ctx.loss(ctx.model, retain).mean()
        self.apply(ctx, loss)
        return {"retain_loss": loss.item()}
