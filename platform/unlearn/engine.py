"""The Ray Train engine: a job's queue of runs on worker groups that live for the whole job.

`RayExecutor.run_queue(job, on_result)` starts `ray.groups` worker groups, each one `TorchTrainer.fit` of
`group_loop`, and a small queue actor (`worker.RunQueue`) they all take runs from: the original's training
when it is not cached, retrain, every method. A group loads its workers' data shares and the base weights
once and runs its share of the queue back to back (a long retrain does not leave another group idle);
methods are independent, so groups run concurrently on a cluster. The driver holds no images: it plans
splits from labels and row ids, workers read their own rows (shards.py) and evaluate their own share
(evaluation/sharded.py); rank 0 writes each finished run's weights, metrics and test outputs to storage and
the driver, polling the queue, writes that run's MLflow run as it finishes.

Per worker, `group_loop` is plain PyTorch plus three marked Ray steps: (1) its rank and device from Ray
Train, (2) `prepare_model` (DDP, or FSDP with `ray.strategy: fsdp`) in `Wrapper` (causal LMs: `lm_sharding`'s
DDP or FSDP2), (3) `ray.train.report` with a group checkpoint in `GroupReporter` (checkpoints.py: which runs
are done, the running run's state; under FSDP2 each rank's shards), at most every UNLEARN_REPORT_EVERY_S
seconds (default 5) and after each run. `FailureConfig` restarts a
group that lost a worker; it asks the queue for its run again and resumes it from the checkpoint's step.
A run that fails by itself (a NaN loss, a bad parameter) is recorded as failed and the queue goes on
(a group of several workers restarts once for it: its other workers may be waiting in a collective).

Steps are exact for any worker count: every worker takes its slice of the same global batch (shards.py),
BatchNorm statistics are reduced over the workers (norm_sync.py), and when the slices differ in size (N
does not divide the batch) each worker's loss is weighted by its share, so a run on N workers
differs from one process only by floating-point reduction order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from unlearn.checkpoints import AttemptLog, GroupCheckpoint, full_state, is_fully_sharded, write_checkpoint
from unlearn.execution import RunOutput, RunRequest, output_from_record
from unlearn.faults import armed_env, maybe_fail
from unlearn.resume import STORAGE_ENV
from unlearn.ray_session import connect, in_embedded_session, local_trainer_class, quiet_ray_data, quiet_worker_logs
from unlearn.shards import share_fraction
from unlearn.spec import RaySpec
from unlearn.run_queue import RunQueue
from unlearn.worker import GroupJob, WorkerEnv, read_result, serve

REPORT_ENV = "UNLEARN_REPORT_EVERY_S"
DEFAULT_REPORT_EVERY_S = 5.0
POLL_S = 0.3


class RayExecutor:
    """Runs a job's queue on `spec.groups` Ray Train worker groups (see the module docstring).

    `capture` names method attributes (e.g. "mask", "threshold") that rank 0 returns at the end of each
    run; they land in `captured[label]` (tests compare them across worker counts).
    """

    executor = "ray"

    def __init__(self, spec: RaySpec, seed: int = 0, *, capture: Sequence[str] = (), storage: str | None = None) -> None:
        self.spec, self.seed, self.capture = spec, seed, tuple(capture)
        self.owns_session = connect(spec)
        storage = storage or spec.storage or os.environ.get(STORAGE_ENV)
        self._temporary_storage = storage is None
        self.storage = storage or tempfile.mkdtemp(prefix="unlearn-ray-")
        if self._temporary_storage:
            weakref.finalize(self, shutil.rmtree, self.storage, True)
        self.captured: dict[str, dict[str, Any]] = {}
        self.train_runs = 0

    def run_queue(self, job: GroupJob, on_result: Callable[[int, RunOutput], None],
                  progress: Any = None) -> dict[str, Any]:
        """Run every queue item; `on_result(index, output)` on the driver as each finishes. The engine summary.

        `progress` (progress.Progress) draws rank 0's ticks, polled from the queue with the finished runs;
        without it the workers' step loops print epoch lines."""
        import ray

        t0 = time.perf_counter()
        # A job that names its storage (job.py: <out>/engine/<token>) gets Train runs named from it, so a resumed
        # driver's groups restore their checkpoints; otherwise a fresh folder per queue.
        token = os.path.basename(job.storage.rstrip("/")) if job.storage else uuid.uuid4().hex[:8]
        job = replace(job, storage=job.storage or f"{self.storage.rstrip('/')}/{token}", capture=self.capture)
        if isinstance(job.base_state, dict):
            job.base_state = ray.put(job.base_state)
        queue = ray.remote(RunQueue).options(num_cpus=0).remote(
            [{"label": r.label, "role": r.role} for r in job.requests], job.base_state is not None, job.finished)
        job_ref = ray.put(job)
        groups = max(1, min(self.spec.groups, len(job.requests)))
        errors: dict[int, str] = {}
        threads = [threading.Thread(target=self._fit_group, args=(g, job, job_ref, queue, token, errors,
                                                                  progress is not None), daemon=True)
                   for g in range(groups)]
        for thread in threads:
            thread.start()
        delivered: set[int] = set()

        def deliver() -> None:
            if progress is not None:
                for tick in ray.get(queue.take_ticks.remote()):
                    progress.tick(tick)
            for index, record in ray.get(queue.take_finished.remote()):
                out = output_from_record(job.requests[index], record, read_result)
                out.starts = _starts(job.storage, out.label)
                out.restarts = max(0, out.starts - 1)
                self.captured[out.label] = out.captured
                delivered.add(index)
                on_result(index, out)

        while any(t.is_alive() for t in threads):
            deliver()
            time.sleep(POLL_S)
        for thread in threads:
            thread.join()
        deliver()
        failure = "; ".join(errors.values()) or "its worker group ended without running it"
        for index, request in enumerate(job.requests):  # runs a failed group never finished
            if index not in delivered:
                on_result(index, RunOutput(state=None, seconds=0.0, label=request.label,
                                           error={"error": "WorkerGroupFailed", "message": failure}))
        ray.kill(queue)
        self.train_runs += groups
        return {"executor": "ray", "worker_groups": groups, "train_runs": groups,
                "wall_seconds": time.perf_counter() - t0, "groups_shared_cpus": self._groups_share_cpus(groups)}

    def _fit_group(self, group: int, job: GroupJob, job_ref: Any, queue: Any, token: str,
                   errors: dict[int, str], ticks: bool = False) -> None:
        """One group: one TorchTrainer.fit over the queue (run in a driver thread, one per group)."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        config = {"job": job_ref, "queue": queue, "group": group, "strategy": self.spec.strategy,
                  "max_failures": self.spec.max_failures, "ticks": ticks,
                  "fail": armed_env(), "report_every_s": float(os.environ.get(REPORT_ENV) or DEFAULT_REPORT_EVERY_S)}
        resources = {"CPU": self.spec.cpus_per_worker, **({"GPU": 1} if self.spec.use_gpu else {})}
        trainer_class = local_trainer_class() if in_embedded_session() else TorchTrainer
        # A failing method restarts a multi-worker group once without using up the user's restarts
        # (RunQueue.start_group keeps the count of real losses).
        failures = self.spec.max_failures + len(job.requests)
        streaming = {}
        if job.data_mode == "streaming":  # workers stream their shard of each split the runs train on (Ray Data)
            from ray.train import DataConfig

            streaming = {"datasets": split_datasets(job), "dataset_config": DataConfig(datasets_to_split="all")}
        trainer = trainer_class(
            group_loop, train_loop_config=config, **streaming,
            scaling_config=ScalingConfig(num_workers=self.spec.num_workers, use_gpu=self.spec.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=f"group-{group}-{token}", storage_path=f"{job.storage.rstrip('/')}/train",
                                 logging_config=LoggingConfig(log_level="WARNING"),
                                 failure_config=FailureConfig(max_failures=failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)))
        try:
            trainer.fit()
        except Exception as err:  # TrainingFailedError after max_failures restarts, a controller error, a shutdown
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            errors[group] = f"worker group {group} failed: {first}"
            return  # its checkpoints stay: a driver stopped mid-run (SIGTERM, Ctrl-C) resumes from them
        if "://" not in job.storage:  # every run of the group is done: its checkpoints have no further use
            shutil.rmtree(os.path.join(job.storage, "train", f"group-{group}-{token}"), ignore_errors=True)

    def _groups_share_cpus(self, groups: int) -> bool:
        """Whether the groups had to share CPUs (their `seconds` then include waiting for a core)."""
        import ray

        needed = groups * self.spec.num_workers * self.spec.cpus_per_worker
        return groups > 1 and needed > ray.cluster_resources().get("CPU", 0)

    def run(self, request: RunRequest) -> RunOutput:
        """One request on its own (a queue of one, no evaluation): benchmarks, helper fits, tests."""
        outputs: list[RunOutput] = []
        t0 = time.perf_counter()
        base = request.initial_state
        job = GroupJob(requests=[replace(request, initial_state=None)], base_state=base, seed=self.seed)
        if base is None:  # nothing to start from: a fresh model (the request's own seeded init)
            job.requests[0].role = "original"
        self.run_queue(job, lambda index, out: outputs.append(out))
        out = outputs[0]
        if out.error is not None:
            _raise_run_error(out.error)
        out.wall_seconds = time.perf_counter() - t0
        return out

    def close(self) -> None:
        """Remove temporary storage and end the Ray session if this executor started it."""
        import ray

        if self._temporary_storage:
            shutil.rmtree(self.storage, ignore_errors=True)
        if self.owns_session and ray.is_initialized():
            ray.shutdown()


def _starts(storage: str, label: str) -> int:
    """How often rank 0 started a run (local storage; 1 where the records cannot be listed)."""
    if "://" in storage:
        return 1
    return max(1, sum(1 for r in AttemptLog.read(storage, "start") if r["label"] == label and r["rank"] == 0))


def _raise_run_error(error: dict[str, str]) -> None:
    from unlearn.errors import BadInput, DivergedError

    kinds = {"DivergedError": DivergedError, "BadInput": BadInput, "SpecError": BadInput}
    raise kinds.get(error["error"], RuntimeError)(error["message"])


# --- the function every worker of a group runs -----------------------------------------------------------
def group_loop(config: dict[str, Any]) -> None:
    """One worker: its share of every run its group takes from the job's queue."""
    import ray
    import ray.train
    import ray.train.torch

    from unlearn.comm import current_comm

    quiet_worker_logs()
    job: GroupJob = ray.get(config["job"])
    if any(family_wrap(r) is not None for r in job.requests):
        return_freed_memory()  # before the model is built: FSDP2 frees a gathered layer per unit and step
    context = ray.train.get_context()  # (1) rank and device from Ray Train
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    comm = current_comm()
    checkpoint = GroupCheckpoint.restore(ray.train.get_checkpoint(), rank)
    attempts = AttemptLog(job.storage)
    reporter = GroupReporter(job, config, rank, device, checkpoint.done, attempts)
    queue = config["queue"]
    env = WorkerEnv(rank=rank, world=world, group=config["group"], comm=comm, device=device,
                    max_failures=config["max_failures"],
                    wrap=Wrapper(config["strategy"], device, comm),  # (2) prepare_model inside
                    call=_call, on_epoch=reporter.epoch, on_done=reporter.done,  # (3) ray.train.report inside
                    resume_for=checkpoint.resume_for, resuming=checkpoint.running, record=attempts.write,
                    state_of=lambda model, module: full_state(model, module, config["strategy"]),
                    wrap_stream=lambda stream, label: maybe_fail(stream, config["fail"], label, rank, world),
                    # the driver draws progress from rank 0's ticks (sent without waiting for the queue's answer)
                    verbose=not config.get("ticks"),
                    progress=(lambda record: queue.tick.remote(record)) if config.get("ticks") else None,
                    data_shards={name: ray.train.get_dataset_shard(name) for name in streamed_splits(job)}
                    if job.data_mode == "streaming" else {})
    serve(job, queue, env)


