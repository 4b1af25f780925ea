"""What every worker of a group does, on Ray or in this process: take the job's runs from a shared queue.

`serve(job, queue, env)` reads like a plain training script: for each run it gets from the queue it resets
the model to the run's starting weights, builds this worker's streams over its share of the data (rows it
reads itself, once per job, through `RowCache`), runs the step loop, evaluates its share of the
evaluation splits, and hands the result on. Where it runs is `env`'s business: the comm, the device, how
the model is wrapped (DDP/FSDP on Ray), what an epoch reports (checkpoints on Ray), attempt records.

The queue (run_queue.py, held by the driver, an actor on Ray) says which run a group does next.
"""

from __future__ import annotations

import io
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from unlearn import loop
from unlearn.atomic import write_bytes_atomic
from unlearn.errors import BadInput, DivergedError
from unlearn.evaluation.sharded import ShardedClassificationEvaluator
from unlearn.execution import RunOutput, RunRequest, execute, new_model
from unlearn.run_queue import WAIT
from unlearn.shards import RowCache, ShareStream, StreamedShare
from unlearn.system_metrics import SystemSampler


@dataclass
class GroupJob:
    """Everything a group's workers need, sent once (splits travel without images)."""

    requests: list[RunRequest]  # forget/retain: Split objects, or split names resolved from `splits_recipe`
    base_state: Any = None  # the original's weights (a dict, or an object-store reference on Ray); None: in the queue
    eval_splits: dict[str, Any] | None = None  # target / retain / test: worker-side classification evaluation
    evaluator: Any = None  # or a task evaluator built on the driver, `evaluate(model, comm, device)` on every worker
    mia: bool = True
    seed: int = 0
    storage: str = ""  # folder (or URI) the results are written to
    capture: tuple[str, ...] = ()
    epoch_metrics: Any = None  # optional: `due(summary)` and `metrics(evaluator, ctx)` for Tune reports
    splits_recipe: Any = None  # data.scenarios.SplitsRecipe: workers rebuild the splits the requests name
    data_mode: str = "exact"  # "streaming": method streams come from the worker's Ray Data shards (env.data_shards)
    splits_recipe_store: Any = None  # the row store the recipe read (streaming decodes the shard's images with it)
    finished: dict[int, dict[str, Any]] = field(default_factory=dict)  # resumed job: runs already done (index -> record)

    def resolved(self) -> "GroupJob":
        """The job with every split name replaced by the split (rebuilt here from the recipe)."""
        if self.splits_recipe is None:
            return self
        split = self.splits_recipe.split
        requests = [replace(r, forget=split(r.forget) if isinstance(r.forget, str) else r.forget,
                            retain=split(r.retain) if isinstance(r.retain, str) else r.retain) for r in self.requests]
        evaluation = self.eval_splits
        if isinstance(evaluation, (tuple, list)):
            evaluation = {name: split(name) for name in evaluation}
        return replace(self, requests=requests, eval_splits=evaluation, splits_recipe=None,
                       splits_recipe_store=self.splits_recipe.dataset)


