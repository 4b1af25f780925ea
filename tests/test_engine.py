"""The engine: exact shares of every global batch, the job queue, worker groups, failures and restarts.

The share and queue tests run without Ray. The `ray` tests share one local Ray session (conftest.ray_session);
the `ray start --head` tests start their own head (after shutting the shared session down) and are `slow`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from gloo_workers import free_port
from mlflow.tracking import MlflowClient

from unlearn import cli, loop, spec as spec_mod
from unlearn.checkpoints import AttemptLog
from unlearn.data.scenarios import ArrayRows
from unlearn.engine import RayExecutor
from unlearn.execution import LocalExecutor, RunRequest
from unlearn.job import Prepared, prepare, request_for, run_job
from unlearn.methods import REGISTRY
from unlearn.shards import ShareStream, global_batches, share_of, split_order
from unlearn.spec import MethodSpec, RaySpec
from unlearn.training import original_model
from unlearn.run_queue import WAIT, RunQueue
from unlearn.worker import GroupJob

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- shares of global batches (no Ray) ------------------------------------------------------------------
def _streams(n: int, batch_size: int, world: int, seed: int = 0) -> list[ShareStream]:
    """Every worker's stream of an n-row split (x = row id), built the way workers build them."""
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    return [ShareStream(ArrayRows(x), np.arange(n), np.zeros(n, dtype=np.int64), batch_size=batch_size, world=world,
                        rank=r, seed=seed, steps=5) for r in range(world)]


@pytest.mark.parametrize("n", [1, 2, 5, 63, 64, 65, 137, 1210])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [3, 8, 64])
def test_every_step_the_workers_slices_make_up_the_one_process_batch(n, world, batch_size):
    one = _streams(n, batch_size, 1)[0].batches()
    workers = [s.batches() for s in _streams(n, batch_size, world)]
    for _ in range(7):
        expected = next(one).index.tolist()
        slices = [next(w).index.tolist() for w in workers]
        assert sum(slices, []) == expected  # the same rows, in the same order, for any worker count
        assert max(map(len, slices)) - min(map(len, slices)) <= 1


@pytest.mark.parametrize("n,batch_size", [(137, 64), (1210, 64), (300, 16), (40, 64), (5, 2)])
def test_whole_set_passes_cover_the_split_once_in_the_same_batches_on_any_worker_count(n, batch_size):
    """Batch-level statistics (SFR-on's Fisher: a mean of squared batch gradients) cannot depend on N."""
    def batches(world):
        return sorted(tuple(b.index.tolist()) for s in _streams(n, batch_size, world) for b in s.one_pass())

    one = batches(1)
    assert sorted(i for b in one for i in b) == list(range(n))
    assert batches(2) == one and batches(3) == one


def test_a_worker_reads_only_the_rows_its_slices_touch():
    n, batch = 1000, 64
    streams = _streams(n, batch, 2)
    held = [s.cache.rows_held for s in streams]
    assert held == [5 * 32, 5 * 32]  # 5 steps of a 32-row slice, within one pass: no row read twice


def test_the_array_stream_draws_what_a_one_worker_share_stream_over_storage_draws():
    n, batch = 137, 64
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(n, 2, 3)).astype(np.float32), rng.integers(0, 5, n)
    ours = ShareStream(ArrayRows(x), np.arange(n), y, batch_size=batch, seed=7, steps=5)
    theirs = loop.array_stream(x, y, batch, seed=7)
    take = lambda s: [*s.one_pass(), *[b for _, b in zip(range(5), s.batches())]]  # noqa: E731
    for a, b in zip(take(ours), take(theirs), strict=True):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)


def test_a_resumed_stream_continues_where_the_run_stopped():
    whole, resumed = _streams(200, 16, 2)[1], _streams(200, 16, 2)[1]
    resumed.start_step = 7
    assert torch.equal(next(resumed.batches()).index, [b for _, b in zip(range(8), whole.batches())][-1].index)


