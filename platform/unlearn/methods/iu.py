"""IU (influence unlearning): one Newton-style step θ += α · F⁻¹ v with a WoodFisher inverse-Fisher estimate.

v = n_f / (n_f + n_r) · (∇L_f − ∇L_r): the gradients are means over the whole forget and retain sets
(per-sample sums and counts all-reduced). F⁻¹ v is estimated as Jia et al.'s release does it: a rank-one
recursion over the per-sample gradients of `fisher_samples` retain samples with damping `fisher_damping`.
Those samples are the ones with the smallest global row ids, gathered from every shard, so N workers
run the same recursion as one. A step is the whole update; `steps: 1` is the method.
"""

from __future__ import annotations

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.whole_set import differentiable, flatten, mean_gradient, unflatten
from unlearn.params import SELECTION, ForgetBatchParams, hparam, loguniform, randint

IU_PAPER = "Koh & Liang 2017 via Jia et al. 2023's `Wfisher` (OPTML-Group/Unlearn-Sparse, Unlearn-Saliency)"


def first_rows_by_index(batches, count: int) -> Batch | None:
    """The `count` rows of a shard with the smallest global index, sorted by index."""
    kept: Batch | None = None
    for batch in batches:
        merged = batch if kept is None else Batch(*(torch.cat([a, b]) for a, b in zip(kept, batch)))
        order = torch.argsort(merged.index)[:count]
        kept = Batch(*(t[order] for t in merged))
    return kept


def woodfisher_inverse_product(vector: torch.Tensor, per_sample_grads, damping: float) -> torch.Tensor:
    """F⁻¹ v by the release's recursion: a running direction o (first gradient, shrunk by each rank-one
    update) removes from v its components along the successive per-sample gradients."""
    result = vector.clone()
    direction = None
    for grad in per_sample_grads:
        if direction is None:
            direction = grad.clone()
            continue
        overlap = torch.dot(direction, grad)
        result -= torch.dot(result, grad) / (damping + overlap) * direction
        direction *= damping / (damping + overlap)
    return result


class IUParams(ForgetBatchParams):
    steps: int | None = hparam(1, ge=1, le=100, paper="one-shot update (Jia et al. 2023)",
                               help="Newton-style updates, each from the current weights (1: the method)")
    alpha: float = hparam(10.0, gt=0, le=1e6, search=loguniform(0.3, 100.0), family={"cnn": 1.0},
                          paper="Jia et al. 2023 sweep alpha per model; 10 on digits MLPs (5: FA 5-73%, 20: RA -15 "
                                f"points); cnn 1, chosen on {SELECTION} among 1..5 by mean Gap alone (15.0: IU's edge "
                                "moves with the class, FA 0-60% at 1; only 5 forgets every class, by collapsing RA)",
                          help="step size of θ += alpha · F⁻¹ v")
    fisher_samples: int = hparam(1000, ge=1, le=1_000_000, search=randint(100, 2000),
                                 paper="Jia et al. release: the recursion stops after ~1000 retain samples",
                                 help="retain samples whose per-sample gradients build the inverse Fisher")
    fisher_damping: float = hparam(1000.0, gt=0, le=1e9, search=loguniform(10.0, 1e5),
                                   paper="Jia et al. release: N = 1000 in the recursion's denominators",
                                   help="damping of the rank-one inverse updates")


@register
class IU(Method):
    name = "iu"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"classification", "diffusion"})
    Params = IUParams
    paper = IU_PAPER
    summary = "one influence-function step with a WoodFisher inverse-Fisher estimate"

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        module = ctx.module
        grad_forget = flatten(mean_gradient(ctx, module, ctx.forget_batches()))
        grad_retain = flatten(mean_gradient(ctx, module, ctx.retain_batches()))
        share = ctx.forget_size / max(ctx.forget_size + ctx.retain_size, 1)
        vector = share * (grad_forget - grad_retain)
        samples = self._fisher_samples(ctx)
        update = woodfisher_inverse_product(vector, self._per_sample_grads(ctx, samples), p.fisher_damping)
        with torch.no_grad():
            for param, delta in zip(module.parameters(), unflatten(update, dict(module.named_parameters())).values()):
                param.add_(p.alpha * delta)
        return {"update_norm": float(p.alpha * update.norm()), "fisher_samples": float(len(samples.y))}

    def _fisher_samples(self, ctx: Context) -> Batch:
        """The same `fisher_samples` retain rows on every worker: each shard's first, gathered, first again."""
        mine = first_rows_by_index(ctx.retain_batches(), self.params.fisher_samples)
        if mine is None:
            raise ValueError("iu: this worker's retain shard is empty")
        gathered = Batch(*(ctx.comm.all_gather(t.contiguous()) for t in mine))
        order = torch.argsort(gathered.index)[: self.params.fisher_samples]
        return Batch(*(t[order] for t in gathered))

    def _per_sample_grads(self, ctx: Context, samples: Batch):
        params = list(ctx.module.parameters())
        with differentiable(ctx.module):
            for i in range(len(samples.y)):
                one = Batch(samples.x[i:i + 1], samples.y[i:i + 1], samples.index[i:i + 1])
                grads = torch.autograd.grad(ctx.loss(ctx.module, one).sum(), params, allow_unused=True)
                yield torch.cat([(g if g is not None else torch.zeros_like(q)).reshape(-1) for g, q in zip(grads, params)])
