"""The Ray Train engine: every method run (original training and retrain included) as one TorchTrainer.

`RayExecutor.run(request)` is the executor contract of execution.py on Ray:

- The forget and retain splits go to the trainer as two `ray.data` datasets built from pyarrow tables;
  each worker reads its shard with `ray.train.get_dataset_shard` and materialises it once in memory
  (`ShardStream`), then draws batches from it the way `loop.ArrayStream` does.
- The model is wrapped by `ray.train.torch.prepare_model` (DDP, or FSDP with `ray.strategy: fsdp`), so
  every step's gradients are averaged over the workers; `ctx.comm` is `TorchDistComm`, so whole-set
  sums (Fisher, TARF scores and threshold, SFR-on normalisers) run over all shards.
- Every worker calls `ray.train.report` per epoch with a checkpoint (rank 0 writes it): model, optimizer,
  scheduler, the method's own state and the step. Reports are spaced at least UNLEARN_REPORT_EVERY_S
  seconds (default 5) apart, the last epoch always reported: Ray Train takes a new report only after its
  controller has collected the previous one, so a report per short epoch would stall the loop.
  `FailureConfig(max_failures)` restarts a failed worker group, which resumes from
  `ray.train.get_checkpoint()` and continues the same data order.
- Rank 0 returns the final weights, the per-step losses and the loop's own seconds as the training
  function's return value (`Result.return_value`); the driver turns them into a `RunOutput`, and the job
  logs the per-step losses to MLflow (`tracker.history`), so workers need no access to MLflow.

How rows are dealt to workers (`plan_shards`): the split, in a seeded order, is cut into chunks of the
method's global batch size B and chunk k goes to worker k mod N. Two consequences:

1. The union of the shards is exactly the split, without duplicates, and a whole-set pass
   (`one_pass`, what `setup` uses for Fisher sums, scores and thresholds) yields the very same batches
   of B rows on N workers as on one. Batch-level statistics (SFR-on's Fisher is a mean of squared batch
   gradients) are therefore identical for any worker count, not only per-sample ones. Ray Data's own
   `streaming_split(equal=True)` would drop rows to equalise shards and deal blocks to whichever worker
   asks first, so each worker's rows are one block and `PlannedSplit` hands block r to worker r.
2. A training step draws ceil(B / N) rows per worker (the global batch is B, as in loop.py). A split too
   small for every worker to own that many rows (fewer than about N·B rows, e.g. a forget set smaller
   than the batch or than the worker count) is *replicated*: every worker gets all of its rows for the
   step stream (with a worker-specific shuffle), while `one_pass` still covers only the worker's own
   chunks. Replication rather than resampling a worker's few rows keeps each global batch an unbiased
   sample of the split, costs at most N² · B rows, and guarantees every worker takes every step (DDP
   deadlocks when one worker skips a step).

One Ray session serves every run of a job (`connect`: `ray.init` once). Trainers start lean: no
preemption watcher, no Train metrics, 0.2 s controller polls (Ray's default is 2 s), and in the embedded
local session no placement-group cleaner; checkpoints go to a temporary local folder unless
UNLEARN_RAY_STORAGE names shared storage (as multi-node clusters need). What remains of a run's fixed cost
is Ray's: a controller and N worker processes started per run, and DDP's first-use imports.

Test-only failure injection: UNLEARN_FAIL_AT_STEP=<global step> makes one worker (UNLEARN_FAIL_RANK,
default the last) exit its process at that step, once (UNLEARN_FAIL_MARKER names the file that records
it), UNLEARN_FAIL_DELAY_S seconds (default 5) after drawing the step's batch, so that the epoch report
before it has been collected: a worker that dies right after a report may restart from the one before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
import weakref
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from unlearn.errors import BadInput, DivergedError
from unlearn.execution import RunOutput, RunRequest
from unlearn.methods.base import Batch
from unlearn.spec import RaySpec

DATASETS = ("forget", "retain")
FAIL_ENV = ("UNLEARN_FAIL_AT_STEP", "UNLEARN_FAIL_MARKER", "UNLEARN_FAIL_RANK", "UNLEARN_FAIL_DELAY_S")
STORAGE_ENV = "UNLEARN_RAY_STORAGE"
REPORT_ENV = "UNLEARN_REPORT_EVERY_S"
DEFAULT_REPORT_EVERY_S = 5.0
PROBE_TIMEOUT_S = 5.0
# Ray Train knobs that cut the fixed cost of a run; set only where the user has not set them.
LEAN_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor less per run; preemption is a cloud-spot feature
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Prometheus metrics callbacks
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # controller polls (default 2 s): reports register, fit returns sooner
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # rank 0's progress lines reach the driver once, not twice
}
CHECKPOINT_FILE = "state.pt"


# --- how rows are dealt to workers ------------------------------------------------------------------
@dataclasses.dataclass
class ShardPlan:
    """One worker's rows of a split: `rows` (positions in the split) for its step stream, `own` marks
    the rows its whole-set pass covers (all of them unless the split is replicated)."""

    rows: np.ndarray
    own: np.ndarray


def plan_shards(n: int, batch_size: int, world: int, seed: int) -> list[ShardPlan]:
    """Deal a split of n rows to `world` workers in whole global batches (see the module docstring)."""
    order = np.random.default_rng(seed).permutation(n) if n else np.arange(0)
    owner = (np.arange(n) // batch_size) % world
    per_worker = max(1, math.ceil(batch_size / world))
    replicate = n > 0 and any(int((owner == r).sum()) < per_worker for r in range(world))
    if replicate:
        return [ShardPlan(order, owner == r) for r in range(world)]
    return [ShardPlan(order[owner == r], np.ones(int((owner == r).sum()), dtype=bool)) for r in range(world)]


def shard_tables(x: np.ndarray, y: np.ndarray, index: np.ndarray, plans: list[ShardPlan]) -> list[pa.Table]:
    """One pyarrow table per worker: its planned rows (images flattened), whether it owns them, their order."""
    return [_rows_table(x, y, index, p) for p in plans]


def _rows_table(x: np.ndarray, y: np.ndarray, index: np.ndarray, plan: ShardPlan) -> pa.Table:
    rows = plan.rows
    width = int(np.prod(x.shape[1:]))
    flat = np.ascontiguousarray(x[rows]).reshape(-1)
    return pa.table({
        "x": pa.FixedSizeListArray.from_arrays(pa.array(flat), width),
        "y": pa.array(np.asarray(y)[rows].astype(np.int64)),
        "index": pa.array(np.asarray(index)[rows].astype(np.int64)),
        "own": pa.array(plan.own.astype(bool)),
        "pos": pa.array(np.arange(len(rows), dtype=np.int64)),
    })


def _planned_split_class():
    """`PlannedSplit`, defined on first use so importing this module does not import Ray Train."""
    from ray.train import DataConfig

    class PlannedSplit(DataConfig):
        """Worker r reads block r of each dataset (its `shard_tables` table): the plan made by `plan_shards`.

        Ray Data's default `streaming_split(equal=True)` would drop rows to equalise the shards and deal
        blocks to whichever worker asks first; splitting a materialised dataset by blocks runs no task.
        """

        def __init__(self, rows_per_worker: dict[str, list[int]]) -> None:
            super().__init__(datasets_to_split="all", enable_shard_locality=False)
            self.rows_per_worker = rows_per_worker

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            out: list[dict[str, Any]] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                expected = self.rows_per_worker[name]
                if len(expected) != world_size:
                    raise ValueError(f"dataset {name!r} was planned for {len(expected)} workers, not {world_size}")
                pieces = ds.split(world_size)
                if [p.count() for p in pieces] != expected:  # blocks were merged or split: cut by row counts
                    pieces = ds.split_at_indices(np.cumsum(expected)[:-1].tolist())
                for rank, piece in enumerate(pieces):
                    out[rank][name] = piece.iterator()
            return out

    return PlannedSplit


# --- a worker's view of one split -------------------------------------------------------------------
class ShardStream:
    """loop.Stream over one worker's rows, held in memory (`batches`: ceil(B/N) rows per step from all its
    rows, reshuffled every pass; `one_pass`: its own rows once, in chunks of the global batch B).

    With N = 1 it draws exactly what `loop.ArrayStream` draws for the same seed, so a one-worker Ray run
    reproduces an in-process run.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, own: torch.Tensor, *, size: int,
                 batch_size: int, world: int, rank: int, seed: int, device: torch.device | str = "cpu") -> None:
        self.size = size  # rows in the whole split (all workers)
        self.batch_size = max(1, math.ceil(batch_size / world))
        self.pass_batch = batch_size
        self.x, self.y, self.index = x, y, index
        self.own = torch.nonzero(own, as_tuple=False).flatten()
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.start_step = 0  # batches already drawn before a resume: skipped so the data order continues

    @classmethod
    def from_dataset_shard(cls, name: str, input_shape: Sequence[int], **kwargs: Any) -> "ShardStream":
        """Materialise this worker's `ray.train.get_dataset_shard(name)` once."""
        import ray.train

        shard = ray.train.get_dataset_shard(name)
        parts = [b for b in shard.iter_batches(batch_size=None, batch_format="pyarrow") if b.num_rows]
        return cls.from_table(pa.concat_tables(parts) if parts else None, input_shape, **kwargs)

    @classmethod
    def from_table(cls, table: pa.Table | None, input_shape: Sequence[int], **kwargs: Any) -> "ShardStream":
        """A worker's rows from its `shard_tables` table (in any block order: `pos` restores the plan's)."""
        if table is None or table.num_rows == 0:
            return cls(torch.zeros((0, *input_shape)), torch.zeros(0, dtype=torch.long),
                       torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool), **kwargs)
        table = table.sort_by("pos")
        n = table.num_rows
        x = table.column("x").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(n, *input_shape)
        return cls(torch.from_numpy(np.array(x, copy=True)),
                   torch.from_numpy(table.column("y").to_numpy().astype(np.int64)),
                   torch.from_numpy(table.column("index").to_numpy().astype(np.int64)),
                   torch.from_numpy(table.column("own").to_numpy(zero_copy_only=False).astype(bool)), **kwargs)

    def _batch(self, rows: torch.Tensor) -> Batch:
        return Batch(self.x[rows].to(self.device), self.y[rows].to(self.device), self.index[rows].to(self.device))

    def batches(self) -> Iterator[Batch]:
        n = len(self.y)
        if n == 0:
            return
        gen = torch.Generator().manual_seed(self.seed * 1000 + self.rank)
        pending = torch.empty(0, dtype=torch.long)
        drawn = 0
        while True:
            while len(pending) < self.batch_size:  # wrap into the next shuffled pass: every batch is full
                pending = torch.cat([pending, torch.randperm(n, generator=gen)])
            rows, pending = pending[: self.batch_size], pending[self.batch_size:]
            drawn += 1
            if drawn > self.start_step:
                yield self._batch(rows)

    def one_pass(self) -> Iterator[Batch]:
        for start in range(0, len(self.own), self.pass_batch):
            yield self._batch(self.own[start:start + self.pass_batch])