def streamed_splits(job: GroupJob) -> list[str]:
    """The splits the job's runs train on, by name (`data: streaming` gives each its own Ray Dataset)."""
    names = {name for r in job.requests for name in (r.forget, r.retain) if isinstance(name, str)}
    return sorted(names - {"empty"})


def split_datasets(job: GroupJob) -> dict[str, Any]:
    """One streamed Ray Dataset per split: the training table's rows of that split.

    A split of its own per stream keeps every worker's passes in step: Ray Data deals each split equally
    (`streaming_split(equal=True)`), so all workers start each new pass over a split at the same step, as its
    epoch barrier needs; one table shared by the forget and retain streams would interleave two passes.
    """
    import ray.data

    quiet_ray_data()
    store = job.splits_recipe.dataset
    table = ray.data.read_parquet(str(store.path("train"))).select_columns(["row", "x"])
    datasets = {}
    for name in streamed_splits(job):
        keep = np.zeros(store.num_rows("train"), dtype=bool)
        keep[job.splits_recipe.split(name).index] = True
        datasets[name] = table.map_batches(_RowsOf(keep), batch_format="pyarrow")
    return datasets


class _RowsOf:
    """Ray Data batch filter: the rows whose id is marked in `keep` (a boolean mask over the part's rows)."""

    def __init__(self, keep: np.ndarray) -> None:
        self.keep = keep

    def __call__(self, batch: Any) -> Any:
        return batch.filter(self.keep[batch.column("row").to_numpy()])