@dataclass
class WorkerEnv:
    """Where `serve` runs: rank, comm, device, and the engine's hooks (identity in one process)."""

    rank: int = 0
    world: int = 1
    group: int = 0
    comm: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    wrap: Callable[[torch.nn.Module, RunRequest], torch.nn.Module] = lambda module, request: module
    call: Callable[..., Any] = None  # call(queue, name, *args): a queue method, local or remote
    on_epoch: Callable[..., None] | None = None  # (summary, ctx, method, request): checkpoints, Tune reports
    on_done: Callable[[RunRequest], None] | None = None  # after a run: the checkpoint that marks it done
    resume_for: Callable[[str], dict[str, Any] | None] = lambda label: None
    resuming: str | None = None  # the run a restored group checkpoint was in the middle of
    state_of: Callable[[torch.nn.Module, torch.nn.Module], Any] = (
        lambda model, module: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
    record: Callable[[dict[str, Any]], None] = lambda event: None  # attempt records
    wrap_stream: Callable[[Any, str], Any] = lambda stream, label: stream  # test-only failure injection
    data_shards: dict[str, Any] = field(default_factory=dict)  # data: streaming: split name -> Ray Data shard
    verbose: bool = True  # the step loop's own epoch lines (a job's driver draws progress from ticks instead)
    progress: Callable[[dict[str, Any]], None] | None = None  # rank 0's progress ticks (progress.Tick fields)
    max_failures: int = 0  # lost workers a group may restart after

    def agree(self, value: Any) -> Any:
        """Rank 0's value on every rank."""
        return self.comm.broadcast_object(value, src=0) if self.world > 1 else value


def serve(job: GroupJob, queue: Any, env: WorkerEnv) -> None:
    """Run queue items until none is left (every rank of the group runs the same items in step)."""
    if env.rank == 0:
        env.call(queue, "start_group", env.group, env.max_failures)
        if env.resuming:  # a resumed job: take the run this group's checkpoint holds back first
            env.call(queue, "claim", env.group, env.resuming)
    caches: dict[int, RowCache] = {}
    job = job.resolved()
    base = _resolve(job.base_state)
    while True:
        index = env.agree(env.call(queue, "next", env.group) if env.rank == 0 else None)
        if index is None:
            return
        if index == WAIT:  # another group is still training the original
            time.sleep(0.2)
            continue
        request = job.requests[index]
        if request.role != "original" and base is None:
            base = _resolve(env.call(queue, "base"))
        resume = env.resume_for(request.label)
        env.record({"event": "start", "label": request.label, "group": env.group, "rank": env.rank,
                    "pid": os.getpid(), "step": int(resume["step"]) if resume else 0, "time": time.time()})
        try:
            out = run_request(request, job, env, caches, base, resume)
        except (DivergedError, BadInput) as err:  # the run's own, deterministic failure: record it, go on
            env.call(queue, "failed", index, {"error": type(err).__name__, "message": _first_line(err)})
            if env.world > 1:
                raise  # the others may wait in a collective: the group restarts and moves on past this run
            continue
        except Exception as err:  # in a group, possibly a lost peer: restart (the queue's budget decides)
            if env.world > 1:
                env.call(queue, "note_error", index, f"{type(err).__name__}: {_first_line(err)}")
                raise
            env.call(queue, "failed", index, {"error": type(err).__name__, "message": _first_line(err)})
            continue
        if request.role == "original":
            base = out.state
            if env.rank == 0:
                env.call(queue, "set_base", out.state)
        if env.rank == 0:
            env.call(queue, "done", index, write_result(job.storage, request.label, out))
        if env.on_done is not None:
            env.on_done(request)


def run_request(request: RunRequest, job: GroupJob, env: WorkerEnv, caches: dict, base: Any,
                resume: dict[str, Any] | None) -> RunOutput:
    """`_run_request`, with rank 0's system metrics (CPU, memory, GPU) sampled while it runs into `system`."""
    if env.rank != 0 or request.role == "evaluate":
        return _run_request(request, job, env, caches, base, resume)
    sampler = SystemSampler(env.device).start()
    try:
        out = _run_request(request, job, env, caches, base, resume)
    finally:
        samples = sampler.stop()
    out.system = samples
    return out


def _run_request(request: RunRequest, job: GroupJob, env: WorkerEnv, caches: dict, base: Any,
                 resume: dict[str, Any] | None) -> RunOutput:
    """One run on this worker: model at its starting weights, streams over this worker's share, loop, evaluation."""
    start = request.initial_state if request.initial_state is not None else base
    module = new_model(replace(request, initial_state=start))
    evaluator = _evaluator(job, env, caches)
    if request.role == "evaluate":  # the cached original: scored, not trained
        metrics, outputs = evaluator.evaluate(module.to(env.device)) if evaluator is not None else (None, None)
        return RunOutput(state=None, seconds=0.0, metrics=metrics, outputs=outputs, label=request.label)
    batch_size = request.params.batch_size
    steps = loop.total_steps(request.method_class(request.params), len(request.forget), len(request.retain),
                             request.task)
    streams = []
    for k, (name, split) in enumerate((("forget", request.forget), ("retain", request.retain))):
        if split.name in env.data_shards:  # data: streaming (bounded memory, not step-exact)
            store = job.splits_recipe_store
            stream = StreamedShare(env.data_shards[split.name], store, store.num_rows("train"), split.index, split.y,
                                   batch_size=batch_size, world=env.world, device=env.device, label=request.label)
        else:
            stream = ShareStream(split.rows, split.index, split.y, batch_size=batch_size, world=env.world,
                                 rank=env.rank, seed=request.seed + k, steps=steps, device=env.device,
                                 uses_steps=name in request.method_class.uses, cache=_cache(caches, split))
        stream.start_step = int(resume["step"]) if resume else 0
        streams.append(env.wrap_stream(stream, request.label) if name in request.method_class.uses else stream)
    on_epoch = (lambda summary, ctx, method: env.on_epoch(summary, ctx, method, request, evaluator)) \
        if env.on_epoch else None
    run = execute(request, *streams, comm=env.comm, device=env.device, wrap=lambda m: env.wrap(m, request),
                  on_epoch=on_epoch, resume=resume, verbose=env.verbose and env.rank == 0, module=module,
                  on_tick=(lambda record: env.progress({**record, "group": env.group}))
                  if env.progress is not None and env.rank == 0 else None)
    metrics, outputs = evaluator.evaluate(_forward_model(run)) if evaluator is not None else (None, None)
    state = env.state_of(run.model, run.module)
    captured = {name: _to_cpu(getattr(run.method, name)) for name in job.capture if hasattr(run.method, name)}
    diagnostics = run.method.diagnostics()
    if diagnostics:  # scored by the driver against what the method was not told
        captured["diagnostics"] = _to_cpu(diagnostics)
    return RunOutput(state=state, seconds=run.result.seconds, history=run.result.history,
                     resumed_from_step=int(resume["step"]) if resume else 0, metrics=metrics, outputs=outputs,
                     captured=captured, label=request.label)


def _forward_model(run: Any) -> torch.nn.Module:
    """The model the evaluation runs forwards on: the unwrapped module, except under FSDP2 (causal LMs), where only
    the sharded root gathers the parameters it holds (the LM head, the final norm) for a forward. After a LoRA run
    `run.module` is the merged model inside the peft root (merging keeps the root, without adapters), so its own
    forward would meet sharded weights; the root's computes the merged model."""
    from unlearn.checkpoints import is_fully_sharded

    return run.model if is_fully_sharded(run.model) else run.module


def _cache(caches: dict, split: Any) -> RowCache:
    """One row cache per split for the whole job: a worker reads each of its rows from storage once."""
    if id(split) not in caches:
        caches[id(split)] = RowCache(split.rows, split.index)
    return caches[id(split)]


class _OnShare:
    """A task evaluator (diffusion) run by every worker on its share, through the group's comm."""

    def __init__(self, evaluator: Any, env: WorkerEnv) -> None:
        self.evaluator, self.env = evaluator, env

    def evaluate(self, model: torch.nn.Module) -> tuple[dict[str, float], Any]:
        return self.evaluator.evaluate(model, comm=self.env.comm, device=self.env.device)


def _evaluator(job: GroupJob, env: WorkerEnv, caches: dict) -> ShardedClassificationEvaluator | _OnShare | None:
    if job.evaluator is not None:
        return _OnShare(job.evaluator, env)
    if job.eval_splits is None:
        return None
    split_caches = {name: _cache(caches, split) for name, split in job.eval_splits.items() if split is not None}
    return ShardedClassificationEvaluator(job.eval_splits, split_caches, env.comm, env.device, mia=job.mia,
                                          seed=job.seed, keep_rows=job.data_mode == "exact")


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


def _resolve(state: Any) -> Any:
    """Weights from an object-store reference (Ray), or as they are."""
    if state is not None and type(state).__name__ == "ObjectRef":
        import ray

        return ray.get(state)
    return state


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- results on storage ------------------------------------------------------------------------------------
def result_path(storage: str, label: str) -> str:
    return f"{storage.rstrip('/')}/results/{label}.pt"


def write_result(storage: str, label: str, out: RunOutput) -> dict[str, Any]:
    """Rank 0 writes a finished run's weights, metrics and outputs atomically; the record says where."""
    buffer = io.BytesIO()
    torch.save({"state": out.state, "seconds": out.seconds, "history": out.history, "metrics": out.metrics,
                "outputs": out.outputs, "captured": out.captured, "resumed_from_step": out.resumed_from_step,
                "system": out.system}, buffer)
    path = result_path(storage, label)
    write_bytes_atomic(buffer.getvalue(), path)
    return {"path": path, "metrics": out.metrics, "seconds": out.seconds}


def read_result(path: str) -> dict[str, Any]:
    from unlearn.atomic import read_bytes

    return torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=False)
