"""Causal LMs on the Ray engine: `ray.strategy: fsdp` trains them under FSDP2 (each worker holds half of every
weight, gradient and optimizer state) with LoRA on the method runs, and checkpoints each rank's shards.

A tiny llama (2 layers, hidden 64) on a 30-entity facts set, on 2 gloo CPU workers: the FSDP run's final weights
and the workers' evaluation match one process (and DDP's), full training and LoRA alike (a LoRA run under FSDP2 is
evaluated through its sharded root after the merge); a worker killed mid-run comes back from its sharded checkpoint
and ends with the uninterrupted run's weights. Without Ray: a sharded checkpoint on remote storage outlives its
download, a resumed run's frozen original holds the starting weights, and LM workers fix glibc's mmap threshold.
"""

from __future__ import annotations

import contextlib
import ctypes.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

from unlearn.checkpoints import SHARDED_DIR, AttemptLog, GroupCheckpoint
from unlearn.engine import RayExecutor, return_freed_memory
from unlearn.execution import LocalExecutor, RunOutput
from unlearn.job import Prepared, build_queue, prepare
from unlearn.spec import JobSpec
from unlearn.worker import GroupJob

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

TOL = {"rtol": 1e-4, "atol": 1e-5}  # two workers differ from one process by the reduction order only


def _spec(cache: Path, strategy: str = "fsdp") -> JobSpec:
    """The original and retrain train every weight; ft and ga train LoRA adapters (merged back at the end)."""
    return JobSpec.model_validate({
        "name": "lm-engine", "dataset": {"name": "facts", "facts": {"num_entities": 30}},
        "model": {"name": "causal_lm", "config": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2},
                  "lora": {"r": 4, "dropout": 0.0}},
        "train": {"epochs": 2, "batch_size": 32},  # 41 steps for the original, 36 for retrain (18 per epoch)
        "forget": {"kind": "class", "fraction": 0.1},
        "methods": [{"name": "retrain"}, {"name": "ft", "params": {"steps": 8, "batch_size": 16}},
                    {"name": "ga", "params": {"steps": 8, "batch_size": 16}}],
        "ray": {"strategy": strategy, "num_workers": 2, "max_failures": 1},
        "tracking": {"enabled": False}, "cache_dir": str(cache)})


def _job(prep: Prepared, storage: Path | None = None) -> GroupJob:
    """The job's queue (the task evaluator built on the driver, run by every worker on its share)."""
    job, _ = build_queue(prep)
    job.storage = str(storage) if storage is not None else ""
    return job


def _run(executor: Any, job: GroupJob) -> dict[str, RunOutput]:
    outputs: dict[str, RunOutput] = {}
    executor.run_queue(job, lambda index, out: outputs.__setitem__(out.label, out))
    for label, out in outputs.items():
        assert out.error is None, (label, out.error)
    return outputs


def _assert_same_weights(got: dict[str, RunOutput], want: dict[str, RunOutput], **tol: float) -> None:
    assert set(got) == set(want) == {"original", "retrain", "ft", "ga"}
    for label, out in want.items():
        assert set(got[label].state) == set(out.state), label  # merged LoRA: the built model's keys
        for name, value in out.state.items():
            torch.testing.assert_close(got[label].state[name], value, **(tol or TOL),
                                       msg=lambda text, label=label, name=name: f"{label}: {name}: {text}")


def _assert_same_metrics(got: dict[str, RunOutput], want: dict[str, RunOutput]) -> None:
    """The workers' evaluation of each run (their shares gathered) against one process's."""
    for label, out in want.items():
        assert out.metrics and set(got[label].metrics) == set(out.metrics), label
        for key, value in out.metrics.items():
            if isinstance(value, float):
                assert got[label].metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-4, nan_ok=True), (label, key)


@pytest.fixture(scope="module")
def prep(tmp_path_factory) -> Prepared:
    return prepare(_spec(tmp_path_factory.mktemp("lm-cache")))


