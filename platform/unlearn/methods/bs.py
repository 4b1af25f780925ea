"""BS (boundary shrink): relabel each forget sample with its nearest wrong class, found by an FGSM step.

The original model is the probe: x' = clamp(x + ε·sign(∇x ℓ(θ0; x, y)), 0, 1) crosses the nearest
decision boundary, and the original's arg-max at x' (excluding y, so the label is always wrong) is the
new label the model is fine-tuned towards on the clean x.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import ForgetBatchParams, hparam, loguniform

BS_PAPER = "Chen et al. 2023, Boundary Unlearning (CVPR); settings as SalUn's boundary_sh baseline"


def neighbour_labels(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bound: float,
                     exclude_true: bool = True) -> torch.Tensor:
    """The model's prediction one FGSM step (size `bound`) away from x, optionally never the true label."""
    probe = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(F.cross_entropy(model(probe), y), probe)
    adversarial = (x + bound * grad.sign()).clamp(0.0, 1.0)
    with torch.no_grad():
        logits = model(adversarial)
    if exclude_true:
        logits = logits.scatter(1, y[:, None], float("-inf"))
    return logits.argmax(dim=1)


class BSParams(ForgetBatchParams):
    lr: float = hparam(3e-3, gt=0, le=10, search=loguniform(1e-5, 0.03),
                       paper=f"{BS_PAPER}: lr 1e-5 (ResNet-18); 3e-3 for the small models here (1e-2 costs RA)",
                       help="learning rate")
    epochs: float = hparam(10.0, gt=0, le=1000, search=loguniform(1, 30), paper=f"{BS_PAPER}: 10 epochs",
                           help="passes over the forget data")
    bound: float = hparam(0.1, gt=0, le=1, search=loguniform(0.01, 0.5), paper=f"{BS_PAPER}: FGSM bound 0.1",
                          help="FGSM step size in input units ([0, 1] images)")
    exclude_true: bool = hparam(True, paper="deviation: the release keeps the arg-max even when it is the true label",
                                help="never relabel a sample with its own label")


@register
class BS(Method):
    name = "bs"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification"})
    Params = BSParams
    paper = BS_PAPER
    summary = "fine-tune forget samples towards the nearest wrong class found by FGSM on the original"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        labels = neighbour_labels(ctx.original, forget.x, forget.y, self.params.bound, self.params.exclude_true)
        loss = F.cross_entropy(ctx.model(forget.x), labels)
        self.apply(ctx, loss)
        return {"boundary_loss": loss.item()}

