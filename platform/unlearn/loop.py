"""The step loop every run goes through, in one process or inside a Ray Train worker.

It reads like a plain PyTorch loop: set up the method, then for each step draw a forget batch and a
retain batch (only the streams the method uses), call `method.step`, check the losses are finite,
advance the LR schedule, and hand an epoch summary to `on_epoch` (the Ray engine reports and
checkpoints there). Batch sizes are global: each of N workers takes its slice of the same global batch
(shards.py), so N workers take the very steps one process takes and DDP's averaged gradient is the full
batch's.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
from torch import nn

from unlearn.errors import DivergedError
from unlearn.methods.base import Batch, Context, Method


class Stream(Protocol):
    """A worker's view of one split."""

    size: int  # rows in the whole split (all workers)

    def batches(self) -> Iterator[Batch]: ...  # endless, reshuffled every pass
    def one_pass(self) -> Iterator[Batch]: ...  # this worker's shard once, in order


def array_stream(x: np.ndarray, y: np.ndarray, batch_size: int, *, seed: int, rank: int = 0, world: int = 1,
                 device: torch.device | str = "cpu", index: np.ndarray | None = None) -> Stream:
    """A stream over in-memory arrays (worker `rank` of `world`): the engine's `ShareStream`, all rows read."""
    from unlearn.data.scenarios import ArrayRows
    from unlearn.shards import RowCache, ShareStream

    index = np.arange(len(y)) if index is None else np.asarray(index)
    positions = np.arange(len(y))
    cache = RowCache(ArrayRows(x), positions)
    cache.ensure(positions)
    stream = ShareStream(ArrayRows(x), positions, y, batch_size=batch_size, world=world, rank=rank, seed=seed,
                         device=device, cache=cache)
    stream.row_ids = index.astype(np.int64)  # batches carry the split's own row ids
    return stream


def total_steps(method: Method, forget_size: int, retain_size: int, task: str = "classification") -> int:
    """`steps` if declared, else `epochs` epochs (passes over the primary stream at the global batch size,
    or the method's own `epoch_steps`)."""
    p = method.params
    if p.steps is not None:
        return p.steps
    own = method.epoch_steps(forget_size, retain_size, task)
    if own is not None:
        return max(1, math.ceil(p.epochs * own))
    size = forget_size if method.primary == "forget" else retain_size
    return max(1, math.ceil(p.epochs * size / p.batch_size))


def steps_per_epoch(method: Method, forget_size: int, retain_size: int, task: str = "classification") -> int:
    own = method.epoch_steps(forget_size, retain_size, task)
    if own is not None:
        return max(1, own)
    size = forget_size if method.primary == "forget" else retain_size
    return max(1, math.ceil(size / method.params.batch_size))


def lr_scheduler(optimizer: torch.optim.Optimizer, kind: str, steps: int):
    """Cosine (to 0 over the run) or none."""
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
    return None


@dataclass
class EpochSummary:
    epoch: int
    epochs: int
    step: int
    total_steps: int
    losses: dict[str, float]
    seconds: float


@dataclass
class LoopResult:
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)  # one row per step: step + losses


def freeze_norm_stats(module: nn.Module) -> None:
    """Keep every BatchNorm layer in evaluation mode (running statistics used, never updated).

    Why: a method that sees only forget batches (one class, or a few) would otherwise replace the
    running statistics with that class's, which costs the retained classes accuracy at evaluation
    however small the learning rate. A pre-hook rather than `.eval()`, so that methods and DDP that
    toggle `train()` cannot undo it.
    """
    def hold(layer: nn.Module, _inputs) -> None:
        layer.training = False

    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.register_forward_pre_hook(hold)


def epoch_ends(method: Method, forget_size: int, retain_size: int, total: int, task: str) -> list[int]:
    """The step at which each epoch ends (ascending; the last is `total`).

    With `epochs` declared, epoch e ends at ceil(e · total / epochs): `train.epochs: 30` shows 30 epochs
    even when a pass is not a whole number of batches. With `steps` declared, epochs are passes of
    `steps_per_epoch` steps and the last one may be partial."""
    per_epoch = steps_per_epoch(method, forget_size, retain_size, task)
    if method.params.steps is None:
        n = max(1, math.ceil(method.params.epochs))
        ends = [math.ceil(e * total / n) for e in range(1, n + 1)]
    else:
        ends = [min(e * per_epoch, total) for e in range(1, math.ceil(total / per_epoch) + 1)]
    return sorted(set(ends))


