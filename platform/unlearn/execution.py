"""Where a method run executes: the request/result pair and the in-process executor.

The runner builds a `RunRequest` per method (what to run, on which data, from which weights) and
hands it to an executor: `LocalExecutor` here (one process), `RayExecutor` in engine.py (Ray Train
workers). Both call `execute`, which builds the model, context and streams and runs the loop, so
the maths is identical wherever it runs.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import nn

from unlearn import loop
from unlearn.comm import Comm, LocalComm
from unlearn.data.scenarios import Split
from unlearn.methods import build as build_method
from unlearn.methods.base import Context
from unlearn.models import build_model, reinitialise
from unlearn.spec import ModelSpec
from unlearn.tasks import loss_for, relabel_for


@dataclass
class RunRequest:
    label: str  # run name (method name or its label)
    method: str  # registry name
    params: dict[str, Any]
    model: ModelSpec | None  # None only when `execute` is handed a ready module
    num_outputs: int
    input_shape: tuple[int, ...]
    initial_state: dict[str, torch.Tensor] | None  # weights to start from (None: fresh init)
    forget: Split
    retain: Split  # the method's retain stream
    task: str = "classification"
    seed: int = 0


@dataclass
class RunOutput:
    state: dict[str, torch.Tensor]
    seconds: float  # wall-clock of the unlearning itself (setup + steps), without start-up
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0  # including executor start-up (Ray workers, data)
    resumed_from_step: int = 0  # >0 when a restarted run resumed from a checkpoint
    restarts: int = 0


class Executor(Protocol):
    def run(self, request: RunRequest) -> RunOutput: ...


def new_model(request: RunRequest) -> nn.Module:
    """The request's model with its starting weights (or re-initialised from the seed)."""
    torch.manual_seed(request.seed)
    model = build_model(request.model, request.num_outputs, request.input_shape)
    if request.initial_state is not None:
        model.load_state_dict(request.initial_state)
    return model


def execute(request: RunRequest, forget: loop.Stream, retain: loop.Stream, *, comm: Comm | None = None,
            device: torch.device | str = "cpu", wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
            on_epoch: Callable[..., None] | None = None, resume: dict[str, Any] | None = None,
            verbose: bool = True, module: nn.Module | None = None) -> tuple[nn.Module, loop.LoopResult]:
    """Build model, optimizer and context for a request and run the step loop.

    `wrap` is the engine's hook (DDP/FSDP); `resume` is a checkpoint dict
    {"model", "optimizer", "scheduler", "method", "step"} to continue from; `module` replaces the
    model the request would build (callers that already hold one).
    """
    device = torch.device(device)
    method = build_method(request.method, request.params)
    module = module if module is not None else new_model(request)
    original = copy.deepcopy(module).to(device).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    if method.from_scratch:
        reinitialise(module, request.seed)
    module.to(device)
    start_step = 0
    if resume is not None:
        module.load_state_dict(resume["model"])
        start_step = int(resume["step"])
    model = wrap(module)
    optimizer = method.optimizer(model)
    steps = loop.total_steps(method, forget.size, retain.size)
    scheduler = loop.lr_scheduler(optimizer, method.params.lr_schedule, steps)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler"):
            scheduler.load_state_dict(resume["scheduler"])
    ctx = Context(
        model=model, module=module, original=original, optimizer=optimizer, params=method.params,
        loss=loss_for(request.task), relabel=relabel_for(request.task), task=request.task,
        num_classes=request.num_outputs,
        forget_size=forget.size, retain_size=retain.size,
        forget_batches=forget.one_pass, retain_batches=retain.one_pass,
        comm=comm or LocalComm(), device=device, step=start_step, total_steps=steps,
        seed=request.seed, scheduler=scheduler,
        resume_method_state=resume.get("method") if resume is not None else None)
    result = loop.run(method, ctx, forget, retain, start_step=start_step, label=request.label,
                      on_epoch=(lambda s: on_epoch(s, ctx, method)) if on_epoch else None, verbose=verbose)
    return module, result


class LocalExecutor:
    """Runs every request in this process (CPU or one GPU)."""

    def __init__(self, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def run(self, request: RunRequest, module: nn.Module | None = None, verbose: bool = True) -> RunOutput:
        t0 = time.perf_counter()
        batch = build_method(request.method, request.params).params.batch_size
        streams = [loop.ArrayStream(s.x, s.y, batch, seed=request.seed + k, device=self.device, index=s.index)
                   for k, s in enumerate((request.forget, request.retain))]
        module, result = execute(request, *streams, device=self.device, module=module, verbose=verbose)
        state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        return RunOutput(state=state, seconds=result.seconds, history=result.history,
                         wall_seconds=time.perf_counter() - t0)
