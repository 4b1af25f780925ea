"""GSR (CURE): guided soft relabel, distillation towards the teacher with the forgotten classes removed.

The teacher's distribution at temperature T has the forgotten class (or the whole concept's classes)
removed and is renormalised over the rest; the student minimises KL to it. At T = 1 with one forgotten
class this is DELETE's loss.

On a language model every answer token is a row (`ctx.scored_rows`) whose forgotten class is its own true next
token (`distill.own_label_mask`): the renormalised teacher is then DELETE's masked teacher at that token, at any
T (`token_losses.masked_teacher_kl`); the sum over tokens is divided by their global count (`ctx.row_mean`).
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import (check_kept_classes, forgotten_classes, kl_to_teacher, own_label_mask,
                                     student_teacher_rows, rows_are_tokens)
from unlearn.methods.lm_defaults import (CAUSAL_LM, CURE_LM_LR, CURE_LM_MEASURED, LM_BATCH, LM_EPOCHS, LM_OPTIMIZER,
                                         LM_WEIGHT_DECAY, causal_lm_note)
from unlearn.params import ForgetBatchParams, hparam, loguniform

CURE_PAPER = "CURE (ICLR 2026 submission): no public release; recipe of DELETE, which CURE extends"


def renormalised_teacher(teacher: torch.Tensor, forgotten: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher / T) restricted to the kept classes and renormalised (computed in log space)."""
    log_p = torch.log_softmax(teacher / temperature, dim=1).masked_fill(forgotten, float("-inf"))
    return torch.softmax(log_p, dim=1)


def gsr_loss(student: torch.Tensor, teacher: torch.Tensor, forgotten: torch.Tensor, temperature: float,
             reduction: str = "batchmean") -> torch.Tensor:
    """KL(renormalised teacher ‖ student) at T, batch mean (or "sum" over rows), × T². `forgotten`: a class mask
    (K,) shared by every row, or one mask per row (R, K)."""
    return kl_to_teacher(student, renormalised_teacher(teacher, forgotten, temperature), temperature, reduction)


def forgotten_of(ctx: Context, mask_classes: list[int] | None) -> torch.Tensor | None:
    """What a CURE method masks, found once in setup: a classifier's class mask (`forgotten_classes`); None on a
    language model, whose rows each mask their own next token (`rows_forgotten`). `mask_classes` name classes
    (entities of the facts set), not tokens, so a language model has no use for them: a concept's entities reach
    it as forget rows instead."""
    return None if rows_are_tokens(ctx) else forgotten_classes(ctx, mask_classes)


def rows_forgotten(forgotten: torch.Tensor | None, rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mask of a step's rows: the class mask found in setup, else (a language model) each row's own label."""
    return forgotten if forgotten is not None else own_label_mask(rows, labels)


class CureParams(ForgetBatchParams):
    """Parameters GSR, GHR and GROGU share."""

    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 0.01), family={CAUSAL_LM: CURE_LM_LR},
                       paper=f"{CURE_PAPER}: 1e-4 for ResNet-18; 1e-3 for small models and forget sets (as delete); "
                             f"{causal_lm_note('lr', CURE_LM_LR, CURE_LM_MEASURED)}",
                       help="learning rate")
    epochs: float = hparam(20.0, gt=0, le=1000, search=loguniform(2, 50), family={CAUSAL_LM: LM_EPOCHS},
                           paper=f"DELETE release: 20 epochs; {causal_lm_note('epochs')}",
                           help="passes over the forget data")
    batch_size: int = hparam(64, ge=1, le=65536, family={CAUSAL_LM: LM_BATCH},
                             paper=f"DELETE release: 128; 64 for small forget sets; {causal_lm_note('batch_size')}",
                             help="global batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = hparam("sgd", family={CAUSAL_LM: LM_OPTIMIZER},
                                                        paper=f"DELETE release: SGD; {causal_lm_note('optimizer')}",
                                                        help="optimizer")
    momentum: float = hparam(0.9, ge=0, lt=1, paper="DELETE release: SGD momentum 0.9", help="SGD momentum")
    weight_decay: float = hparam(0.0, ge=0, le=1, family={CAUSAL_LM: LM_WEIGHT_DECAY},
                                 paper=f"DELETE release: no weight decay; {causal_lm_note('weight_decay')}",
                                 help="weight decay")
    mask_classes: list[int] | None = hparam(None, paper="CURE: concept unlearning masks the concept's classes",
                                            help="model-level labels to mask besides the forget set's own labels "
                                                 "(a concept's classes; classifiers only: a language model masks "
                                                 "each answer token's own next token and ignores them)")


class GSRParams(CureParams):
    temperature: float = hparam(1.0, gt=0, le=100, search=loguniform(0.5, 8.0),
                                paper="CURE: T = 1 makes GSR equal to DELETE's loss", help="softmax temperature")


@register
class GSR(Method):
    name = "gsr"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification", "language_modelling"})
    Params = GSRParams
    paper = f"{CURE_PAPER} (guided soft relabel)"
    summary = "distil towards the original's distribution renormalised without the forgotten classes"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_of(ctx, self.params.mask_classes)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        student, teacher, labels = student_teacher_rows(ctx, forget)
        total = gsr_loss(student, teacher, rows_forgotten(self.forgotten, student, labels), self.params.temperature,
                         reduction="sum")
        loss = ctx.row_mean(total, len(labels))  # a classifier: the batch mean
        self.apply(ctx, loss)
        return {"gsr_loss": loss.item()}