def run(method: Method, ctx: Context, forget: Stream, retain: Stream, *, start_step: int = 0,
        on_epoch: Callable[[EpochSummary], None] | None = None, label: str | None = None,
        log_every: int = 1, verbose: bool = True, on_tick: Callable[[dict], None] | None = None) -> LoopResult:
    """Run `method` from `start_step` to `ctx.total_steps`; returns timing and per-step losses.

    `on_tick` gets a progress record (progress.Tick's fields) at most every progress.TICK_EVERY_S seconds
    and at the last step; the first one after a resume says so."""
    from unlearn.progress import TICK_EVERY_S

    label = label or method.name
    t_start = time.perf_counter()
    method.setup(ctx)
    if ctx.resume_method_state:
        method.load_state_dict(ctx.resume_method_state)
    ends = epoch_ends(method, forget.size, retain.size, ctx.total_steps, ctx.task)
    n_epochs = len(ends)
    epoch_at = lambda done: next(e for e, end in enumerate(ends, 1) if done <= end)  # noqa: E731
    ending = {end: e for e, end in enumerate(ends, 1)}
    last_tick = -math.inf

    def tick(done: int, losses: dict[str, float], resumed: bool = False) -> None:
        on_tick({"label": label, "step": done, "total_steps": ctx.total_steps, "epoch": epoch_at(max(done, 1)),
                 "epochs": n_epochs, "seconds": time.perf_counter() - t_start, "losses": losses, "resumed": resumed})

    if on_tick is not None and start_step > 0:
        tick(start_step, {}, resumed=True)
        last_tick = time.monotonic()
    forget_it = forget.batches() if "forget" in method.uses else None
    retain_it = retain.batches() if "retain" in method.uses else None
    history: list[dict[str, float]] = []
    running: dict[str, list[float]] = {}
    ctx.model.train()
    if method.params.norm_stats == "frozen":
        freeze_norm_stats(ctx.module)
    for step in range(start_step, ctx.total_steps):
        ctx.step = step
        ctx.logged = {}
        f_batch = next(forget_it) if forget_it is not None else None
        r_batch = next(retain_it) if retain_it is not None else None
        losses = method.step(ctx, f_batch, r_batch)
        losses.update(ctx.logged)
        bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
        if bad:
            name, value = next(iter(bad.items()))
            raise DivergedError(f"{label}: {name} became {value} at step {step + 1}/{ctx.total_steps} (try a lower lr)")
        if ctx.scheduler is not None:
            ctx.scheduler.step()
        for k, v in losses.items():
            running.setdefault(k, []).append(v)
        if step % log_every == 0:
            history.append({"step": step, **losses})
        done = step + 1
        if on_tick is not None and (done == ctx.total_steps or time.monotonic() - last_tick >= TICK_EVERY_S):
            tick(done, losses)
            last_tick = time.monotonic()
        if done in ending:
            summary = EpochSummary(
                epoch=ending[done], epochs=n_epochs, step=done, total_steps=ctx.total_steps,
                losses={k: float(np.mean(v)) for k, v in running.items()}, seconds=time.perf_counter() - t_start)
            running = {}
            if verbose and ctx.comm.rank == 0:
                shown = " ".join(f"{k}={v:.4f}" for k, v in summary.losses.items())
                print(f"  [{label}] epoch {summary.epoch}/{n_epochs} step {done}/{ctx.total_steps} {shown} "
                      f"({summary.seconds:.1f}s)", file=sys.stderr, flush=True)
            if on_epoch is not None:
                on_epoch(summary)
    # A loss is checked before its step's update, so the last update can still leave inf/NaN weights; they
    # must fail here, as a diverged run, not later as NaN probabilities inside the evaluation.
    broken = next((n for n, q in ctx.module.named_parameters() if not torch.isfinite(q).all()), None)
    if broken is not None:
        raise DivergedError(f"{label}: weight {broken} became non-finite by step {ctx.total_steps} (try a lower lr)")
    return LoopResult(seconds=time.perf_counter() - t_start, history=history)
