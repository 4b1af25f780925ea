"""What one run is (the request and its output) and how it executes, wherever it runs.

The job builds a `RunRequest` per queue item (the original model's training when it is not cached, retrain,
every method) and hands the queue to an executor: `LocalExecutor` here (one process), `RayExecutor` in
engine.py (Ray Train worker groups). Both run every item through `worker.serve`, which calls `execute`
(model, context, streams, the step loop), so the maths is identical wherever it runs.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol

import torch
from torch import nn

from unlearn import loop
from unlearn.comm import Comm, LocalComm
from unlearn.data.scenarios import Split
from unlearn.methods import get as method_class
from unlearn.methods.base import Context, Method
from unlearn.models import MODELS, build_model, reinitialise
from unlearn.params import MethodParams
from unlearn.spec import ModelSpec
from unlearn.tasks import get_task


@dataclass
class RunRequest:
    """One queue item. `params` is the method's validated parameter object (a dict is validated once, here)."""

    label: str  # run name (method name or its label)
    method: str  # registry name
    params: MethodParams | dict[str, Any]
    model: ModelSpec | None  # None only when `execute` is handed a ready module
    num_outputs: int
    input_shape: tuple[int, ...]
    initial_state: dict[str, torch.Tensor] | None  # weights to start from (None: the job's base, else a fresh init)
    forget: Split
    retain: Split  # the method's retain stream
    task: str = "classification"
    seed: int = 0
    role: str = "method"  # "original": trains the base model every other run of the job starts from

    def __post_init__(self) -> None:
        if not isinstance(self.params, MethodParams):
            from unlearn.methods import build

            self.params = build(self.method, self.params, family=getattr(self.model, "name", None)).params

    @property
    def method_class(self) -> type[Method]:
        return method_class(self.method)


@dataclass
class RunOutput:
    state: dict[str, torch.Tensor] | None
    seconds: float  # wall-clock of the unlearning itself (setup + steps), without start-up
    history: list[dict[str, float]] = field(default_factory=list)
    wall_seconds: float = 0.0  # including executor start-up (Ray workers, data)
    resumed_from_step: int = 0  # >0 when a restarted run resumed from a checkpoint
    restarts: int = 0
    metrics: dict[str, float] | None = None  # worker-side evaluation (None when the job evaluates nothing)
    outputs: Any = None  # what the comparison with retrain needs (test-set outputs)
    captured: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    error: dict[str, str] | None = None  # a run that failed: {"error": type, "message": line}
    starts: int = 1  # how often the run was started (restarts included)
    system: list[dict[str, float]] = field(default_factory=list)  # rank 0's system metrics samples (system_metrics.py)


@dataclass
class Executed:
    """What `execute` leaves behind: the unwrapped and wrapped model, the method object and the loop's result."""

    module: nn.Module
    model: nn.Module
    method: Method
    result: loop.LoopResult


class Executor(Protocol):
    def run_queue(self, job: Any, on_result: Callable[[int, RunOutput], None],
                  progress: Any = None) -> dict[str, Any]: ...
    def run(self, request: RunRequest) -> RunOutput: ...


def new_model(request: RunRequest) -> nn.Module:
    """The request's model with its starting weights (or initialised from the seed)."""
    torch.manual_seed(request.seed)
    model = build_model(request.model, request.num_outputs, request.input_shape)
    if request.initial_state is not None:
        model.load_state_dict(request.initial_state)
    return model


def execute(request: RunRequest, forget: loop.Stream, retain: loop.Stream, *, comm: Comm | None = None,
            device: torch.device | str = "cpu", wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
            on_epoch: Callable[..., None] | None = None, resume: dict[str, Any] | None = None,
            verbose: bool = True, module: nn.Module | None = None,
            on_tick: Callable[[dict], None] | None = None) -> Executed:
    """Build model, optimizer and context for a request and run the step loop.

    `wrap` is the engine's hook (DDP/FSDP); `on_tick` gets the loop's progress records; `resume` is a checkpoint dict
    {"model", "optimizer", "scheduler", "method", "step"} to continue from (a sharded one, FSDP2: "sharded" names
    the folder of the model's and optimizer's shards, read once the model is wrapped, and "model" is None);
    `module` replaces the model the request would build (callers that already hold one).
    """
    device = torch.device(device)
    method = request.method_class(request.params)
    family = MODELS.lookup(request.model.name) if request.model is not None else None
    module = module if module is not None else new_model(request)
    if method.from_scratch:
        original: nn.Module = _NoOriginal()  # nothing to compare against: the run trains from its start
        module = fresh_start(request, module, family)
    else:
        if family is not None and family.adapt is not None and request.role == "method":
            module = family.adapt(request.model, module)
        original = None if family is not None and family.reference is not None else frozen_copy(module, device)
    module.to(device)
    start_step = int(resume["step"]) if resume is not None else 0
    weights = resume.get("model") if resume is not None else None
    if weights is not None and original is not None:
        module.load_state_dict(weights)
    model = wrap(module)
    if original is None:  # the family's own frozen original, made once the engine placed the model, from the
        original = family.reference(model, module)  # run's starting weights: a resumed run's go in after it
        if weights is not None:
            module.load_state_dict(weights)
    optimizer = method.optimizer(model)
    steps = loop.total_steps(method, forget.size, retain.size, request.task)
    scheduler = loop.lr_scheduler(optimizer, method.params.lr_schedule, steps)
    if resume is not None:
        if resume.get("sharded"):  # FSDP2: each rank reads its shards of the weights and the optimizer state
            from unlearn.lm_sharding import load_sharded

            load_sharded(model, optimizer, resume["sharded"])
        else:
            optimizer.load_state_dict(resume["optimizer"])
        if scheduler is not None and resume.get("scheduler"):
            scheduler.load_state_dict(resume["scheduler"])
    task = get_task(request.task)
    ctx = Context(
        model=model, module=module, original=original, optimizer=optimizer, params=method.params,
        loss=task.loss, relabel=task.relabel, sample=task.sample, rows=task.rows, global_rows=task.global_rows,
        task=request.task,
        num_classes=request.num_outputs,
        forget_size=forget.size, retain_size=retain.size,
        forget_batches=forget.one_pass, retain_batches=retain.one_pass,
        comm=comm or LocalComm(), device=device, step=start_step, total_steps=steps,
        seed=request.seed, scheduler=scheduler,
        resume_method_state=resume.get("method") if resume is not None else None)
    result = loop.run(method, ctx, forget, retain, start_step=start_step, label=request.label,
                      on_epoch=(lambda s: on_epoch(s, ctx, method)) if on_epoch else None, verbose=verbose,
                      on_tick=on_tick)
    if family is not None and family.merge is not None:  # adapters folded back: the saved state has the model's keys
        module = family.merge(module)
    return Executed(module, model, method, result)


