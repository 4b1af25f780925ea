"""GHR (CURE): guided hard relabel, cross-entropy to the teacher's best class among the kept ones.

Each forget sample is relabelled with the original model's arg-max over the non-forgotten classes,
which keeps the closely related classes it was confused with.

On a language model each answer token is relabelled with the original's most likely next token other than the
true one (`token_losses.masked_teacher_argmax_ce`); the cross-entropy summed over tokens is divided by their global
count (`ctx.row_mean`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import check_kept_classes, student_teacher_rows
from unlearn.methods.gsr import CURE_PAPER, CureParams, forgotten_of, rows_forgotten


def guided_hard_labels(teacher: torch.Tensor, forgotten: torch.Tensor) -> torch.Tensor:
    """The teacher's arg-max over the classes that are not forgotten."""
    return teacher.masked_fill(forgotten, float("-inf")).argmax(dim=1)


def ghr_loss(student: torch.Tensor, teacher: torch.Tensor, forgotten: torch.Tensor,
             reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the student to the guided hard labels, mean over the batch (or "sum" over rows)."""
    return F.cross_entropy(student, guided_hard_labels(teacher, forgotten), reduction=reduction)


@register
class GHR(Method):
    name = "ghr"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification", "language_modelling"})
    Params = CureParams
    paper = f"{CURE_PAPER} (guided hard relabel)"
    summary = "cross-entropy to the original's arg-max among the non-forgotten classes"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_of(ctx, self.params.mask_classes)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        student, teacher, labels = student_teacher_rows(ctx, forget)
        total = ghr_loss(student, teacher, rows_forgotten(self.forgotten, student, labels), reduction="sum")
        loss = ctx.row_mean(total, len(labels))  # a classifier: the batch mean
        self.apply(ctx, loss)
        return {"ghr_loss": loss.item()}