class _FailAt:
    """Test hook: wraps a stream and kills this worker process at a given global step, once."""

    def __init__(self, stream: ShardStream, step: int, marker: str, delay_s: float) -> None:
        self.stream, self.step, self.marker, self.delay_s = stream, step, marker, delay_s
        self.size, self.one_pass = stream.size, stream.one_pass

    def batches(self) -> Iterator[Batch]:
        for number, batch in enumerate(self.stream.batches(), start=self.stream.start_step):
            if number == self.step and not os.path.exists(self.marker):
                Path(self.marker).write_text(f"worker killed at step {number}\n")
                print(f"  [engine] injected failure: worker exits at step {number}", file=sys.stderr, flush=True)
                time.sleep(self.delay_s)
                os._exit(1)
            yield batch


# --- checkpoints --------------------------------------------------------------------------------------
def _full_state(model: torch.nn.Module, module: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """CPU copy of the unwrapped model's weights (under FSDP a collective: every rank must call it)."""
    if strategy == "fsdp" and _is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            state = model.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if state else None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


def _save_checkpoint(folder: str, rank: int, strategy: str, model_state: dict | None, ctx: Any, method: Any,
                     step: int) -> bool:
    """Write this rank's part of a checkpoint into `folder`; False when the rank has nothing to write."""
    sharded_optimizer = strategy == "fsdp" and _is_fsdp(ctx.model)
    if sharded_optimizer:  # FSDP: each rank holds its optimizer shard
        torch.save(ctx.optimizer.state_dict(), os.path.join(folder, f"optimizer-{rank}.pt"))
    if rank != 0:
        return sharded_optimizer
    torch.save({"model": model_state, "optimizer": None if sharded_optimizer else ctx.optimizer.state_dict(),
                "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
                "method": method.state_dict(), "step": step},
               os.path.join(folder, CHECKPOINT_FILE))
    return True


def _load_checkpoint(checkpoint: Any, rank: int) -> dict[str, Any]:
    """The resume dict `execution.execute` takes, from a reported checkpoint."""
    with checkpoint.as_directory() as folder:
        state = torch.load(os.path.join(folder, CHECKPOINT_FILE), map_location="cpu", weights_only=False)
        if state["optimizer"] is None:
            state["optimizer"] = torch.load(os.path.join(folder, f"optimizer-{rank}.pt"), map_location="cpu",
                                            weights_only=False)
    return state


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


# --- the training function every worker runs -------------------------------------------------------
def _train_worker(config: dict[str, Any]) -> bytes | None:
    """One worker: read its shards, resume if a checkpoint exists, run the step loop, report per epoch.

    Rank 0 returns the run's result (`_pack`); the other ranks return None.
    """
    import ray
    import ray.train
    import ray.train.torch

    from unlearn.comm import current_comm
    from unlearn.execution import execute

    started = time.time()
    _quiet_worker_logs()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    known_error = _read_error(config["run_dir"])
    if known_error is not None:  # an earlier attempt hit an error that no restart fixes: end now, the same way
        return _pack(known_error) if rank == 0 else None
    request: RunRequest = config["request"]
    if config["initial_state"] is not None:
        request = dataclasses.replace(request, initial_state=ray.get(config["initial_state"]))
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    resume = _load_checkpoint(checkpoint, rank) if checkpoint is not None else None
    start_step = int(resume["step"]) if resume else 0
    restarts = _count_attempt(config["run_dir"]) if rank == 0 else 0
    streams = [_worker_stream(config, name, k, request, rank, world, device, start_step)
               for k, name in enumerate(DATASETS)]
    data_ready = time.time()
    wrapper = _Wrapper(config["strategy"], device, world)
    reporter = _EpochReporter(config, rank, device)
    try:
        module, result = execute(request, *streams, comm=current_comm(), device=device, wrap=wrapper,
                                 on_epoch=reporter, resume=resume, verbose=rank == 0)
    except (DivergedError, BadInput) as err:  # deterministic: a restart would fail the same way
        error = {"error": type(err).__name__, "message": str(err)}
        if world == 1:
            return _pack(error)
        _write_error(config["run_dir"], error)  # the others may be waiting in a collective: fail the group,
        raise  # and the restarted group ends at once with this error
    loop_end = time.time()
    strategy = config["strategy"]
    state = _full_state(wrapper.model or module, module, strategy) if rank == 0 or strategy == "fsdp" else None
    if rank != 0:
        return None
    captured = {name: _to_cpu(getattr(reporter.method, name)) for name in config["capture"]
                if hasattr(reporter.method, name)}
    timings = {"worker_start": started, "data_ready": data_ready, "loop_end": loop_end, "loop_s": result.seconds}
    return _pack({"state": state, "history": result.history, "seconds": result.seconds, "timings": timings,
                  "resumed_from_step": start_step, "restarts": restarts, "captured": captured})


def _worker_stream(config: dict[str, Any], name: str, k: int, request: RunRequest, rank: int, world: int,
                   device: torch.device, start_step: int) -> Any:
    """This worker's stream of split `name` (with the test-only failure hook when it is armed for this rank)."""
    stream = ShardStream.from_dataset_shard(name, request.input_shape, size=config["sizes"][name],
                                            batch_size=config["batch_size"], world=world, rank=rank,
                                            seed=request.seed + k, device=device)
    stream.start_step = start_step
    fail = config["fail"]
    if fail.get("UNLEARN_FAIL_AT_STEP") and rank == int(fail.get("UNLEARN_FAIL_RANK") or world - 1):
        marker = fail.get("UNLEARN_FAIL_MARKER") or os.path.join(tempfile.gettempdir(), "unlearn-fail-once")
        delay_s = float(fail.get("UNLEARN_FAIL_DELAY_S") or 5.0)
        return _FailAt(stream, int(fail["UNLEARN_FAIL_AT_STEP"]), marker, delay_s)
    return stream


class _Wrapper:
    """`execute`'s wrap hook: DDP or FSDP through `ray.train.torch.prepare_model`; remembers the wrapped model.

    DDP does not sync buffers in forward passes (a forward is then collective-free, so whole-set passes
    may run a different number of batches per worker). Ray's prepare_model allows FSDP on GPUs only; on
    CPU workers the engine wraps with torch's FullyShardedDataParallel itself (gloo).
    """

    def __init__(self, strategy: str, device: torch.device, world: int) -> None:
        self.strategy, self.device, self.world = strategy, device, world
        self.model: torch.nn.Module | None = None

    def __call__(self, module: torch.nn.Module) -> torch.nn.Module:
        import ray.train.torch

        if self.strategy == "fsdp" and self.device.type == "cpu" and self.world > 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            self.model = FullyShardedDataParallel(module, use_orig_params=True, device_id=self.device)
        else:
            kwargs = {"forward_sync_buffers": False} if self.strategy == "ddp" else {"use_orig_params": True}
            self.model = ray.train.torch.prepare_model(module, move_to_device=self.device,
                                                       parallel_strategy=self.strategy, parallel_strategy_kwargs=kwargs)
        return self.model


class _EpochReporter:
    """`execute`'s on_epoch hook: `ray.train.report` with a checkpoint, at most every `report_every_s` seconds.

    Every rank reports (a report is a barrier); rank 0 writes the checkpoint (under FSDP each rank adds
    its optimizer shard). Rank 0 decides whether an epoch is reported and broadcasts it, so all agree.
    """

    def __init__(self, config: dict[str, Any], rank: int, device: torch.device) -> None:
        self.strategy, self.rank, self.device = config["strategy"], rank, device
        self.every_s = float(config["report_every_s"])
        self.last = time.monotonic()
        self.method: Any = None  # the run's method, for `capture`

    def __call__(self, summary: Any, ctx: Any, method: Any) -> None:
        import ray.train
        from ray.train import Checkpoint

        self.method = method
        final = summary.step == summary.total_steps
        due = torch.tensor([float(final or time.monotonic() - self.last >= self.every_s)], device=self.device)
        if not ctx.comm.broadcast(due, src=0).item():
            return
        self.last = time.monotonic()
        collective = self.strategy == "fsdp"
        model_state = _full_state(ctx.model, ctx.module, self.strategy) if self.rank == 0 or collective else None
        metrics = {"epoch": summary.epoch, "step": summary.step, "total_steps": summary.total_steps,
                   "seconds": summary.seconds, **{f"loss.{k}": v for k, v in summary.losses.items()}}
        with tempfile.TemporaryDirectory(prefix="unlearn-ckpt-", ignore_cleanup_errors=True) as folder:
            wrote = _save_checkpoint(folder, self.rank, self.strategy, model_state, ctx, method, summary.step)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder) if wrote else None)