@pytest.fixture(scope="module")
def one_process(prep) -> dict[str, RunOutput]:
    return _run(LocalExecutor("cpu"), _job(prep))


@pytest.fixture(scope="module")
def fsdp_run(prep, ray_session, tmp_path_factory) -> dict[str, RunOutput]:
    return _run(RayExecutor(prep.spec.ray, seed=prep.spec.seed), _job(prep, tmp_path_factory.mktemp("fsdp")))


@pytest.mark.ray
def test_fsdp_on_two_workers_trains_full_and_lora_runs_as_one_process_does(one_process, fsdp_run):
    _assert_same_weights(fsdp_run, one_process)
    _assert_same_metrics(fsdp_run, one_process)
    lora_changed = any(not torch.equal(one_process["ft"].state[k], one_process["original"].state[k])
                       for k in one_process["ft"].state if "q_proj" in k)
    assert lora_changed  # the merged adapters moved the weights they sit on


@pytest.mark.ray
@pytest.mark.slow  # ~20 s more for the module (one more Train run); `make test-slow` runs it
def test_ddp_on_two_workers_matches_fsdp(prep, fsdp_run, ray_session, tmp_path):
    spec = _spec(Path(prep.spec.cache_dir), strategy="ddp")
    ddp = _run(RayExecutor(spec.ray, seed=spec.seed), _job(prep, tmp_path / "ddp"))
    _assert_same_weights(ddp, fsdp_run)
    _assert_same_metrics(ddp, fsdp_run)


@pytest.mark.ray
@pytest.mark.parametrize("label", ["retrain", pytest.param("ft", marks=pytest.mark.slow)])
def test_a_worker_killed_in_an_fsdp_run_resumes_from_its_sharded_checkpoint(label, prep, fsdp_run, ray_session,
                                                                             tmp_path, monkeypatch):
    """retrain: every weight trains (sharded weights and momentum); ft: LoRA adapters over sharded frozen weights.
    A checkpoint at every epoch's end; rank 1 exits at step 25 of retrain (18 steps an epoch: it resumes from step
    18), or at step 40 of ft lengthened to three epochs of 36 steps (it resumes from step 36)."""
    prep_run = prep
    if label == "ft":
        methods = [m if m.name != "ft" else m.model_copy(update={"params": {"epochs": 3, "batch_size": 16}})
                   for m in prep.spec.methods]
        prep_run = prepare(prep.spec.model_copy(update={"methods": methods}))
    fail_at = 25 if label == "retrain" else 40
    monkeypatch.setenv("UNLEARN_REPORT_EVERY_S", "0")  # a checkpoint at every epoch's end
    monkeypatch.setenv("UNLEARN_FAIL_AT_STEP", str(fail_at))
    monkeypatch.setenv("UNLEARN_FAIL_RUN", label)
    monkeypatch.setenv("UNLEARN_FAIL_MARKER", str(tmp_path / "failed-once"))
    monkeypatch.setenv("UNLEARN_FAIL_DELAY_S", "3")  # the report before it is registered by then
    storage = tmp_path / "storage"
    killed = _run(RayExecutor(prep.spec.ray, seed=prep.spec.seed), _job(prep_run, storage))
    assert (tmp_path / "failed-once").exists(), "the worker was never killed"

    starts = [r["step"] for r in AttemptLog.read(str(storage), "start") if r["label"] == label and r["rank"] == 0]
    assert len(starts) == 2 and starts[0] == 0 and 0 < starts[1] < fail_at, starts
    saved = [r for r in AttemptLog.read(str(storage), "checkpoint") if r["label"] == label]
    assert saved and all(r["sharded"] for r in saved), saved  # each rank wrote its shards, none a full state
    assert killed[label].starts == 2 and killed[label].resumed_from_step == starts[1]
    for other in {"original", "retrain", "ft", "ga"} - {label}:
        assert killed[other].starts == 1, other  # finished runs were not run again
    if label == "ft":  # the uninterrupted run of the same three epochs: in one process
        reference = _run(LocalExecutor("cpu"), _job(prep_run))
        _assert_same_weights(killed, reference)
    else:
        _assert_same_weights(killed, fsdp_run, rtol=1e-6, atol=1e-7)  # the same workers, the same order of sums