def _call(queue: Any, name: str, *args: Any) -> Any:
    """A queue method: on the job's queue actor, or on a queue object held by this worker (Tune trials)."""
    if isinstance(queue, RunQueue):
        return getattr(queue, name)(*args)
    import ray

    return ray.get(getattr(queue, name).remote(*args))


class Wrapper:
    """The worker's model wrap: BatchNorm reduced over the workers, then DDP or FSDP via `prepare_model`.

    DDP does not sync buffers in forward passes (a forward is then collective-free, so whole-set passes
    may run a different number of batches per worker). When the workers' slices of a batch differ in
    size, each worker's loss is weighted by its slice's share (through its output's gradient). Ray's prepare_model
    allows FSDP on GPUs only; on CPU workers the engine wraps with torch's FullyShardedDataParallel (gloo).

    A model family with its own wrap (`ModelFamily.wrap`: causal LMs, `lm_sharding.wrap_causal_lm`) is wrapped by it
    instead: DDP (under LoRA only the adapters require grad, so only they are all-reduced), or FSDP2 for
    `ray.strategy: fsdp` (`fully_shard` per decoder layer, then the root; a peft LoRA model is sharded alike,
    frozen base weights included), whose checkpoints are each rank's shards (checkpoints.py). On GPUs FSDP2
    gathers parameters in bf16 and reduces gradients in fp32 (the weights stay in their dtype); DDP computes in
    the weights' dtype (the step loop has no autocast). No share weighting: a causal LM's output is not a
    tensor, so the classifier hook never applied to it; token losses are normalised by the global token count
    (`Context.row_mean`), while a per-sequence `.mean()` loss (ft, ga, retrain) equals one process's only where
    the workers' slices of each batch have equal rows (a global batch the worker count divides).
    """

    def __init__(self, strategy: str, device: torch.device, comm: Any) -> None:
        self.strategy, self.device, self.comm = strategy, device, comm

    def __call__(self, module: torch.nn.Module, request: RunRequest) -> torch.nn.Module:
        import ray.train.torch

        from unlearn.norm_sync import sync_norm_stats

        world = self.comm.world_size
        own = family_wrap(request)
        if own is not None:
            if world == 1:  # nothing to share or reduce
                return module.to(self.device)
            return own(module, self.strategy, self.device, self.device.type == "cuda")
        if world > 1:
            module = sync_norm_stats(module, self.comm)
        if self.strategy == "fsdp" and self.device.type == "cpu" and world > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel(module, use_orig_params=True, device_id=self.device)
        batch = request.params.batch_size
        if world > 1 and batch % world:
            _weight_by_share(module, world * share_fraction(batch, world, self.comm.rank))
        kwargs = {"forward_sync_buffers": False} if self.strategy == "ddp" else {"use_orig_params": True}
        return ray.train.torch.prepare_model(module, move_to_device=self.device, parallel_strategy=self.strategy,
                                             parallel_strategy_kwargs=kwargs)


