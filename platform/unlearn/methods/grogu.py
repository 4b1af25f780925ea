"""GROGU (CURE): GSR and GHR gradients on the same batch, combined orthogonally, one step with the sum.

g_S (GSR) and g_H (GHR) are flattened over all parameters. When they conflict (g_H·g_S < 0), or
always with `combine: always`, g_H loses its component along g_S (PCGrad-style); the step uses
g_H' + g_S. After DDP's backward both gradients are already averaged over workers, so every worker
makes the same decision.
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method, grads_of
from unlearn.methods.distill import check_kept_classes, forgotten_classes, teacher_logits
from unlearn.methods.ghr import ghr_loss
from unlearn.methods.gsr import CURE_PAPER, GSRParams, gsr_loss
from unlearn.methods.whole_set import flatten, unflatten
from unlearn.params import SELECTION, choice, hparam, loguniform


def combine_gradients(g_hard: torch.Tensor, g_soft: torch.Tensor, mode: str) -> tuple[torch.Tensor, bool]:
    """(g_H' + g_S, projected?): g_H' = g_H − (g_H·g_S / ‖g_S‖²) g_S on conflict (or always), else g_H."""
    dot = torch.dot(g_hard, g_soft)
    project = mode == "always" or bool(dot < 0)
    if project:
        g_hard = g_hard - dot / torch.dot(g_soft, g_soft).clamp_min(1e-30) * g_soft
    return g_hard + g_soft, project


class GroguParams(GSRParams):
    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 0.01), family={"cnn": 1e-4},
                       paper=f"{CURE_PAPER}: 1e-4 for ResNet-18; 1e-3 for small models and forget sets (as delete); "
                             f"cnn 1e-4 with T 4 and 40 epochs, chosen on {SELECTION}: Gap 1.28 (1e-3: 12-15 on class 5)",
                       help="learning rate")
    temperature: float = hparam(1.0, gt=0, le=100, search=loguniform(0.5, 8.0), family={"cnn": 4.0},
                                paper=f"CURE: T = 1 makes GSR equal to DELETE's loss; cnn T 4 (with lr 1e-4), chosen on "
                                      f"{SELECTION}", help="softmax temperature")
    epochs: float = hparam(20.0, gt=0, le=1000, search=loguniform(2, 50), family={"cnn": 40.0},
                           paper=f"DELETE release: 20 epochs (CURE follows it); cnn 40, chosen on {SELECTION} among "
                                 "10, 20, 40 x lr 3e-5..3e-4: Gap 1.28 (20: 2.49; 40 is the grid's edge)",
                           help="passes over the forget data")
    combine: Literal["conflict", "always"] = hparam("conflict", search=choice(["conflict", "always"]),
                                                    paper="CURE: project on conflict (PCGrad); `always` as option",
                                                    help="when to remove from g_H its component along g_S")


@register
class GROGU(Method):
    name = "grogu"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification"})
    Params = GroguParams
    paper = f"{CURE_PAPER} (guided restricted orthogonal gradient unlearning)"
    summary = "GSR + GHR gradients combined orthogonally when they conflict"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_classes(ctx, self.params.mask_classes)

    def _gradient(self, ctx: Context, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return grads_of(ctx.module)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        teacher = teacher_logits(ctx, forget.x)
        soft = gsr_loss(ctx.model(forget.x), teacher, self.forgotten, p.temperature)
        g_soft = self._gradient(ctx, soft)
        hard = ghr_loss(ctx.model(forget.x), teacher, self.forgotten)
        g_hard = self._gradient(ctx, hard)
        combined, projected = combine_gradients(flatten(g_hard), flatten(g_soft), p.combine)
        for param, grad in zip(ctx.module.parameters(), unflatten(combined, g_soft).values()):
            param.grad = grad
        if p.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), p.clip_grad)
        ctx.optimizer.step()
        return {"gsr_loss": soft.item(), "ghr_loss": hard.item(), "projected": float(projected)}