class _RemoteCheckpoint:
    """A checkpoint on remote storage as Ray hands it out: downloaded into a folder removed on leaving the block."""

    def __init__(self, files: Path) -> None:
        self.files, self.path = files, "bucket/run/checkpoint_000001"

    @contextlib.contextmanager
    def as_directory(self):
        folder = tempfile.mkdtemp()
        shutil.copytree(self.files, folder, dirs_exist_ok=True)
        try:
            yield folder
        finally:
            shutil.rmtree(folder)


def test_a_sharded_checkpoint_on_remote_storage_stays_readable_after_the_restore(tmp_path):
    files = tmp_path / "checkpoint"
    (files / SHARDED_DIR).mkdir(parents=True)
    (files / SHARDED_DIR / "__1_0.distcp").write_bytes(b"rank 1's shards")
    (files / "progress.json").write_text(json.dumps({"group": 0, "done": [], "running": "retrain", "step": 18}))
    torch.save({"model": None, "optimizer": None, "sharded": True, "scheduler": None, "method": {}, "step": 18},
               files / "state.pt")
    state = GroupCheckpoint.restore(_RemoteCheckpoint(files), rank=1).resume_for("retrain")
    assert state["step"] == 18 and state["model"] is None
    assert (Path(state["sharded"]) / "__1_0.distcp").read_bytes() == b"rank 1's shards"
    local = GroupCheckpoint.restore(_LocalCheckpoint(files), rank=1).resume_for("retrain")
    assert local["sharded"] == str(files / SHARDED_DIR)  # read in place: no copy


class _LocalCheckpoint:
    def __init__(self, files: Path) -> None:
        self.path = str(files)

    @contextlib.contextmanager
    def as_directory(self):
        yield self.path


@pytest.mark.skipif(not ctypes.util.find_library("c"), reason="no C library to ask")
def test_causal_lm_workers_return_freed_gathered_layers_to_the_system(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    applied = return_freed_memory()
    if applied:  # glibc: its mmap threshold is fixed at 1 MiB, and the worker's subprocesses inherit it
        assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(1 << 20)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")
    assert not return_freed_memory()  # the user's own setting stays



def test_a_resumed_full_model_run_compares_against_the_starting_weights_not_the_resumed_ones(prep, one_process):
    """A causal LM's frozen original is made after the wrap (`family.reference`): a resumed run's weights must go in
    after it, or DELETE/NPO would compare against the weights of their own last checkpoint."""
    from dataclasses import replace

    from unlearn import loop
    from unlearn.execution import execute, new_model
    from unlearn.job import request_for

    spec = prep.spec.model_copy(update={"model": prep.spec.model.model_copy(update={"lora": None})})
    entry = next(m for m in spec.methods if m.name == "ga")
    start = one_process["original"].state
    request = replace(request_for(replace(prep, spec=spec), entry, start), params={"steps": 2, "batch_size": 4})
    resumed = {k: v + 0.01 if v.is_floating_point() else v for k, v in start.items()}  # a checkpoint's weights
    optimizer = request.method_class(request.params).optimizer(new_model(request)).state_dict()
    streams = [loop.array_stream(s.x, s.y, 4, seed=k, index=s.index)
               for k, s in enumerate((request.forget, request.retain))]
    seen: dict = {}
    execute(request, *streams, verbose=False,
            resume={"model": resumed, "optimizer": optimizer, "scheduler": None, "method": {}, "step": 1},
            on_epoch=lambda summary, ctx, method: seen.setdefault("original", ctx.original.state_dict()))
    assert seen, "no epoch ended"
    for name, value in seen["original"].items():
        torch.testing.assert_close(value, start[name], rtol=0, atol=0, msg=name)
