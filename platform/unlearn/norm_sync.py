"""BatchNorm statistics over the global batch, so N data-parallel workers compute what one computes.

In training mode BatchNorm normalises with its input's own mean and variance. Each worker sees only
its share of the global batch, so without this every worker would normalise (and update its running
statistics) with a different, smaller sample than a one-process run. `sync_norm_stats` makes every
BatchNorm layer use the statistics of all workers' rows: `nn.SyncBatchNorm` on CUDA, and on CPU
(where SyncBatchNorm does not run) a forward that reduces per-channel sums through the `Comm` seam.
"""

from __future__ import annotations

import functools
from itertools import chain

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from unlearn.comm import Comm


def sync_norm_stats(module: nn.Module, comm: Comm) -> nn.Module:
    """`module` with every BatchNorm layer normalising by the statistics of all workers' rows.

    One worker: `module` itself, untouched (nothing to reduce, so no overhead). CUDA: torch's
    `SyncBatchNorm` (over the default process group; it builds new layers sharing the parameters and
    buffers, so apply this before registering hooks on them). CPU: each layer keeps its identity,
    parameters, buffers, hooks and state-dict keys; only its class is swapped for one whose training
    forward reduces through `comm`. Every worker must then run the same training-mode forward (and
    backward) passes, an empty share included. Evaluation mode, and a layer frozen to evaluation by a
    forward pre-hook, normalise by running statistics as plain BatchNorm does and do no collective.
    """
    if comm.world_size == 1:
        return module
    if any(t.is_cuda for t in chain(module.parameters(), module.buffers())):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for layer in module.modules():
        if isinstance(layer, _BatchNorm):
            if not isinstance(layer, _GlobalBatchStats):
                layer.__class__ = _global_stats_class(type(layer))
            layer.comm = comm
    return module


class _AllReduceSum(torch.autograd.Function):
    """Sum over workers, differentiable: the backward sums the incoming gradients over workers too.

    Why: every worker's loss depends on every worker's rows through the shared statistics, and the
    data-parallel gradient is the sum (DDP: the mean) of the workers' gradients, so the gradient of a
    worker's local sum is the sum of all workers' gradients of the global one.
    """

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, comm: Comm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_reduce(tensor.clone(memory_format=torch.contiguous_format))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad.clone(memory_format=torch.contiguous_format)), None


class _GlobalBatchStats(_BatchNorm):
    """Training forward of a BatchNorm layer with the mean and variance of the whole global batch.

    Two passes, each one all-reduce: per-channel sums and the row count for the mean, then sums of
    squared deviations from it for the variance (no E[x²] − E[x]² cancellation). The reductions are in
    float64: the count stays an exact integer and the sums over workers lose nothing.
    """

    comm: Comm

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training:  # running statistics; with none tracked, this worker's rows (as SyncBatchNorm)
            return super().forward(input)
        self._check_input_dim(input)
        acc = torch.promote_types(input.dtype, torch.float32)  # BatchNorm's own accumulation type
        x = input.to(acc)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        rows = x.numel() // x.shape[1]
        totals = _AllReduceSum.apply(
            torch.cat([x.sum(dims).double(), torch.tensor([rows], dtype=torch.float64, device=x.device)]), self.comm)
        count = int(totals[-1].item())
        if count == 1:  # the same error plain BatchNorm raises, on every worker alike
            raise ValueError(f"Expected more than 1 value per channel when training, got 1 over all workers "
                             f"(this worker's input size {tuple(input.shape)})")
        if self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        if count == 0:  # every share empty: plain BatchNorm's empty output, running statistics kept
            return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        mean = totals[:-1] / count
        centred = x - mean.to(acc).view(shape)
        squares = _AllReduceSum.apply(centred.square().sum(dims).double(), self.comm)
        out = centred * torch.rsqrt(squares / count + self.eps).to(acc).view(shape)
        if self.weight is not None:
            out = out * self.weight.view(shape)
        if self.bias is not None:
            out = out + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running(mean.detach(), squares.detach() / (count - 1))
        return out.to(input.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """torch's update: momentum, or with `momentum=None` the cumulative average over batches."""
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - factor).add_(factor * mean.to(self.running_mean.dtype))
        self.running_var.mul_(1 - factor).add_(factor * unbiased_var.to(self.running_var.dtype))


@functools.cache
def _global_stats_class(cls: type[_BatchNorm]) -> type[_BatchNorm]:
    """`cls` with the global-statistics forward first in line; still an instance of `cls` (isinstance checks hold)."""
    return type(f"Global{cls.__name__}", (_GlobalBatchStats, cls), {"__module__": __name__})
