"""Whole-set passes for `setup`: gradients over every worker's shard, reduced through `ctx.comm`.

Sums and counts are all-reduced before anything is divided, so N workers compute what one computes.
Gradients are taken with `torch.autograd.grad` on an unwrapped module (`ctx.original` for θ0, or
`ctx.module`), so no DDP hook fires and no `.grad` is left behind.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from unlearn.comm import Comm
from unlearn.methods.base import Batch, Context, LossFn


@contextmanager
def differentiable(module: nn.Module) -> Iterator[nn.Module]:
    """Let gradients reach a module's weights for one pass (the frozen `ctx.original` too), in eval mode."""
    flags = [p.requires_grad for p in module.parameters()]
    was_training = module.training
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    try:
        yield module
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)
        module.train(was_training)


def flatten(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector of every tensor of a name-keyed dict, in its order."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped like `like` (inverse of `flatten`)."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = vector[start:start + t.numel()].view_as(t)
        start += t.numel()
    return out


def batch_gradients(module: nn.Module, batches: Iterable[Batch], loss: LossFn,
                    reduction: str) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Per batch: the gradient of its per-sample losses, summed or averaged, and the batch's size."""
    named = list(module.named_parameters())
    for batch in batches:
        if len(batch.y) == 0:
            continue
        losses = loss(module, batch)
        total = losses.sum() if reduction == "sum" else losses.mean()
        grads = torch.autograd.grad(total, [p for _, p in named], allow_unused=True)
        yield {n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}, len(losses)


def all_reduce_sum(comm: Comm, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor of a dict over all workers in one collective (flattened into one buffer)."""
    if comm.world_size == 1:
        return tensors
    return unflatten(comm.all_reduce(flatten(tensors), op="sum"), tensors)


def global_count(comm: Comm, count: int, device: torch.device) -> float:
    """Sum of a per-worker count over all workers."""
    return float(comm.all_reduce(torch.tensor(float(count), dtype=torch.float64, device=device), op="sum").item())


def mean_gradient(ctx: Context, module: nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """∇ of the mean loss over the whole set: per-sample gradient sums and the count, all-reduced, divided."""
    sums = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    count = 0
    with differentiable(module):
        for grads, n in batch_gradients(module, batches, ctx.loss, "sum"):
            for name, g in grads.items():
                sums[name] += g
            count += n
    sums = all_reduce_sum(ctx.comm, sums)
    total = max(global_count(ctx.comm, count, next(iter(sums.values())).device), 1.0)
    return {n: s / total for n, s in sums.items()}


def fisher_diagonal(ctx: Context, module: nn.Module, batches: Iterable[Batch]) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher as SFR-on's release computes it: mean over batches of (∇ batch-mean loss)².

    The squared-gradient sums and the batch count are all-reduced before the division, so the result is
    the one-process value over the same batches; with N workers each batch holds batch_size / N rows
    (the release's per-batch estimate depends on the batching, not on where the batches run).
    """
    sums = {n: torch.zeros_like(p) for n, p in module.named_parameters()}
    count = 0
    with differentiable(module):
        for grads, _ in batch_gradients(module, batches, ctx.loss, "mean"):
            for name, g in grads.items():
                sums[name] += g.square()
            count += 1
    sums = all_reduce_sum(ctx.comm, sums)
    total = max(global_count(ctx.comm, count, next(iter(sums.values())).device), 1.0)
    return {n: s / total for n, s in sums.items()}
