"""GSR (CURE): guided soft relabel, distillation towards the teacher with the forgotten classes removed.

The teacher's distribution at temperature T has the forgotten class (or the whole concept's classes)
removed and is renormalised over the rest; the student minimises KL to it. At T = 1 with one forgotten
class this is DELETE's loss.
"""

from __future__ import annotations


import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import check_kept_classes, forgotten_classes, kl_to_teacher, teacher_logits
from unlearn.params import ForgetBatchParams, hparam, loguniform

CURE_PAPER = "CURE (ICLR 2026 submission): no public release; recipe of DELETE, which CURE extends"


def renormalised_teacher(teacher: torch.Tensor, forgotten: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(teacher / T) restricted to the kept classes and renormalised (computed in log space)."""
    log_p = torch.log_softmax(teacher / temperature, dim=1).masked_fill(forgotten, float("-inf"))
    return torch.softmax(log_p, dim=1)


def gsr_loss(student: torch.Tensor, teacher: torch.Tensor, forgotten: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(renormalised teacher ‖ student) at T, batch mean, × T²."""
    return kl_to_teacher(student, renormalised_teacher(teacher, forgotten, temperature), temperature)


class CureParams(ForgetBatchParams):
    """Parameters GSR, GHR and GROGU share."""

    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 0.01),
                       paper=f"{CURE_PAPER}: 1e-4 for ResNet-18; 1e-3 for small models and forget sets (as delete)",
                       help="learning rate")
    epochs: float = hparam(20.0, gt=0, le=1000, search=loguniform(2, 50), paper="DELETE release: 20 epochs",
                           help="passes over the forget data")
    batch_size: int = hparam(64, ge=1, le=65536, paper="DELETE release: 128; 64 for small forget sets",
                             help="global batch size")
    momentum: float = hparam(0.9, ge=0, lt=1, paper="DELETE release: SGD momentum 0.9", help="SGD momentum")
    weight_decay: float = hparam(0.0, ge=0, le=1, paper="DELETE release: no weight decay", help="weight decay")
    mask_classes: list[int] | None = hparam(None, paper="CURE: concept unlearning masks the concept's classes",
                                            help="model-level labels to mask besides the forget set's own labels "
                                                 "(a concept's classes)")


class GSRParams(CureParams):
    temperature: float = hparam(1.0, gt=0, le=100, search=loguniform(0.5, 8.0),
                                paper="CURE: T = 1 makes GSR equal to DELETE's loss", help="softmax temperature")


@register
class GSR(Method):
    name = "gsr"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification"})
    Params = GSRParams
    paper = f"{CURE_PAPER} (guided soft relabel)"
    summary = "distil towards the original's distribution renormalised without the forgotten classes"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_classes(ctx, self.params.mask_classes)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss = gsr_loss(ctx.model(forget.x), teacher_logits(ctx, forget.x), self.forgotten, self.params.temperature)
        self.apply(ctx, loss)
        return {"gsr_loss": loss.item()}

