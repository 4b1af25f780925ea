"""What one step of a method reads, and the shapes of the task losses over it.

Its own module because methods, tasks, models (the diffusion losses) and the engine's data streams all
speak it, and none of them should import another just for these three names.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


class Batch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor  # global row ids in their split (stable across workers and restarts)


LossFn = Callable[[nn.Module, Batch], torch.Tensor]  # per-sample task loss, shape (batch,)
# per-sample loss that teaches the model other `labels` for the batch's inputs (random-label methods)
RelabelFn = Callable[[nn.Module, Batch, torch.Tensor], torch.Tensor]
# a generative task's sampler: (model, labels, starting noise, steps, guidance scale) -> inputs in the data's range
SampleFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, int, float], torch.Tensor]
# the rows a distillation loss scores: (logits R x K, labels R) of a batch (a classifier's samples, an LM's tokens)
RowsFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
