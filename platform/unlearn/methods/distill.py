"""Teacher-student pieces shared by the distillation methods (DELETE, GSR, GHR, GROGU, SCRUB).

The teacher is always `ctx.original` (θ0, frozen, eval mode); targets are built from its logits
with some classes masked out, and the student is pulled towards them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.errors import SpecError
from unlearn.methods.base import Context

MASKED_LOGIT = -1e10  # DELETE's release: the masked logit's value (softmax gives it exactly 0)


def teacher_logits(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Logits of the frozen original model, without a graph."""
    with torch.no_grad():
        return ctx.original(x)


def kl_to_teacher(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher ‖ softmax(student / T)), mean over the batch, × T² (Hinton et al.'s gradient scale)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction="batchmean") * temperature**2


def forgotten_classes(ctx: Context, extra: list[int] | None) -> torch.Tensor:
    """Bool mask (num_classes,) of the forgotten classes: every label in the forget set (all shards) plus `extra`.

    One pass over this worker's forget shard; the presence vector is max-reduced over workers.
    """
    present = torch.zeros(ctx.num_classes, device=ctx.device)
    for batch in ctx.forget_batches():
        present[batch.y.to(ctx.device)] = 1.0
    present = ctx.comm.all_reduce(present, op="max")
    for c in extra or []:
        if not 0 <= c < ctx.num_classes:
            raise SpecError("params.mask_classes", f"class {c} is not an output of the model (0..{ctx.num_classes - 1})")
        present[c] = 1.0
    mask = present > 0
    if bool(mask.all()):
        raise SpecError("params.mask_classes", ALL_MASKED)
    return mask


ALL_MASKED = ("every class would be masked: the forget set spans all classes "
              "(CURE's relabelling needs classes to relabel to; use delete for random forgetting)")


def check_kept_classes(forget_labels: np.ndarray, num_outputs: int, extra: list[int] | None) -> None:
    """Pre-flight of `forgotten_classes`: some output class must stay unmasked."""
    for c in extra or []:
        if not 0 <= c < num_outputs:
            raise SpecError("params.mask_classes", f"class {c} is not an output of the model (0..{num_outputs - 1})")
    if len(set(np.unique(forget_labels).tolist()) | set(extra or [])) >= num_outputs:
        raise SpecError("params.mask_classes", ALL_MASKED)
