"""DELETE: decoupled distillation to erase (forget data only).

The frozen original is the teacher. For each forget sample its own label's teacher logit (or a given
label, e.g. a backdoor target) is set to -1e10, the rest is softened at temperature T, and the student
is distilled towards it: the forgotten class gets no mass while the others keep their dark knowledge.

On a language model the same loss is taken at every answer token (`ctx.scored_rows`): the teacher's next-token
distribution with the true next token masked, normalised by the global count of answer tokens (`ctx.row_mean`),
as `token_losses.masked_teacher_kl`.
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.errors import SpecError
from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import MASKED_LOGIT, kl_to_teacher, student_teacher_rows, rows_are_tokens
from unlearn.methods.lm_defaults import (CAUSAL_LM, CURE_LM_LR, CURE_LM_MEASURED, LM_BATCH, LM_EPOCHS, LM_OPTIMIZER,
                                         LM_WEIGHT_DECAY, causal_lm_note)
from unlearn.params import SELECTION, ForgetBatchParams, hparam, loguniform


def masked_teacher_probs(teacher: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher / T) with each row's `labels[i]` logit set to -1e10 first (zero mass there)."""
    masked = teacher.clone()
    masked[torch.arange(len(labels), device=teacher.device), labels] = MASKED_LOGIT
    return torch.softmax(masked / temperature, dim=1)


def delete_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float,
                reduction: str = "batchmean") -> torch.Tensor:
    """DELETE's loss: KL(masked teacher ‖ student) at T, batch mean (or "sum" over rows), × T²."""
    return kl_to_teacher(student, masked_teacher_probs(teacher, labels, temperature), temperature, reduction)


class DeleteParams(ForgetBatchParams):
    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 0.01), family={"cnn": 1e-4, CAUSAL_LM: CURE_LM_LR},
                       paper="DELETE release: 1e-4 (ResNet-18, CIFAR-10) or 5e-5; 1e-3 here: a ~140-sample forget set "
                             "gives only ~60 steps (digits MLP: 1e-4 leaves FA 10-65%, 1e-3 gives FA 0 and keeps RA, "
                             f"1e-2 costs up to 30 points of RA); cnn 1e-4 with T 4 and 40 epochs, chosen on "
                             f"{SELECTION} among 3e-5..3e-4 (x T 1, 4 at 20 epochs; x 10, 20, 40 epochs at T 4): Gap "
                             f"1.44 (1e-3: ~6); {causal_lm_note('lr', CURE_LM_LR, CURE_LM_MEASURED)}",
                       help="learning rate (ResNet-18 on CIFAR: the released 1e-4)")
    epochs: float = hparam(20.0, gt=0, le=1000, search=loguniform(2, 50), family={"cnn": 40.0, CAUSAL_LM: LM_EPOCHS},
                           paper=f"DELETE release: 20 epochs (of a 5,000-image forget set: ~800 steps); cnn 40 (~160 "
                                 f"steps of a ~200-image class), chosen on {SELECTION} among 10, 20, 40 x lr 3e-5..3e-4: "
                                 "Gap 1.44 (20: 2.40; longer was better at every lr, 40 is the grid's edge); "
                                 f"{causal_lm_note('epochs')}",
                           help="passes over the forget data")
    batch_size: int = hparam(64, ge=1, le=65536, family={CAUSAL_LM: LM_BATCH},
                             paper="DELETE release: 128; 64 here so small forget sets still give several steps per "
                                   f"epoch; {causal_lm_note('batch_size')}",
                             help="global batch size")
    optimizer: Literal["sgd", "adam", "adamw"] = hparam("sgd", family={CAUSAL_LM: LM_OPTIMIZER},
                                                        paper=f"DELETE release: SGD; {causal_lm_note('optimizer')}",
                                                        help="optimizer")
    momentum: float = hparam(0.9, ge=0, lt=1, paper="DELETE release: SGD momentum 0.9", help="SGD momentum")
    weight_decay: float = hparam(0.0, ge=0, le=1, family={CAUSAL_LM: LM_WEIGHT_DECAY},
                                 paper=f"DELETE release: no weight decay; {causal_lm_note('weight_decay')}",
                                 help="weight decay")
    temperature: float = hparam(1.0, gt=0, le=100, search=loguniform(0.5, 8.0), family={"cnn": 4.0},
                                paper=f"DELETE release: T = 1 (language models too: no release to depart from); cnn "
                                      f"T 4 (with lr 1e-4), chosen on {SELECTION}",
                                help="softmax temperature of teacher and student")
    mask_label: int | None = hparam(None, ge=0, paper="DELETE: backdoor defence masks the backdoor target",
                                    help="mask this label for every sample instead of each sample's own label "
                                         "(classifiers only: a language model masks each answer token's own next "
                                         "token)")


@register
class Delete(Method):
    name = "delete"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification", "language_modelling"})
    Params = DeleteParams
    paper = "Zhou et al. 2025, DELETE: Decoupled Distillation to Erase (github shaaaaron/DELETE)"
    summary = "distil from the original with the forgotten label's logit masked; forget data only"

    def setup(self, ctx: Context) -> None:
        if self.params.mask_label is not None and rows_are_tokens(ctx):
            raise SpecError("params.mask_label", "masks one class of a classifier for every sample; a language model "
                                                 "masks each answer token's own next token (leave mask_label unset)")

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        student, teacher, labels = student_teacher_rows(ctx, forget)
        if p.mask_label is not None:
            labels = torch.full_like(labels, p.mask_label)
        # summed over rows, then divided by the row count (global where rows are tokens): on a classifier this is
        # the release's batch mean
        total = delete_loss(student, teacher, labels, p.temperature, reduction="sum")
        loss = ctx.row_mean(total, len(labels))
        self.apply(ctx, loss)
        return {"delete_loss": loss.item()}
