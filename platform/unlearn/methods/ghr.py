"""GHR (CURE): guided hard relabel, cross-entropy to the teacher's best class among the kept ones.

Each forget sample is relabelled with the original model's arg-max over the non-forgotten classes,
which keeps the closely related classes it was confused with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import check_kept_classes, forgotten_classes, teacher_logits
from unlearn.methods.gsr import CURE_PAPER, CureParams


def guided_hard_labels(teacher: torch.Tensor, forgotten: torch.Tensor) -> torch.Tensor:
    """The teacher's arg-max over the classes that are not forgotten."""
    return teacher.masked_fill(forgotten, float("-inf")).argmax(dim=1)


def ghr_loss(student: torch.Tensor, teacher: torch.Tensor, forgotten: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the student to the guided hard labels."""
    return F.cross_entropy(student, guided_hard_labels(teacher, forgotten))


@register
class GHR(Method):
    name = "ghr"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification"})
    Params = CureParams
    paper = f"{CURE_PAPER} (guided hard relabel)"
    summary = "cross-entropy to the original's arg-max among the non-forgotten classes"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_classes(ctx, self.params.mask_classes)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss = ghr_loss(ctx.model(forget.x), teacher_logits(ctx, forget.x), self.forgotten)
        self.apply(ctx, loss)
        return {"ghr_loss": loss.item()}
