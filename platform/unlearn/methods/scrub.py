"""SCRUB: teacher-student unlearning, max-steps on the forget data alternating with min-steps on retain.

Each epoch (a pass over the retain data) of the first `max_epochs` starts with a max phase: as many
steps as a pass over the forget data takes, each maximising KL(teacher ‖ student) on a forget batch.
Every step is then a min step on a retain batch: ce_weight × CE + kl_weight × KL(teacher ‖ student).
Which steps are max steps depends only on the step number, so every worker agrees.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import kl_to_teacher, teacher_logits
from unlearn.params import (DIVERGES_FROZEN, ForgetBatchParams, forget_batch_norm_stats, hparam, loguniform, randint,
                            uniform)

SCRUB_PAPER = "Kurmanji et al. 2023 release (meghdadk/SCRUB)"


class ScrubParams(ForgetBatchParams):
    norm_stats: Literal["update", "frozen"] = forget_batch_norm_stats(
        family={"cnn": "update"}, why=DIVERGES_FROZEN.format(what="its loss became NaN (step 65)"))
    lr: float = hparam(3e-3, gt=0, le=10, search=loguniform(1e-4, 0.01),
                       paper=f"{SCRUB_PAPER}: sgda_learning_rate 5e-4 (ResNet-18); 3e-3 for the small models here "
                             "(digits MLPs: 2e-3 can leave FA at 64%, 1e-2 costs up to 30 points of RA)",
                       help="learning rate of max and min steps")
    epochs: float = hparam(5.0, gt=0, le=1000, search=loguniform(1, 20),
                           paper=f"{SCRUB_PAPER}: sgda_epochs 3-10", help="passes over the retain data")
    max_epochs: int = hparam(3, ge=0, le=1000, search=randint(1, 6),
                             paper=f"{SCRUB_PAPER}: msteps 2-5 (epochs that include max steps)",
                             help="how many of the first epochs start with a max pass over the forget data")
    temperature: float = hparam(4.0, gt=0, le=100, search=loguniform(1.0, 8.0), paper=f"{SCRUB_PAPER}: kd_T 4",
                                help="distillation temperature")
    ce_weight: float = hparam(0.99, ge=0, le=100, search=uniform(0.5, 1.0), paper=f"{SCRUB_PAPER}: gamma 0.99",
                              help="weight of the retain cross-entropy in min steps")
    kl_weight: float = hparam(0.001, ge=0, le=100, search=loguniform(1e-4, 1.0), paper=f"{SCRUB_PAPER}: alpha 0.001",
                              help="weight of the retain KL to the teacher in min steps")
    momentum: float = hparam(0.9, ge=0, lt=1, paper=f"{SCRUB_PAPER}: SGD momentum 0.9", help="SGD momentum")
    weight_decay: float = hparam(5e-4, ge=0, le=1, paper=f"{SCRUB_PAPER}: weight decay 5e-4", help="weight decay")


@register
class Scrub(Method):
    name = "scrub"
    uses = frozenset({"forget", "retain"})
    primary = "retain"
    tasks = frozenset({"classification"})
    Params = ScrubParams
    paper = "Kurmanji et al. 2023, Towards Unbounded Machine Unlearning (SCRUB)"
    summary = "teacher-student: push away from the original on forget data, stay close on retain data"

    def setup(self, ctx: Context) -> None:
        batch = self.params.batch_size
        self.steps_per_epoch = max(1, math.ceil(ctx.retain_size / batch))
        self.max_steps_per_epoch = max(1, math.ceil(ctx.forget_size / batch))

    def is_max_step(self, step: int) -> bool:
        """A max step opens each of the first `max_epochs` epochs, for one pass over the forget data."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return epoch < self.params.max_epochs and within < self.max_steps_per_epoch

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        logged = {}
        if self.is_max_step(ctx.step):
            divergence = kl_to_teacher(ctx.model(forget.x), self._teacher_probs(ctx, forget.x), p.temperature)
            self.apply(ctx, -divergence)
            logged["forget_kl"] = divergence.item()
        logits = ctx.model(retain.x)
        ce = F.cross_entropy(logits, retain.y)
        kl = kl_to_teacher(logits, self._teacher_probs(ctx, retain.x), p.temperature)
        self.apply(ctx, p.ce_weight * ce + p.kl_weight * kl)
        return {**logged, "retain_ce": ce.item(), "retain_kl": kl.item()}

    def _teacher_probs(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(teacher_logits(ctx, x) / self.params.temperature, dim=1)
