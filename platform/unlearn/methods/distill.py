"""Teacher-student pieces shared by the distillation methods (DELETE, GSR, GHR, GROGU, SCRUB).

The teacher is always `ctx.original` (θ0, frozen, eval mode); targets are built from its logits
with some classes masked out, and the student is pulled towards them.

The losses score rows (`ctx.scored_rows`): a classifier's samples (logits over classes, the label), or a
language model's answer tokens (next-token logits over the vocabulary, the true next token). On a classifier
the forgotten classes are one mask for every row (the forget set's labels, `forgotten_classes`); on a language
model each row forgets its own next token (`own_label_mask`), the token-level DELETE / GSR of
`token_losses`. Losses are summed over rows and divided by `ctx.row_mean` (the global row count where rows fall
unevenly over workers; on a classifier the batch size, today's batch mean).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.errors import SpecError
from unlearn.methods.base import Batch, Context

MASKED_LOGIT = -1e10  # DELETE's release: the masked logit's value (softmax gives it exactly 0)


def teacher_logits(ctx: Context, x: torch.Tensor) -> torch.Tensor:
    """Logits of the frozen original model, without a graph."""
    with torch.no_grad():
        return ctx.original(x)


def teacher_rows(ctx: Context, batch: Batch) -> torch.Tensor:
    """The frozen original's scored rows (R x K) of a batch, without a graph (`ctx.scored_rows`' logits)."""
    with torch.no_grad():
        return ctx.scored_rows(ctx.original, batch)[0]


def student_teacher_rows(ctx: Context, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(student rows R x K with a graph, teacher rows R x K without, row labels R) of a batch.

    The student's forward comes first: under LoRA the teacher is the student with its adapters switched off,
    which must not happen while the student's own forward runs (its graph is kept either way)."""
    student, labels = ctx.scored_rows(ctx.model, batch)
    return student, teacher_rows(ctx, batch), labels


def kl_to_teacher(student_logits: torch.Tensor, teacher_probs: torch.Tensor, temperature: float,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(teacher ‖ softmax(student / T)), mean over the batch (or "sum" over rows), × T² (Hinton et al.'s
    gradient scale)."""
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(log_student, teacher_probs, reduction=reduction) * temperature**2


def rows_are_tokens(ctx: Context) -> bool:
    """Whether the task's rows are a language model's answer tokens (each forgets its own next token) rather
    than a classifier's samples (all forget the forget set's classes)."""
    return ctx.task == "language_modelling"


def own_label_mask(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Bool mask (R, K) true at each row's own label: on a language model, the next token to forget at each answer
    position, the per-row counterpart of a classifier's (K,) class mask (both broadcast against R x K rows)."""
    return torch.zeros(rows.shape, dtype=torch.bool, device=rows.device).scatter_(1, labels[:, None], True)


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
