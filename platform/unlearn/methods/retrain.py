"""Retrain (RT): train from scratch on the retain data with the original recipe; the gold reference."""

from __future__ import annotations

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import MethodParams, hparam


class RetrainParams(MethodParams):
    # Defaults are replaced by the job's `train` recipe (the runner fills them in); these apply when
    # retrain is built on its own.
    epochs: float = hparam(30.0, gt=0, le=10_000, help="passes over the retain data")
    lr_schedule: str = hparam("cosine", help="learning-rate schedule")


@register
class Retrain(Method):
    name = "retrain"
    uses = frozenset({"retain"})
    primary = "retain"
    from_scratch = True
    reference = True
    tasks = frozenset({"classification", "diffusion", "language_modelling"})
    Params = RetrainParams
    paper = "reference: retrain from scratch on D_r (every seed paper)"
    summary = "train from scratch on the retain set with the original recipe"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss = ctx.loss(ctx.model, retain).mean()
        self.apply(ctx, loss)
        return {"loss": loss.item()}
