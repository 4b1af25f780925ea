"""SA (selective amnesia, Heng & Soh 2023): continual-learning style forgetting for conditional generators.

The forgotten label is trained to produce a surrogate distribution (uniform noise images), while
generative replay of the kept classes and an EWC penalty F·(θ − θ0)² keep the rest:

    loss = ℓ(noise images, forgotten label) + γ · ℓ(replayed samples, their labels) + λ · Σ F (θ − θ0)²

with ℓ the task's per-sample noise-prediction loss (`ctx.loss`), as the SA release does it:

- **Generative replay.** The replayed images are drawn from the frozen original (`ctx.sample`, the task's
  sampler: DDIM with guidance), `replay_per_class` per kept class, each from noise seeded by (seed, class,
  index): every worker draws its share once at set-up and the shares are all-gathered, so each step takes its
  share of one global replay batch (seeded by the step) and N workers replay what one process does.
- **Fisher of the summed loss.** F is the release's: per sample, the gradient of the loss summed over all
  T timesteps and over pixels, squared, averaged over samples drawn from the original (`fisher_per_class` per
  class, every class). The sum over timesteps is estimated from `fisher_timesteps` antithetic draws of the
  task loss (× T / draws); our loss is the pixel mean, so F is scaled by C·H·W to equal the pixel-sum Fisher
  divided by C·H·W, which keeps the release's balance between λ·EWC and the (here pixel-mean) losses.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.whole_set import all_reduce_sum, differentiable
from unlearn.models.ddpm import seeded_noise
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
    replay_weight: float = hparam(1.0, ge=0, le=100, paper=f"{SA_PAPER}: gamma 1", help="weight γ of the replay loss")
    ewc_weight: float = hparam(10.0, ge=0, le=1e9, search=loguniform(0.1, 1e3),
                               paper=f"{SA_PAPER}: lambda 10 (on the Fisher of the loss summed over timesteps)",
                               help="weight λ of the EWC penalty Σ F (θ − θ0)²")
    replay_per_class: int = hparam(32, ge=1, le=100_000,
                                   paper=f"{SA_PAPER}: samples of every kept class drawn from the original "
                                         "(the release draws thousands on CIFAR-10; 32 for CPU jobs)",
                                   help="replayed samples per kept class, drawn once from the original")
    replay_steps: int = hparam(20, ge=1, le=1000, paper=f"{SA_PAPER}: the original's sampler (DDIM here)",
                               help="DDIM steps when drawing the replay and Fisher samples")
    replay_guidance: float = hparam(2.0, ge=0, le=20, paper=f"{SA_PAPER}: the original's guidance scale",
                                    help="classifier-free guidance when drawing them")
    fisher_per_class: int = hparam(8, ge=1, le=10_000, paper=f"{SA_PAPER}: the Fisher over generated samples of "
                                                             "every class", help="Fisher samples per class")
    fisher_timesteps: int = hparam(50, ge=2, le=4000,
                                   paper=f"{SA_PAPER}: the loss summed over all T timesteps (estimated here "
                                         "from this many antithetic draws)", help="timestep draws per Fisher sample")


@register
class SelectiveAmnesia(Method):
    name = "sa"
    uses = frozenset({"forget"})
    primary = "forget"
    tasks = frozenset({"diffusion"})
    Params = SAParams
    paper = SA_PAPER
    summary = "map the forgotten label to noise images; replay the original's samples; EWC towards the original"

    def setup(self, ctx: Context) -> None:
        p = self.params
        forgotten = forgotten_labels(ctx)
        shape = noise_shape(ctx)
        kept = torch.tensor([c for c in range(ctx.num_classes) if c not in forgotten], dtype=torch.long)
        self.replay_x, self.replay_y = draw_from_original(ctx, kept, p.replay_per_class, shape, salt=1)
        every = torch.arange(ctx.num_classes)
        fisher_x, fisher_y = draw_from_original(ctx, every, p.fisher_per_class, shape, salt=2, gather=False)
        self.fisher = summed_loss_fisher(ctx, fisher_x, fisher_y, p.fisher_timesteps, len(every) * p.fisher_per_class)
        self.anchor = {n: q.detach().clone() for n, q in ctx.original.named_parameters()}

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        surrogate = Batch(torch.rand_like(forget.x), forget.y, forget.index)  # uniform noise in [0, 1]
        forget_loss = ctx.loss(ctx.model, surrogate).mean()
        replay_loss = ctx.loss(ctx.model, self.replay_batch(ctx)).mean()
        ewc = sum((self.fisher[n] * (q - self.anchor[n]).square()).sum() for n, q in ctx.module.named_parameters())
        p = self.params
        self.apply(ctx, forget_loss + p.replay_weight * replay_loss + p.ewc_weight * ewc)
        return {"forget_loss": forget_loss.item(), "replay_loss": replay_loss.item(), "ewc": ewc.item()}

    def replay_batch(self, ctx: Context) -> Batch:
        """This worker's share of the step's global replay batch (drawn from a generator seeded by the step)."""
        from unlearn.shards import eval_share  # shards imports the methods' Batch: import at use

        generator = torch.Generator().manual_seed(ctx.seed * 1_000_003 + ctx.step)
        rows = torch.randint(0, len(self.replay_y), (self.params.batch_size,), generator=generator)
        mine = rows[torch.from_numpy(eval_share(len(rows), ctx.comm.world_size, ctx.comm.rank))]
        return Batch(self.replay_x[mine], self.replay_y[mine], mine.to(ctx.device))


def noise_shape(ctx: Context) -> tuple[int, ...]:
    """The shape of one starting noise: the denoiser's own (`noise_shape`: latents for a latent pipeline), else that
    of one forget input (any other noise predictor works on its inputs)."""
    shape = getattr(ctx.original, "noise_shape", None)
    if shape is not None:
        return tuple(shape)
    for batch in ctx.forget_batches():
        return tuple(batch.x.shape[1:])
    raise ValueError("sa: the model declares no noise_shape and this worker holds no forget rows to read it from")


def forgotten_labels(ctx: Context) -> set[int]:
    """The labels of the whole forget set (every worker's shard)."""
    seen = torch.zeros(ctx.num_classes, device=ctx.device)
    for batch in ctx.forget_batches():
        seen[batch.y.unique()] = 1.0
    seen = ctx.comm.all_reduce(seen, op="max")
    return {int(c) for c in torch.nonzero(seen).flatten().tolist()}


def draw_from_original(ctx: Context, classes: torch.Tensor, per_class: int, shape: tuple[int, ...], salt: int,
                       gather: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of each class from the frozen original; this worker draws its share (each sample
    from its own seeded noise). `gather`: every worker then holds the whole set, in set order."""
    from unlearn.shards import eval_share

    p = ctx.params
    labels = classes.repeat_interleave(per_class)
    mine = torch.from_numpy(eval_share(len(labels), ctx.comm.world_size, ctx.comm.rank))
    noise = seeded_noise(ctx.seed * 7 + salt, labels[mine], mine % per_class, shape)
    images = ctx.sample(ctx.original, labels[mine].to(ctx.device), noise.to(ctx.device), p.replay_steps,
                        p.replay_guidance)
    if not gather:
        return images, labels[mine].to(ctx.device)
    return ctx.comm.all_gather(images.contiguous()), labels.to(ctx.device)


def summed_loss_fisher(ctx: Context, x: torch.Tensor, y: torch.Tensor, draws: int, total: int) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the per-sample loss summed over timesteps and pixels (SA release), divided by C·H·W:
    per sample, the gradient of T · mean over `draws` timestep draws of the task loss (an estimate of the sum),
    squared; summed over every worker's samples and divided by `total`."""
    module = ctx.original
    schedule = getattr(getattr(module, "scheduler", None), "config", None)  # a diffusion model's noise schedule
    steps = schedule.num_train_timesteps if schedule is not None else 1
    # the elements the task loss averages over: pixels, or a latent pipeline's latent cells
    pixels = float(math.prod(getattr(module, "noise_shape", x.shape[1:]))) if len(x) else 1.0
    sums = {n: torch.zeros_like(q) for n, q in module.named_parameters()}
    with differentiable(module):
        for image, label in zip(x, y):
            copies = Batch(image.expand(draws, *image.shape), label.expand(draws), torch.zeros(draws, dtype=torch.long))
            summed = ctx.loss(module, copies).mean() * steps
            grads = torch.autograd.grad(summed, [q for _, q in module.named_parameters()], allow_unused=True)
            for (name, _), g in zip(module.named_parameters(), grads):
                if g is not None:
                    sums[name] += g.square() * pixels
    sums = all_reduce_sum(ctx.comm, sums)
    return {n: s / max(total, 1) for n, s in sums.items()}