def _pack(payload: dict[str, Any]) -> bytes:
    """Rank 0's result as torch-serialised bytes (Ray Train refuses tensors in a return value)."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def _unpack(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)


def _quiet_worker_logs() -> None:
    """Keep rank 0's progress lines readable: no INFO line per report, no Ray Data notice per dataset."""
    from ray.train.v2._internal.execution import context as train_context

    getattr(train_context, "logger", logging.getLogger("ray.train")).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _storage(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path) of a storage location: a local path, s3://, gs://, ..."""
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _count_attempt(run_dir: str) -> int:
    """Record this attempt in the run's storage folder; the number of earlier attempts (= restarts)."""
    from pyarrow import fs as pafs

    filesystem, path = _storage(f"{run_dir}/unlearn-attempts")
    filesystem.create_dir(path, recursive=True)
    earlier = len(filesystem.get_file_info(pafs.FileSelector(path)))
    with filesystem.open_output_stream(f"{path}/{uuid.uuid4().hex}") as out:
        out.write(b"")
    return earlier


def _write_error(run_dir: str, error: dict[str, str]) -> None:
    filesystem, path = _storage(f"{run_dir}/unlearn-error.json")
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as out:
        out.write(json.dumps(error).encode())


def _read_error(run_dir: str) -> dict[str, str] | None:
    """The deterministic error an earlier attempt of this run recorded, if any."""
    from pyarrow import fs as pafs

    filesystem, path = _storage(f"{run_dir}/unlearn-error.json")
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return json.loads(stream.read().decode())


