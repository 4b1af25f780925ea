"""The collective-ops seam between methods and the engine.

Methods reduce whole-set quantities (Fisher sums, scores, thresholds, normalisers) through a `Comm`,
so a run on N workers computes what a run on one computes. `LocalComm` is the one-process version;
`TorchDistComm` uses `torch.distributed` (set up by Ray Train's TorchTrainer).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist


class Comm(Protocol):
    world_size: int
    rank: int

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor: ...
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...
    def broadcast_object(self, value: Any, src: int = 0) -> Any: ...
    def barrier(self) -> None: ...


class LocalComm:
    """One process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        return value

    def barrier(self) -> None:
        return None


_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class TorchDistComm:
    """Collectives over the default `torch.distributed` process group."""

    def __init__(self) -> None:
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place (and returned): sum/max/min of `tensor` over all workers."""
        dist.all_reduce(tensor, op=_OPS[op])
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate along dim 0 the tensors of all workers (their first dims may differ)."""
        size = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size)
        biggest = int(max(s.item() for s in sizes))
        padded = torch.zeros((biggest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        padded[: tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        dist.broadcast(tensor, src=src)
        return tensor

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank `src`'s picklable `value` on every rank (which run to do next, a decision)."""
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        dist.barrier()


def current_comm() -> Comm:
    """TorchDistComm inside an initialised process group, else LocalComm."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return TorchDistComm()
    return LocalComm()