def family_wrap(request: RunRequest) -> Callable[..., torch.nn.Module] | None:
    """The request's model family's own wrap for several workers (causal LMs: `lm_sharding`'s DDP or FSDP2), or None
    where the engine's DDP / FSDP serves."""
    from unlearn.models import MODELS

    return MODELS.lookup(request.model.name).wrap if request.model is not None else None


MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"
MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def return_freed_memory() -> bool:
    """Have glibc serve blocks of 1 MiB and more by mmap from now on, so that freed ones go back to the system.

    glibc's threshold for mmap rises (up to 32 MiB) each time an mmap-ed block is freed, after which blocks that
    size come from the heap and stay resident once freed; FSDP allocates and frees a gathered layer per unit and
    step, so a worker's resident memory grew by layers it had already freed (benchmarks/results/llm-memory.md,
    benchmarks/llm_memory.py). `mallopt(M_MMAP_THRESHOLD)` is what MALLOC_MMAP_THRESHOLD_ sets at process start
    (a fixed threshold, no longer raised), applied here because Ray starts the worker process before the engine
    runs. A MALLOC_MMAP_THRESHOLD_ set by the user is left as it is. False where it was not applied (set by the
    user, not glibc)."""
    if os.environ.get(MMAP_THRESHOLD_ENV):
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to set
        return False
    if applied:  # the worker's own subprocesses start with the same setting
        os.environ[MMAP_THRESHOLD_ENV] = str(MMAP_THRESHOLD)
    return applied