def test_global_batches_are_full_and_wrap_into_the_next_pass():
    batches = [b for _, b in zip(range(4), global_batches(10, 4, seed=0))]
    assert all(len(b) == 4 for b in batches)
    assert len(set(np.concatenate(batches[:2]).tolist())) == 8  # one pass before repeating a row
    assert len(share_of(np.arange(5), 2, 0)) == 3 and len(share_of(np.arange(5), 2, 1)) == 2
    assert sorted(split_order(10, 3).tolist()) == list(range(10))


# --- the queue (no Ray) -------------------------------------------------------------------------------------
def test_the_queue_waits_for_the_original_and_gives_a_restarted_group_its_own_run():
    queue = RunQueue([{"label": "original", "role": "original"}, {"label": "retrain", "role": "method"},
                      {"label": "ga", "role": "method"}], base_ready=False)
    assert queue.next(0) == 0  # group 0 trains the original ...
    assert queue.next(1) == WAIT  # ... while group 1 waits for it
    queue.set_base({"w": torch.zeros(1)})
    queue.done(0, {"path": "x"})
    assert queue.next(1) == 1 and queue.next(0) == 2
    assert queue.next(1) == 1  # group 1 restarted: it gets back the run it was doing
    queue.done(1, {"path": "y"})
    assert queue.next(1) is None and [i for i, _ in queue.take_finished()] == [0, 1]


def test_a_failed_run_does_not_use_up_the_groups_restarts_but_lost_workers_do():
    queue = RunQueue([{"label": "a", "role": "method"}, {"label": "b", "role": "method"}], base_ready=True)
    queue.start_group(0, max_failures=1)
    assert queue.next(0) == 0
    queue.failed(0, {"error": "DivergedError", "message": "nan"})
    queue.start_group(0, max_failures=1)  # restarted because a run failed: free
    assert queue.next(0) == 1
    queue.note_error(1, "RuntimeError: Connection reset by peer")
    queue.start_group(0, max_failures=1)  # one lost worker: allowed, the run goes on
    assert queue.next(0) == 1 and not queue.is_finished(1)
    queue.start_group(0, max_failures=1)  # a second: the run is recorded as failed, with the worker's error
    assert "Connection reset by peer" in queue.finished[1]["error"]["message"]
    assert queue.next(0) is None


# --- jobs --------------------------------------------------------------------------------------------------
@dataclass
class Digits:
    work: Path
    spec: spec_mod.JobSpec
    prep: Prepared
    state: dict[str, torch.Tensor]

    def request(self, method: str, **params) -> RunRequest:
        return request_for(self.prep, MethodSpec(name=method, params=params), self.state)


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Digits:
    """The quickstart's data and its original model (trained in process once, cached for the jobs below)."""
    work = tmp_path_factory.mktemp("engine")
    spec = spec_mod.load(ROOT / "jobs" / "quickstart.yaml", [f"cache_dir={work / 'cache'}", "ray.enabled=false",
                                                            "tracking.enabled=false"])
    prep = prepare(spec)
    state, _ = original_model(spec, prep.splits, prep.input_shape, LocalExecutor("cpu"), prep.task)
    return Digits(work, spec, prep, state)


def _job(digits: Digits, methods: list[dict], **ray) -> spec_mod.JobSpec:
    data = digits.spec.model_dump(mode="json")
    data.update(methods=methods, ray={**data["ray"], **ray})
    return spec_mod.validate(data)