def frozen_copy(module: nn.Module, device: torch.device) -> nn.Module:
    """A frozen copy of the model before unlearning, in eval mode: the methods' original."""
    original = copy.deepcopy(module).to(device).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    return original


def fresh_start(request: RunRequest, module: nn.Module, family: Any = None) -> nn.Module:
    """The starting weights of a from-scratch run (retrain, the original's training): a fresh initialisation from the
    seed, or, for a `family` that fine-tunes a `path` model, that model's own weights (never re-initialised)."""
    if family is not None and family.fine_tunes_base and getattr(request.model, "path", None):
        return new_model(replace(request, initial_state=None))
    reinitialise(module, request.seed)
    return module


class _NoOriginal(nn.Module):
    """The original of a from-scratch run: none (such runs never read it); calling it is a programming error."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a from-scratch run has no original model to compare against")


class LocalExecutor:
    """Runs the job's queue in this process (CPU or one GPU), through the same worker code as Ray's groups."""

    executor = "local"

    def __init__(self, device: str | None = None, storage: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.storage = storage

    def run_queue(self, job: Any, on_result: Callable[[int, RunOutput], None],
                  progress: Any = None) -> dict[str, Any]:
        """Every item in order; `on_result(index, output)` as each finishes. Returns the engine summary.

        `progress` (progress.Progress) draws the runs' ticks; without it the step loop prints epoch lines."""
        from unlearn.comm import LocalComm
        from unlearn.run_queue import RunQueue
        from unlearn.worker import WorkerEnv, read_result, serve

        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="unlearn-local-") as tmp:
            if not job.storage:
                job.storage = self.storage or tmp
            queue = RunQueue([{"label": r.label, "role": r.role} for r in job.requests],
                             base_ready=job.base_state is not None, finished=job.finished)

            def deliver(q: RunQueue) -> None:
                for index, record in q.take_finished():
                    on_result(index, output_from_record(job.requests[index], record, read_result))

            def call(q: RunQueue, name: str, *args: Any) -> Any:
                value = getattr(q, name)(*args)
                if name in ("done", "failed"):  # deliver at once: the driver writes MLflow as runs finish
                    deliver(q)
                return value

            deliver(queue)  # a resumed job: the runs an earlier attempt finished

            serve(job, queue, WorkerEnv(comm=LocalComm(), device=self.device, call=call, verbose=progress is None,
                                        progress=progress.tick if progress is not None else None))
        return {"executor": "local", "worker_groups": 1, "train_runs": 0,
                "wall_seconds": time.perf_counter() - t0}

    def run(self, request: RunRequest, module: nn.Module | None = None, verbose: bool = True) -> RunOutput:
        """One request on its own (no queue, no evaluation): benchmarks, helper fits, tests."""
        t0 = time.perf_counter()
        batch = request.params.batch_size
        streams = [loop.array_stream(s.x, s.y, batch, seed=request.seed + k, device=self.device, index=s.index)
                   for k, s in enumerate((request.forget, request.retain))]
        run = execute(request, *streams, device=self.device, module=module, verbose=verbose)
        state = {k: v.detach().cpu() for k, v in run.module.state_dict().items()}
        return RunOutput(state=state, seconds=run.result.seconds, history=run.result.history,
                         wall_seconds=time.perf_counter() - t0, label=request.label)


def output_from_record(request: RunRequest, record: dict[str, Any], read: Callable[[str], dict]) -> RunOutput:
    """The driver's view of a finished queue item: its result file read back, or its error."""
    if "error" in record:
        return RunOutput(state=None, seconds=0.0, label=request.label, error=record["error"])
    data = read(record["path"])
    return RunOutput(state=data["state"], seconds=data["seconds"], history=data["history"], metrics=data["metrics"],
                     outputs=data["outputs"], captured=data["captured"], label=request.label,
                     resumed_from_step=data["resumed_from_step"], starts=record.get("starts", 1),
                     restarts=record.get("restarts", 0), system=data.get("system", []))