def _weight_by_share(module: torch.nn.Module, scale: float) -> None:
    """Scale every gradient that flows back into the model's output by N · share: DDP's average is then the
    whole batch's mean, also through BatchNorm statistics reduced over the workers (a gradient-side scale
    would miss those)."""
    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: grad * scale)

    module.register_forward_hook(hook)


class GroupReporter:
    """`ray.train.report` with a group checkpoint: per epoch (at most every `report_every_s`) and after each run.

    Every rank reports (a report is a barrier); rank 0 writes the checkpoint (under FSDP each rank adds its
    optimizer shard; under FSDP2 each rank writes its shards of the model and optimizer, and rank 0 the rest) and
    decides whether an epoch is reported, broadcasting it so that all agree. Ray Train copies every rank's folder
    into the one checkpoint (the ranks' files have distinct names) and registers it once every rank has reported.
    In a Tune trial (`job.epoch_metrics`) the due reports carry the trial's evaluation for the scheduler.
    """

    def __init__(self, job: GroupJob, config: dict[str, Any], rank: int, device: torch.device,
                 done: list[str], attempts: AttemptLog) -> None:
        self.job, self.rank, self.device, self.attempts = job, rank, device, attempts
        self.group = config["group"]
        self.strategy, self.every_s = config["strategy"], float(config["report_every_s"])
        self.done_labels = list(done)
        self.last = time.monotonic()
        self.last_metrics: dict[str, Any] = {}

    def epoch(self, summary: Any, ctx: Any, method: Any, request: RunRequest, evaluator: Any) -> None:
        trial = self.job.epoch_metrics
        final = summary.step == summary.total_steps
        if trial is not None:
            if not trial.due(summary):
                return
            self.last_metrics = trial.metrics(evaluator, ctx, summary) or {}
        else:
            if final:  # the report after the run covers it
                return
            due = torch.tensor([float(time.monotonic() - self.last >= self.every_s)], device=self.device)
            if not ctx.comm.broadcast(due, src=0).item():
                return
        self.last = time.monotonic()
        # FSDP2 (causal LMs): no full state, each rank writes its own shards (write_checkpoint); FSDP1: a collective
        model_state = None if is_fully_sharded(ctx.model) else \
            full_state(ctx.model, ctx.module, self.strategy) if self.rank == 0 or self.strategy == "fsdp" else None
        metrics = {"run": request.label, "epoch": summary.epoch, "step": summary.step,
                   **{f"loss.{k}": v for k, v in summary.losses.items()}, **self.last_metrics}
        progress = {"done": self.done_labels, "running": request.label, "step": summary.step}
        self._report(metrics, progress, (model_state, ctx, method, summary.step))
        if self.rank == 0:  # the record says a checkpoint of this step was handed to Ray Train
            self.attempts.write({"event": "checkpoint", "label": request.label, "group": self.group, "rank": 0,
                                 "pid": os.getpid(), "step": summary.step, "time": time.time(),
                                 "sharded": is_fully_sharded(ctx.model)})

    def done(self, request: RunRequest) -> None:
        self.done_labels.append(request.label)
        self._report({"run": request.label, "runs_done": len(self.done_labels), **self.last_metrics},
                     {"done": self.done_labels, "running": None, "step": 0}, None)

    def _staging(self) -> str | None:
        """Where a checkpoint is put together before `ray.train.report` copies it to storage: a folder in the job's
        own storage when that is a local path, so the one a worker killed inside `report` leaves (a Tune trial
        stopped by ASHA or ended, a stopped job) stays in the job's folder, not in the node's temp dir; else None."""
        storage = self.job.storage or ""
        if "://" in storage or not os.path.isabs(storage):
            return None
        folder = os.path.join(storage, "staging")
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError:
            return None
        return folder

    def _report(self, metrics: dict[str, Any], progress: dict[str, Any], running: Any) -> None:
        import ray.train
        from ray.train import Checkpoint

        with tempfile.TemporaryDirectory(prefix="unlearn-ckpt-", dir=self._staging(),
                                         ignore_cleanup_errors=True) as folder:
            wrote = write_checkpoint(folder, self.rank, self.strategy, progress, running)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if wrote else None)