def test_a_diverging_method_is_recorded_as_failed_while_the_others_finish_and_are_written(digits, tmp_path):
    data = _job(digits, [{"name": "ga", "params": {"steps": 300, "lr": 10.0}}, {"name": "ft", "params": {"steps": 10}}])
    data = data.model_copy(update={"tracking": data.tracking.model_copy(
        update={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})})
    (tmp_path / "job.yaml").write_text(spec_mod.dump(data))
    codes: list[int] = []
    cli.main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")], exit=codes.append)
    assert codes == [1]  # the job reports the failure in its exit code ...
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["failed"] == ["ga"]
    assert "forget_loss became nan" in results["methods"]["ga"]["error"]
    assert results["methods"]["ft"]["RA"] > 90  # ... after every other run finished and was written
    client = MlflowClient(results["mlflow"]["tracking_uri"])
    assert client.get_run(results["mlflow"]["runs"]["ga"]).info.status == "FAILED"
    assert client.get_run(results["mlflow"]["runs"]["ft"]).info.status == "FINISHED"


def _synthetic_cnn(tmp: Path) -> tuple[Prepared, dict[str, torch.Tensor]]:
    """A small BatchNorm cnn on the synthetic set, its original trained in process."""
    spec = spec_mod.validate({
        "name": "bn-equivalence", "dataset": {"name": "synthetic", "num_train": 480, "num_test": 120, "image_size": 16},
        "model": {"name": "cnn", "channels": [8, 16]}, "train": {"epochs": 2, "batch_size": 32},
        "forget": {"kind": "class", "classes": [5]}, "methods": [{"name": "ft"}],
        "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(tmp / "cache")})
    prep = prepare(spec)
    state, _ = original_model(spec, prep.splits, prep.input_shape, LocalExecutor("cpu"), prep.task)
    return prep, state


def _final_states(executor, prep: Prepared, state, requests) -> dict[str, dict[str, torch.Tensor]]:
    job = GroupJob(requests=requests, base_state=state, seed=prep.spec.seed)
    states: dict[str, dict[str, torch.Tensor]] = {}
    executor.run_queue(job, lambda index, out: states.__setitem__(out.label, out.state if out.error is None else out.error))
    return states


@pytest.mark.ray
def test_every_classification_method_takes_the_same_20_steps_on_two_workers_as_in_one_process(ray_session, tmp_path):
    prep, state = _synthetic_cnn(tmp_path)
    common = {"steps": 20, "batch_size": 32}
    methods = sorted(n for n, cls in REGISTRY.items() if "classification" in cls.tasks)
    own = {"iu": {"steps": 1}}  # IU is one influence step (twenty would diverge, in process too)
    requests = [request_for(prep, MethodSpec(name=name, params={**common, **own.get(name, {})}), None)
                for name in methods]
    requests.append(request_for(prep, MethodSpec(name="ft", label="ft-odd-batch", params={"steps": 20, "batch_size": 33}),
                                None))  # slices of 17 and 16 rows: share-weighted gradients
    torch.set_num_threads(1)
    one = _final_states(LocalExecutor("cpu"), prep, state, requests)
    two = _final_states(RayExecutor(RaySpec(num_workers=2)), prep, state, requests)
    assert set(two) == set(one) == {r.label for r in requests}
    for label, weights in one.items():
        assert isinstance(two[label], dict), (label, two[label])
        for name, value in weights.items():
            if label in TOP_K_MASKED:  # a weight at the mask's threshold may fall on either side of it
                close = torch.isclose(two[label][name], value, rtol=1e-4, atol=1e-5)
                assert close.float().mean() >= 0.99, f"{label}: {name}: {int((~close).sum())} of {close.numel()} differ"
                continue
            torch.testing.assert_close(two[label][name], value, rtol=1e-4, atol=1e-5,
                                       msg=lambda text, label=label, name=name: f"{label}: {name}: {text}")


# SalUn keeps the top half of |gradient| (one threshold over every weight): the two reductions of the same
# gradient differ in the last float bits, so a weight whose score ties the threshold can be kept by one and
# not the other (seen: 1 of 216 in one layer, 2e-5 apart after 20 steps); every other weight must match.
TOP_K_MASKED = {"salun"}


def _kill_after_checkpoints(storage_root: Path, label: str, checkpoints: int, stop: threading.Event) -> dict:
    """Once rank 0 has handed Ray Train `checkpoints` checkpoints of run `label`, SIGKILL its rank-1 worker."""
    while not stop.is_set():
        for folder in storage_root.glob("*/attempts"):
            records = AttemptLog.read(str(folder.parent))
            saved = [r for r in records if r["event"] == "checkpoint" and r["label"] == label]
            starts = [r for r in records if r["event"] == "start" and r["label"] == label and r["rank"] == 1]
            if len(saved) >= checkpoints and starts:
                time.sleep(1.0)  # the controller polls reports every 0.2 s: let it register the last one
                os.kill(starts[0]["pid"], signal.SIGKILL)
                return {"pid": starts[0]["pid"], "after_step": saved[-1]["step"]}
        time.sleep(0.1)
    return {}


@pytest.mark.ray
def test_a_worker_killed_in_the_third_method_resumes_it_and_the_job_matches_an_uninterrupted_run(
        ray_session, digits, tmp_path, monkeypatch):
    # GA at an lr that stays finite for 20 steps (its mlp default, 0.032, is set for ~7 and overflows by step 15)
    methods = [{"name": "ft", "params": {"steps": 20}}, {"name": "ga", "params": {"steps": 20, "lr": 0.005}},
               {"name": "ft", "label": "ft-long", "params": {"steps": 3000}}, {"name": "delete"}]
    reference = run_job(_job(digits, methods), tmp_path / "local")  # in process: the same steps, uninterrupted
    monkeypatch.setenv("UNLEARN_REPORT_EVERY_S", "1")  # a checkpoint about every second
    storage = tmp_path / "storage"
    spec = _job(digits, methods, enabled=True, num_workers=2, max_failures=1, storage=str(storage))
    stop = threading.Event()
    killed: dict = {}
    watcher = threading.Thread(target=lambda: killed.update(_kill_after_checkpoints(storage, "ft-long", 2, stop)))
    watcher.start()
    try:
        results = run_job(spec, tmp_path / "ray")
    finally:
        stop.set()
        watcher.join()
    assert killed, "the worker was never killed"
    records = [r for folder in storage.glob("*/attempts") for r in AttemptLog.read(str(folder.parent), "start")
               if r["rank"] == 0]
    starts = {label: [r["step"] for r in records if r["label"] == label] for label in ("original", "ft", "ga", "ft-long")}
    assert starts["ft"] == [0] and starts["ga"] == [0]  # finished methods were not run again
    assert len(starts["ft-long"]) == 2 and starts["ft-long"][0] == 0 and starts["ft-long"][1] > 0, starts  # resumed
    assert results["engine"]["runs"]["ft-long"]["starts"] == 2
    assert results["engine"]["train_runs"] == 1 and not results["failed"]
    for label in ("ft", "ga", "ft-long", "delete"):
        for key in ("FA", "RA", "TA", "MIA"):
            assert abs(results["methods"][label][key] - reference["methods"][label][key]) <= 0.5, (label, key)


@pytest.mark.ray
def test_the_quickstart_on_ray_agrees_with_the_in_process_run_in_one_train_run(ray_session, digits, tmp_path):
    # GA at an lr that stays finite for 30 steps (its mlp default, 0.032, is set for ~7 and overflows by step 15)
    methods = [{"name": "retrain"}, {"name": "ga", "params": {"steps": 30, "lr": 0.005}},
               {"name": "sfr_on", "params": {"steps": 40}}]
    local = run_job(_job(digits, methods), tmp_path / "local")
    ray_results = run_job(_job(digits, methods, enabled=True, num_workers=2), tmp_path / "ray")
    assert ray_results["engine"] | {"wall_seconds": 0, "runs": 0} == {
        "executor": "ray", "worker_groups": 1, "train_runs": 1, "wall_seconds": 0, "groups_shared_cpus": False, "runs": 0}
    for name, metrics in local["methods"].items():
        for key in ("FA", "RA", "TA", "MIA", "gap"):
            assert ray_results["methods"][name][key] == pytest.approx(metrics[key], abs=0.5), (name, key)


def _tuned(tmp: Path, digits: Digits, method: str, params: dict, capture: tuple[str, ...]) -> dict:
    """One-trial engine search of `method` at `params` (a one-value space): the trial's captured attributes."""
    from unlearn.tuning import run_tune
    from unlearn.worker import read_result

    data = digits.spec.model_dump(mode="json")
    space = {k: {"kind": "choice", "values": [v]} for k, v in params.items() if k in ("gamma", "beta_quantile")}
    fixed = {k: v for k, v in params.items() if k not in space}
    data.update(methods=[{"name": method, "params": fixed}], ray={"enabled": True, "num_workers": 2},
                tune={"space": space, "num_samples": 1, "metric": "proxy", "reports": 1, "scheduler": "fifo",
                      "search": "random"})
    out = tmp / f"tune-{method}"
    result = run_tune(spec_mod.validate(data), method=method, out_dir=out, capture=capture)
    [trial] = result["trials"]
    return read_result(str(next((out / "trials" / trial["trial_id"] / "results").glob("*.pt"))))["captured"]


@pytest.mark.ray
@pytest.mark.slow
def test_tune_on_ray_and_run_on_ray_compute_the_same_saliency_mask_and_tarf_threshold(ray_session, digits, tmp_path):
    n_forget = len(digits.prep.splits.forget)
    sfr = {"steps": 2, "gamma": 1.0}
    tarf = {"steps": 4, "batch_size": 2 * n_forget, "t1_epochs": 0.6, "beta_quantile": 0.1}
    executor = RayExecutor(RaySpec(num_workers=2), capture=("mask", "threshold", "tau"))
    request_sfr, request_tarf = digits.request("sfr_on", **sfr), digits.request("tarf", **tarf)
    job = GroupJob(requests=[request_sfr, request_tarf], base_state=digits.state)
    executor.run_queue(job, lambda index, out: None)
    tuned_mask = _tuned(tmp_path, digits, "sfr_on", sfr, ("mask",))["mask"]
    tuned_tarf = _tuned(tmp_path, digits, "tarf", tarf, ("threshold", "tau"))
    run_mask = executor.captured["sfr_on"]["mask"]
    assert tuned_mask.keys() == run_mask.keys()
    for name, mask in run_mask.items():
        assert torch.equal(tuned_mask[name], mask), name
    assert executor.captured["tarf"]["threshold"] == pytest.approx(tuned_tarf["threshold"], rel=1e-6)
    assert torch.equal(executor.captured["tarf"]["tau"], tuned_tarf["tau"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_tune_trial_survives_a_killed_worker(ray_session, digits, tmp_path, monkeypatch):
    from unlearn.tuning import run_tune

    monkeypatch.setenv("UNLEARN_FAIL_AT_STEP", "60")
    monkeypatch.setenv("UNLEARN_FAIL_MARKER", str(tmp_path / "failed-once"))
    monkeypatch.setenv("UNLEARN_FAIL_DELAY_S", "3")
    data = digits.spec.model_dump(mode="json")
    data.update(methods=[{"name": "ft", "params": {"steps": 150}}], ray={"enabled": True, "num_workers": 2},
                tune={"space": {"lr": {"kind": "choice", "values": [0.01]}}, "num_samples": 1, "metric": "proxy",
                      "reports": 5, "scheduler": "fifo", "search": "random"})
    result = run_tune(spec_mod.validate(data), method="ft", out_dir=tmp_path / "tune")
    assert (tmp_path / "failed-once").exists()  # the worker did die
    [trial] = result["trials"]
    assert trial["status"] == "completed" and trial["metrics"]["RA"] > 90
    records = AttemptLog.read(str(tmp_path / "tune" / "trials" / trial["trial_id"]), "start")
    assert sorted(r["step"] > 0 for r in records if r["rank"] == 0) == [False, True]  # resumed from a checkpoint


@pytest.mark.ray
@pytest.mark.slow
def test_two_worker_groups_on_a_started_head_overlap_and_match_one_group(digits, tmp_path):
    """`ray start --head --num-cpus 4`: two groups of two workers run methods at the same time."""
    gcs = free_port()
    with _started_head(tmp_path, [f"--port={gcs}", "--num-cpus=4", "--include-dashboard=false"]):
        _wait_for_gcs(gcs, timeout_s=90)
        # Runs long enough that the groups must overlap even on a loaded machine (at 150 steps, with three
        # other jobs on the 2 cores, one group's ft ended before the other group's first run began).
        methods = [{"name": "ft", "params": {"steps": 600}}, {"name": "ga", "params": {"steps": 30, "lr": 0.005}},
                   {"name": "delete"}, {"name": "tarf", "params": {"steps": 600}}]
        results = {}
        for groups in (1, 2):
            storage = tmp_path / f"storage-{groups}"
            spec = _job(digits, methods, enabled=True, num_workers=2, groups=groups, address=f"127.0.0.1:{gcs}",
                        storage=str(storage))
            env = {**os.environ, "RAY_AUTH_MODE": "token"}
            (tmp_path / f"job-{groups}.yaml").write_text(spec_mod.dump(spec))
            proc = subprocess.run([str(BIN / "unlearn"), "run", str(tmp_path / f"job-{groups}.yaml"), "--out",
                                   str(tmp_path / f"out-{groups}")], capture_output=True, text=True, timeout=500,
                                  env=env, cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr[-3000:]
            results[groups] = json.loads((tmp_path / f"out-{groups}" / "results.json").read_text())
            results[groups]["records"] = [r for f in storage.glob("*/attempts")
                                          for r in AttemptLog.read(str(f.parent), "start") if r["rank"] == 0]
        two = results[2]
        assert two["engine"]["worker_groups"] == 2 and two["engine"]["train_runs"] == 2
        assert {r["group"] for r in two["records"]} == {0, 1}
        spans = {}
        for label in ("ft", "ga", "delete", "tarf"):
            start = next(r["time"] for r in two["records"] if r["label"] == label)
            spans[label] = (start, start + two["methods"][label]["seconds"])
        # The queue also holds the original and the retrain; only the methods have `seconds` to span.
        by_group = {g: [r["label"] for r in two["records"] if r["group"] == g and r["label"] in spans] for g in (0, 1)}
        overlap = any(a[0] < b[1] and b[0] < a[1] for x in by_group[0] for y in by_group[1]
                      for a, b in [(spans[x], spans[y])])
        assert overlap, spans  # the groups ran methods at the same time
        for label in ("ft", "ga", "delete", "tarf"):
            for key in ("FA", "RA", "TA", "MIA"):
                assert two["methods"][label][key] == pytest.approx(results[1]["methods"][label][key], abs=1e-6)


def _wait_for_gcs(port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(3)  # the node registers shortly after the GCS answers
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@pytest.mark.ray
def test_an_unreachable_address_fails_with_one_line_and_exit_2_quickly(tmp_path):
    started = time.monotonic()
    proc = subprocess.run([str(BIN / "unlearn"), "run", str(ROOT / "jobs" / "quickstart.yaml"),
                           "--set", "ray.enabled=true", "--set", "ray.address=198.51.100.7:6379",
                           "--set", f"cache_dir={tmp_path / 'cache'}", "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - started < 30
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: cannot reach Ray cluster at 198.51.100.7:6379"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_submitted_to_a_started_head_writes_its_results(digits, tmp_path):
    """`ray start --head` + `ray job submit -- unlearn run job.yaml`: the engine joins the head via RAY_ADDRESS
    (and, run from outside with `--set ray.address=host:port`, via the spec).

    The head gets its own temp dir (so its address file never redirects other `ray.init()` calls on this
    machine) and its own process group, which teardown ends (`ray stop` would end every Ray on the machine).
    """
    gcs, dashboard = free_port(), free_port()
    with _started_head(tmp_path, [f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=3",
                                  "--include-dashboard=true"]):
        _wait_for(f"http://127.0.0.1:{dashboard}/api/version", timeout_s=90)
        job = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
        job.update(methods=[{"name": "ft", "params": {"steps": 20}}], cache_dir=str(digits.work / "cache"),
                   ray={"enabled": True, "num_workers": 2},
                   tracking={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"})
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
        command = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                   str(BIN / "unlearn"), "run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")]
        for _ in range(30):  # the dashboard answers before the node's job agent has registered
            submit = subprocess.run(command, capture_output=True, text=True, timeout=400,
                                    env={**os.environ, "RAY_AUTH_MODE": "token"})  # send ~/.ray/auth_token
            if "No available agent to submit job" not in submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        assert set(results["methods"]) == {"original", "ft"} and results["methods"]["ft"]["RA"] > 90
        assert "succeeded" in submit.stdout
        # `ray.address` joins the same head from a driver started outside it
        joined = subprocess.run([str(BIN / "unlearn"), "run", str(tmp_path / "job.yaml"), "--out",
                                 str(tmp_path / "out2"), "--set", f"ray.address=127.0.0.1:{gcs}"],
                                capture_output=True, text=True, timeout=400, cwd=tmp_path,
                                env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert json.loads((tmp_path / "out2" / "results.json").read_text())["methods"]["ft"]["RA"] > 90


def _wait_for(url: str, timeout_s: float) -> None:
    """Until the dashboard answers (401 counts: it answers, and `ray job submit` brings the local token)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


@contextlib.contextmanager
def _started_head(tmp_path: Path, options: list[str]):
    """`ray start --head --block` with `options`, in its own temp dir (so its address file never redirects other
    `ray.init()` calls here; short: Ray's socket paths live under it) and process group, ended on exit (`ray
    stop` would end every Ray on the machine). The tests' own session is shut first: one cluster at a time."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", *options, f"--temp-dir={temp_dir}",
                             "--disable-usage-stats", "--block"],
                            stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield head
    finally:
        _end_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _end_group(proc: subprocess.Popen) -> None:
    """Stop the head we started: its whole process group, and nothing else."""
    group = os.getpgid(proc.pid)
    os.killpg(group, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.ray
def test_streamed_data_keeps_every_worker_in_step_across_passes(ray_session, digits, tmp_path):
    """`ray.data: streaming`: workers stream their Ray Data shard of each split (not step-exact). RL draws a
    forget and a retain batch every step; the small forget split is passed over again every other step while
    the retain split is mid-pass, and every worker must start each pass at the same step (Ray Data's epoch
    barrier): one table shared by both streams deadlocked here."""
    results = run_job(_job(digits, [{"name": "rl", "params": {"steps": 6, "schedule": "paired"}}], enabled=True, num_workers=2,
                           data="streaming"), tmp_path / "out")
    assert not results["failed"]
    assert results["methods"]["rl"]["FA"] < results["methods"]["original"]["FA"] - 10


@pytest.mark.slow
def test_streamed_data_runs_the_job_and_forgets(ray_session, digits, tmp_path):
    methods = [{"name": "rl", "params": {"steps": 40, "schedule": "paired"}}, {"name": "delete"}]
    results = run_job(_job(digits, methods, enabled=True, num_workers=2, data="streaming"), tmp_path / "out")
    assert not results["failed"]
    original = results["methods"]["original"]
    assert results["methods"]["rl"]["FA"] < original["FA"] - 50 and results["methods"]["rl"]["RA"] > 85
    assert results["methods"]["delete"]["FA"] < 10 and results["methods"]["delete"]["RA"] > 85
