"""SA (selective amnesia, Heng & Soh 2023): continual-learning style forgetting for conditional generators.

The forgotten label is trained to produce a surrogate distribution (uniform noise images), while
generative replay of the kept classes and an EWC penalty F·(θ − θ0)² keep the rest:

    loss = ℓ(noise images, forgotten label) + γ · ℓ(retain batch) + λ · Σ F (θ − θ0)²

with ℓ the task's per-sample noise-prediction loss (`ctx.loss`). Two simplifications, declared: replay
uses the real retain data (the release replays samples drawn from θ0), and F is the diagonal Fisher of
θ0 over the forget and retain sets as `whole_set.fisher_diagonal` computes it (squared batch-mean
gradients, all-reduced), where the release sums per-sample squared gradients over generated samples.
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.whole_set import fisher_diagonal
from unlearn.params import ForgetBatchParams, hparam, loguniform

SA_PAPER = "Heng & Soh 2023, Selective Amnesia (clear-nus/selective-amnesia); DDPM settings as the SFR-on release's SA config"


class SAParams(ForgetBatchParams):
    lr: float = hparam(1e-4, gt=0, le=10, search=loguniform(1e-5, 1e-3), paper=f"{SA_PAPER}: Adam 1e-4",
                       help="learning rate")
    steps: int | None = hparam(300, ge=1, le=10_000_000, paper=f"{SA_PAPER}: 20,000 iterations on CIFAR-10",
                               help="iterations")
    optimizer: Literal["sgd", "adam", "adamw"] = hparam("adam", paper=f"{SA_PAPER}: Adam", help="optimizer")
    weight_decay: float = hparam(0.0, ge=0, le=1, paper=f"{SA_PAPER}: no weight decay", help="weight decay")
    clip_grad: float | None = hparam(1.0, gt=0, paper=f"{SA_PAPER}: clip 1 (on a per-pixel-sum loss)",
                                     help="gradient-norm clip")
    replay_weight: float = hparam(1.0, ge=0, le=100, paper=f"{SA_PAPER}: gamma 1", help="weight γ of the retain replay loss")
    ewc_weight: float = hparam(10.0, ge=0, le=1e9, search=loguniform(1.0, 1e5),
                               paper=f"{SA_PAPER}: lambda 10 (Fisher of a per-pixel-sum loss; ours is the mean)",
                               help="weight λ of the EWC penalty Σ F (θ − θ0)²")


@register
class SelectiveAmnesia(Method):
    name = "sa"
    uses = frozenset({"forget", "retain"})
    primary = "retain"
    tasks = frozenset({"diffusion"})
    Params = SAParams
    paper = SA_PAPER
    summary = "map the forgotten label to noise images; replay the retain data; EWC towards the original"

    def setup(self, ctx: Context) -> None:
        batches = lambda: (b for stream in (ctx.forget_batches, ctx.retain_batches) for b in stream())  # noqa: E731
        self.fisher = fisher_diagonal(ctx, ctx.original, batches())
        self.anchor = {n: p.detach().clone() for n, p in ctx.original.named_parameters()}

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        surrogate = Batch(torch.rand_like(forget.x), forget.y, forget.index)  # uniform noise in [0, 1]
        forget_loss = ctx.loss(ctx.model, surrogate).mean()
        retain_loss = ctx.loss(ctx.model, retain).mean()
        ewc = sum((self.fisher[n] * (p - self.anchor[n]).square()).sum() for n, p in ctx.module.named_parameters())
        p = self.params
        self.apply(ctx, forget_loss + p.replay_weight * retain_loss + p.ewc_weight * ewc)
        return {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item(), "ewc": ewc.item()}
