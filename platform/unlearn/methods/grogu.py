"""GROGU (CURE): GSR and GHR gradients on the same batch, combined orthogonally, one step with the sum.

g_S (GSR) and g_H (GHR) are flattened over the trainable parameters. When they conflict (g_H·g_S < 0), or
always with `combine: always`, g_H loses its component along g_S (PCGrad-style); the step uses
g_H' + g_S. After DDP's backward both gradients are already averaged over workers, so every worker
makes the same decision. Under FSDP each worker holds a shard of each gradient: the dot products are summed
over workers before the decision, and each worker combines its own shard.

On a language model both losses are the token-level GSR and GHR of gsr.py / ghr.py (each answer token masks its
own next token). Only parameters that train enter the vectors: under LoRA that is the adapters, and the frozen
base weights, which have no gradient, cost no memory here.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import nn

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.distill import check_kept_classes, student_teacher_rows
from unlearn.methods.ghr import ghr_loss
from unlearn.methods.gsr import CURE_PAPER, GSRParams, forgotten_of, gsr_loss, rows_forgotten
from unlearn.methods.lm_defaults import CAUSAL_LM, CURE_LM_LR, CURE_LM_MEASURED, LM_EPOCHS, causal_lm_note
from unlearn.methods.whole_set import flatten, unflatten
from unlearn.params import SELECTION, choice, hparam, loguniform


def combine_gradients(g_hard: torch.Tensor, g_soft: torch.Tensor, mode: str,
                      reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, bool]:
    """(g_H' + g_S, projected?): g_H' = g_H − (g_H·g_S / ‖g_S‖²) g_S on conflict (or always), else g_H.

    `reduce` sums the two dot products (g_H·g_S, g_S·g_S) over workers when each holds a shard of the vectors
    (FSDP); every worker then decides alike and combines its shard."""
    dot, norm2 = torch.dot(g_hard, g_soft), torch.dot(g_soft, g_soft)
    if reduce is not None:
        dot, norm2 = reduce(torch.stack([dot, norm2]))
    project = mode == "always" or bool(dot < 0)
    if project:
        g_hard = g_hard - dot / norm2.clamp_min(1e-30) * g_soft
    return g_hard + g_soft, project


def _local(t: torch.Tensor) -> torch.Tensor:
    """This worker's part of a tensor: a DTensor's (FSDP2) local shard, else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def is_sharded(model: nn.Module, params: list[nn.Parameter]) -> bool:
    """Whether each worker holds only a shard of the gradients: FSDP2 (DTensor parameters) or FSDP1."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel) or any(callable(getattr(p, "to_local", None)) for p in params)


def trainable_grads(params: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
    """A detached copy of this worker's gradient (its shard under FSDP) of every parameter that trains, keyed by
    name (zeros where a trainable parameter got none). Frozen parameters (a LoRA model's base) are left out: they
    would only add zeros, which change neither dot products nor norms."""
    with torch.no_grad():
        return {n: (_local(p.grad).detach().clone() if p.grad is not None else torch.zeros_like(_local(p)))
                for n, p in params}


class GroguParams(GSRParams):
    lr: float = hparam(1e-3, gt=0, le=10, search=loguniform(1e-5, 0.01), family={"cnn": 1e-4, CAUSAL_LM: CURE_LM_LR},
                       paper=f"{CURE_PAPER}: 1e-4 for ResNet-18; 1e-3 for small models and forget sets (as delete); "
                             f"cnn 1e-4 with T 4 and 40 epochs, chosen on {SELECTION}: Gap 1.28 (1e-3: 12-15 on class "
                             f"5); {causal_lm_note('lr', CURE_LM_LR, CURE_LM_MEASURED)}",
                       help="learning rate")
    temperature: float = hparam(1.0, gt=0, le=100, search=loguniform(0.5, 8.0), family={"cnn": 4.0},
                                paper=f"CURE: T = 1 makes GSR equal to DELETE's loss; cnn T 4 (with lr 1e-4), chosen on "
                                      f"{SELECTION}", help="softmax temperature")
    epochs: float = hparam(20.0, gt=0, le=1000, search=loguniform(2, 50), family={"cnn": 40.0, CAUSAL_LM: LM_EPOCHS},
                           paper=f"DELETE release: 20 epochs (CURE follows it); cnn 40, chosen on {SELECTION} among "
                                 "10, 20, 40 x lr 3e-5..3e-4: Gap 1.28 (20: 2.49; 40 is the grid's edge); "
                                 f"{causal_lm_note('epochs')}",
                           help="passes over the forget data")
    combine: Literal["conflict", "always"] = hparam("conflict", search=choice(["conflict", "always"]),
                                                    paper="CURE: project on conflict (PCGrad); `always` as option",
                                                    help="when to remove from g_H its component along g_S")


@register
class GROGU(Method):
    name = "grogu"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification", "language_modelling"})
    Params = GroguParams
    paper = f"{CURE_PAPER} (guided restricted orthogonal gradient unlearning)"
    summary = "GSR + GHR gradients combined orthogonally when they conflict"

    def check_data(self, forget_labels, num_outputs: int) -> None:
        check_kept_classes(forget_labels, num_outputs, self.params.mask_classes)

    def setup(self, ctx: Context) -> None:
        self.forgotten = forgotten_of(ctx, self.params.mask_classes)

    def _gradient(self, ctx: Context, loss: torch.Tensor, params: list[tuple[str, nn.Parameter]]
                  ) -> dict[str, torch.Tensor]:
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return trainable_grads(params)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        params = [(n, q) for n, q in ctx.module.named_parameters() if q.requires_grad]
        student, teacher, labels = student_teacher_rows(ctx, forget)
        forgotten = rows_forgotten(self.forgotten, student, labels)
        soft = ctx.row_mean(gsr_loss(student, teacher, forgotten, p.temperature, reduction="sum"), len(labels))
        g_soft = self._gradient(ctx, soft, params)
        student, _ = ctx.scored_rows(ctx.model, forget)  # the first forward's graph went with its backward
        hard = ctx.row_mean(ghr_loss(student, teacher, forgotten, reduction="sum"), len(labels))
        g_hard = self._gradient(ctx, hard, params)
        reduce = (lambda t: ctx.comm.all_reduce(t, op="sum")) if is_sharded(ctx.model, [q for _, q in params]) else None
        # in float32 whatever the weights' precision (bf16 dot products over millions of entries lose the sign)
        combined, projected = combine_gradients(flatten(g_hard).float(), flatten(g_soft).float(), p.combine, reduce)
        with torch.no_grad():
            for (_, param), grad in zip(params, unflatten(combined, g_soft).values()):
                # in place: DDP's bucket views and FSDP's sharded gradients stay theirs. A weight neither loss
                # reached keeps no gradient (both losses read the same rows, so it has none in either)
                if param.grad is not None:
                    _local(param.grad).copy_(grad)
        if p.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), p.clip_grad)
        ctx.optimizer.step()
        return {"gsr_loss": soft.item(), "ghr_loss": hard.item(), "projected": float(projected)}