def _raise_run_error(error: dict[str, str]) -> None:
    raise (DivergedError if error["error"] == "DivergedError" else BadInput)(error["message"])


# --- connecting to Ray --------------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address, None for 'auto'/'local'; BadInput when malformed."""
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise BadInput(f"ray.address {address!r} is a dashboard (job submission) URL; give the cluster's "
                       "GCS address host:6379 or a Ray client address ray://host:10001")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"ray.address {address!r}: expected host:port, ray://host:port, 'auto' or null")
    return host.strip("[]"), int(port)


def _probe(address: str, target: tuple[str, int]) -> None:
    """Fail fast, with one line, unless a Ray cluster answers at `address` (ray.init would retry for long).

    A TCP connect first (refused, unreachable, silent: PROBE_TIMEOUT_S at most), then, for a GCS address,
    one GCS call with the same timeout: some networks accept any TCP connection through a proxy.
    """
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise BadInput(f"cannot reach Ray cluster at {address}: {err.strerror or err}") from None
    if address.startswith("ray://"):
        return
    from ray._raylet import GcsClient

    try:
        with _native_stderr_silenced():  # Ray's C++ client logs each failed attempt to stderr
            GcsClient(address=f"{socket.gethostbyname(target[0])}:{target[1]}").internal_kv_get(
                b"unlearn-probe", namespace=None, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # RpcError, timeouts: no GCS there, or one that wants a token
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "AuthToken" in first or "uthenticat" in first:
            raise BadInput(f"cannot connect to Ray cluster at {address}: it requires its authentication token "
                           "(export RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                           ) from None
        raise BadInput(f"cannot reach Ray cluster at {address}: no Ray GCS answers there ({first})") from None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect(spec: RaySpec) -> bool:
    """Join the spec's cluster, or RAY_ADDRESS's (set by `ray job submit`), or start Ray locally.

    True when this call started the session (the caller shuts it down). An address that does not answer
    becomes BadInput within about PROBE_TIMEOUT_S seconds instead of Ray's long connection retries.
    """
    import ray

    _lean_train_env()
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or None
    common = {"logging_level": "warning", "log_to_driver": True, "ignore_reinit_error": True}
    if address is None:  # embedded default: a fresh local instance, sized so Ray Data keeps a CPU beside the workers
        needed = math.ceil(spec.num_workers * spec.cpus_per_worker) + 1
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False, **common)
        _EMBEDDED_SESSIONS.add(ray.get_runtime_context().gcs_address)
        _quiet_ray_data()
        return True
    target = _host_port(address)
    if target is not None:
        _probe(address, target)
    try:
        ray.init(address=address, **common)
    except Exception as err:  # ConnectionError, RuntimeError: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"cannot reach Ray cluster at {address}: {first}") from None
    _quiet_ray_data()
    return True


_EMBEDDED_SESSIONS: set[str] = set()  # GCS addresses of the local sessions `connect` started


def _in_embedded_session() -> bool:
    """Whether the current Ray session is a local one started by `connect` (no dashboard, ends with the job)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _EMBEDDED_SESSIONS


def _lean_train_env() -> None:
    for key, value in LEAN_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def _quiet_ray_data() -> None:
    """No per-dataset progress bars in the job's output (the step loop prints its own progress)."""
    from ray.data import DataContext

    data = DataContext.get_current()
    data.enable_progress_bars = False
    data.enable_operator_progress_bars = False
    data.print_on_execution_start = False


# --- the executor -------------------------------------------------------------------------------------
class RayExecutor:
    """Runs each request as one Ray Train `TorchTrainer` (see the module docstring); one Ray session per executor.

    `capture` names method attributes (e.g. "mask", "threshold") that rank 0 returns at the end of a run;
    they land in `captured[request.label]` (tests compare them across worker counts).
    """

    def __init__(self, spec: RaySpec, seed: int = 0, *, capture: Sequence[str] = ()) -> None:
        self.spec, self.seed, self.capture = spec, seed, tuple(capture)
        self.owns_session = connect(spec)
        storage = os.environ.get(STORAGE_ENV)
        self._temporary_storage = storage is None
        self.storage = storage or tempfile.mkdtemp(prefix="unlearn-ray-")
        if self._temporary_storage:
            weakref.finalize(self, shutil.rmtree, self.storage, True)
        self.captured: dict[str, dict[str, Any]] = {}
        self.timings: dict[str, dict[str, float]] = {}

    def run(self, request: RunRequest) -> RunOutput:
        import ray
        import ray.data
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        from unlearn.methods import build as build_method

        t0 = time.perf_counter()
        world = self.spec.num_workers
        batch_size = build_method(request.method, request.params).params.batch_size
        datasets, rows_per_worker, sizes = {}, {}, {}
        for k, name in enumerate(DATASETS):
            split = getattr(request, name)
            plans = plan_shards(len(split), batch_size, world, seed=request.seed + k)
            datasets[name] = ray.data.from_arrow(shard_tables(split.x, split.y, split.index, plans))
            rows_per_worker[name] = [len(p.rows) for p in plans]
            sizes[name] = len(split)
        run_name = f"{request.label}-{uuid.uuid4().hex[:8]}"
        light = dataclasses.replace(request, initial_state=None, forget=_empty_like(request.forget),
                                    retain=_empty_like(request.retain))
        config = {
            "request": light, "initial_state": ray.put(request.initial_state) if request.initial_state else None,
            "sizes": sizes, "batch_size": batch_size, "strategy": self.spec.strategy, "capture": self.capture,
            "fail": {k: os.environ[k] for k in FAIL_ENV if os.environ.get(k)},
            "run_dir": f"{self.storage.rstrip('/')}/{run_name}",
            "report_every_s": float(os.environ.get(REPORT_ENV) or DEFAULT_REPORT_EVERY_S),
        }
        resources = {"CPU": self.spec.cpus_per_worker, **({"GPU": 1} if self.spec.use_gpu else {})}
        trainer = (_local_trainer_class() if _in_embedded_session() else TorchTrainer)(
            _train_worker, train_loop_config=config, datasets=datasets,
            dataset_config=_planned_split_class()(rows_per_worker),
            scaling_config=ScalingConfig(num_workers=world, use_gpu=self.spec.use_gpu, resources_per_worker=resources),
            run_config=RunConfig(name=run_name, storage_path=self.storage,
                                 logging_config=LoggingConfig(log_level="WARNING"),
                                 failure_config=FailureConfig(max_failures=self.spec.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1)))
        fit_start = time.time()
        try:
            result = trainer.fit()
        except Exception as err:  # TrainingFailedError after max_failures restarts, or a controller error
            known = _read_error(config["run_dir"])
            if known is not None:
                _raise_run_error(known)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RuntimeError(f"{request.label}: Ray Train run failed: {first}") from err
        finally:
            self._cleanup(run_name)
        if result.return_value is None:
            raise RuntimeError(f"{request.label}: Ray Train run ended without a result from rank 0")
        out = _unpack(result.return_value)
        if "error" in out:
            _raise_run_error(out)
        self.captured[request.label] = out["captured"]
        done = time.time()
        t = out["timings"]
        self.timings[request.label] = {  # where a run's wall-clock goes (seconds), for benchmarks/scaling.py
            "start": t["worker_start"] - fit_start, "data": t["data_ready"] - t["worker_start"],
            "setup_and_loop": t["loop_end"] - t["data_ready"], "loop": t["loop_s"], "end": done - t["loop_end"]}
        return RunOutput(state=out["state"], seconds=out["seconds"], history=out["history"],
                         wall_seconds=time.perf_counter() - t0, resumed_from_step=out["resumed_from_step"],
                         restarts=out["restarts"])

    def _cleanup(self, run_name: str) -> None:
        """Checkpoints serve restarts within a run only: remove the run's folder from local storage."""
        if "://" not in self.storage:
            shutil.rmtree(os.path.join(self.storage, run_name), ignore_errors=True)

    def close(self) -> None:
        """Remove temporary storage and end the Ray session if this executor started it."""
        import ray

        if self._temporary_storage:
            shutil.rmtree(self.storage, ignore_errors=True)
        if self.owns_session and ray.is_initialized():
            ray.shutdown()


def _local_trainer_class():
    """TorchTrainer without the PlacementGroupCleaner, for the local session this executor started.

    The cleaner (one more actor per run) frees placement groups of a controller that died, through the
    dashboard's state API, which the embedded local session does not start (it would only log warnings);
    there the session ends with the job anyway. Runs on a cluster keep it.
    """
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer

    class LocalTorchTrainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            return [cb for cb in callbacks if not isinstance(cb, PlacementGroupCleanerCallback)]

    return LocalTorchTrainer


def _empty_like(split: Any) -> Any:
    """The split without rows (same dtypes and image shape): the request travels light, data goes via Ray Data."""
    return dataclasses.replace(split, x=split.x[:0], y=split.y[:0], index=split.index[:0])
