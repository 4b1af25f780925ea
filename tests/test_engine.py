"""The Ray Train engine: shards, equivalence across worker counts, fault tolerance, cluster entry points.

The shard-plan tests run without Ray. The `ray` tests share one local Ray session (conftest.ray_session)
and use the digits MLP, whose Train runs cost mostly their fixed start-up; the `ray start --head` +
`ray job submit` test starts its own head (after shutting the shared session down) and is `slow`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from unlearn import loop, spec as spec_mod
from unlearn.data.scenarios import Split
from unlearn.engine import RayExecutor, ShardStream, plan_shards, shard_tables
from unlearn.errors import DivergedError
from unlearn.evaluation import build_evaluator
from unlearn.execution import LocalExecutor, RunRequest, execute, new_model
from unlearn.job import Prepared, prepare, request_for, run_job
from unlearn.methods import build as build_method
from unlearn.spec import MethodSpec, RaySpec
from unlearn.training import original_model

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


# --- shard plans (no Ray) -------------------------------------------------------------------------------
def _streams(n: int, batch_size: int, world: int, seed: int = 0) -> list[ShardStream]:
    """Every worker's stream of an n-row split (x = row id), built the way workers build them."""
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    tables = shard_tables(x, np.zeros(n, dtype=np.int64), np.arange(n) + 1000, plan_shards(n, batch_size, world, seed))
    return [ShardStream.from_table(table, (1,), size=n, batch_size=batch_size, world=world, rank=r, seed=seed)
            for r, table in enumerate(tables)]


def _pass_batches(streams: list[ShardStream]) -> list[tuple[int, ...]]:
    return sorted(tuple(sorted(b.index.tolist())) for s in streams for b in s.one_pass())


@pytest.mark.parametrize("n", [1, 2, 5, 63, 64, 65, 137, 1210])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("batch_size", [1, 8, 64])
def test_shards_cover_the_split_exactly_once_and_every_worker_can_step(n, world, batch_size):
    streams = _streams(n, batch_size, world)
    passed = [i for s in streams for b in s.one_pass() for i in b.index.tolist()]
    assert sorted(passed) == list(range(1000, 1000 + n))  # the union of the shards is the split, no duplicates
    for s in streams:
        batch = next(s.batches())
        assert len(batch.y) == s.batch_size == -(-batch_size // world)  # every worker draws a full share


@pytest.mark.parametrize("n,batch_size", [(137, 64), (1210, 64), (300, 16), (40, 64)])
def test_whole_set_passes_see_the_same_batches_on_any_worker_count(n, batch_size):
    """Batch-level statistics (SFR-on's Fisher: a mean of squared batch gradients) cannot depend on N."""
    one = _pass_batches(_streams(n, batch_size, 1))
    assert _pass_batches(_streams(n, batch_size, 2)) == one
    assert _pass_batches(_streams(n, batch_size, 3)) == one


def test_a_split_smaller_than_the_batch_is_replicated_for_steps_only():
    plans = plan_shards(3, batch_size=64, world=2, seed=0)
    assert [sorted(p.rows.tolist()) for p in plans] == [[0, 1, 2], [0, 1, 2]]  # both workers can draw batches
    assert [int(p.own.sum()) for p in plans] == [3, 0]  # but only one covers the rows in a whole-set pass


def test_one_worker_stream_draws_exactly_what_the_in_process_stream_draws():
    n, batch = 137, 64
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(n, 2, 3)).astype(np.float32), rng.integers(0, 5, n)
    [table] = shard_tables(x, y, np.arange(n), plan_shards(n, batch, 1, seed=7))
    ours = ShardStream.from_table(table, (2, 3), size=n, batch_size=batch, world=1, rank=0, seed=7)
    theirs = loop.ArrayStream(x, y, batch, seed=7)
    for a, b in zip([*ours.one_pass(), *_take(ours.batches(), 5)], [*theirs.one_pass(), *_take(theirs.batches(), 5)]):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.index, b.index)


def test_a_resumed_stream_continues_where_the_run_stopped():
    whole = _streams(200, 16, 2)[1]
    resumed = _streams(200, 16, 2)[1]
    resumed.start_step = 7
    assert torch.equal(next(resumed.batches()).index, _take(whole.batches(), 8)[-1].index)


def _take(iterator, k):
    return [next(iterator) for _ in range(k)]


# --- Ray runs ---------------------------------------------------------------------------------------------
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
    """The quickstart's data and its original model (trained in process once, cached for the jobs below).

    In-process runs here use one thread, like each Ray worker: on a small shared machine a two-thread
    torch team slows down many times over whenever another process holds a core.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("engine")
    spec = spec_mod.load(ROOT / "jobs" / "quickstart.yaml", [f"cache_dir={work / 'cache'}", "ray.enabled=false"])
    prep = prepare(spec)
    state, _ = original_model(spec, prep.splits, prep.input_shape, LocalExecutor("cpu"), prep.task)
    yield Digits(work, spec, prep, state)
    torch.set_num_threads(threads)


def in_process(request: RunRequest, capture: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """One worker, no Ray: the run's final weights and the named method attributes at its end."""
    batch = build_method(request.method, request.params).params.batch_size
    streams = [loop.ArrayStream(s.x, s.y, batch, seed=request.seed + k, index=s.index)
               for k, s in enumerate((request.forget, request.retain))]
    captured: dict = {}

    def on_epoch(summary, ctx, method):
        captured.update({name: getattr(method, name) for name in capture if hasattr(method, name)})

    module, _ = execute(request, *streams, on_epoch=on_epoch, verbose=False)
    return module.state_dict(), captured


@pytest.mark.ray
def test_one_worker_run_reproduces_the_in_process_run(ray_session, digits):
    request = digits.request("ft", steps=30)
    out = RayExecutor(RaySpec(num_workers=1)).run(request)
    local = LocalExecutor("cpu").run(request, verbose=False)
    for name, value in local.state.items():
        torch.testing.assert_close(out.state[name], value, rtol=1e-5, atol=1e-6)
    assert [r["step"] for r in out.history] == list(range(30))
    assert out.seconds > 0 and out.wall_seconds > out.seconds and out.resumed_from_step == 0


@pytest.mark.ray
def test_sfr_on_saliency_mask_on_two_workers_equals_one_worker(ray_session, digits):
    request = digits.request("sfr_on", steps=2)
    executor = RayExecutor(RaySpec(num_workers=2), capture=("mask",))
    executor.run(request)
    two = executor.captured["sfr_on"]["mask"]
    _, one = in_process(request, ("mask",))
    assert two.keys() == one["mask"].keys()
    for name, mask in one["mask"].items():
        assert torch.equal(two[name], mask), name
    assert 0 < sum(m.sum().item() for m in two.values()) < sum(m.numel() for m in two.values())


@pytest.mark.ray
def test_tarf_threshold_on_two_workers_equals_one_worker(ray_session, digits):
    """A global batch of the whole forget set (twice on one worker, once per worker on two) makes phase I
    identical on both, so the scores at t1 and the threshold over all shards must match."""
    n_forget = len(digits.prep.splits.forget)
    request = digits.request("tarf", steps=4, batch_size=2 * n_forget, t1_epochs=0.6)
    executor = RayExecutor(RaySpec(num_workers=2), capture=("threshold", "tau"))
    executor.run(request)
    two = executor.captured["tarf"]
    _, one = in_process(request, ("threshold", "tau"))
    assert one["threshold"] is not None and one["threshold"] > 0
    assert two["threshold"] == pytest.approx(one["threshold"], rel=1e-5)
    assert torch.equal(two["tau"], one["tau"].cpu())


@pytest.mark.ray
def test_delete_on_two_workers_lands_within_two_points_of_one_worker(ray_session, digits):
    request = digits.request("delete")
    evaluator = build_evaluator(digits.prep.task, digits.prep.splits, digits.spec, digits.prep.dataset)
    scores = {}
    for workers, state in (("two", RayExecutor(RaySpec(num_workers=2)).run(request).state),
                           ("one", in_process(request)[0])):
        model = new_model(request)
        model.load_state_dict(state)
        scores[workers] = evaluator.evaluate(model)[0]
    assert scores["one"]["FA"] < 10  # DELETE forgets on one worker ...
    for key in ("FA", "RA", "TA"):
        assert abs(scores["two"][key] - scores["one"][key]) <= 2.0, (key, scores)


@pytest.mark.ray
def test_a_forget_set_smaller_than_the_workers_and_the_batch_still_runs(ray_session, digits):
    request = digits.request("ga", steps=3)
    one_row = Split(*(a[:1] for a in (request.forget.x, request.forget.y, request.forget.index)))
    out = RayExecutor(RaySpec(num_workers=2)).run(replace(request, forget=one_row))
    assert [r["step"] for r in out.history] == [0, 1, 2]
    assert all(np.isfinite(r["forget_loss"]) for r in out.history)


@pytest.mark.ray
def test_a_killed_worker_resumes_from_its_checkpoint_and_the_job_finishes(ray_session, digits, tmp_path, monkeypatch):
    """Worker 1 exits at step 45 of 80 (ft on digits: 19 steps an epoch, a checkpoint every epoch here);
    the restarted group resumes from the step-38 checkpoint and MLflow records it."""
    monkeypatch.setenv("UNLEARN_REPORT_EVERY_S", "0")
    monkeypatch.setenv("UNLEARN_FAIL_AT_STEP", "45")
    monkeypatch.setenv("UNLEARN_FAIL_MARKER", str(tmp_path / "failed-once"))
    monkeypatch.setenv("UNLEARN_FAIL_DELAY_S", "4")
    spec = digits.spec.model_copy(update={
        "methods": [MethodSpec(name="ft", params={"steps": 80})],
        "ray": RaySpec(enabled=True, num_workers=2, max_failures=1),
        "tracking": digits.spec.tracking.model_copy(update={"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"}),
    })
    results = run_job(spec, tmp_path / "out")
    assert (tmp_path / "failed-once").exists()  # the failure did happen
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["ft"]["RA"] > 90
    run = MlflowClient(results["mlflow"]["tracking_uri"]).get_run(results["mlflow"]["runs"]["ft"])
    assert run.data.tags["unlearn.resumed_from_step"] == "38"
    assert run.data.metrics["restarts"] == 1


@pytest.mark.ray
def test_a_diverging_run_on_two_workers_fails_with_its_error_instead_of_hanging_or_retrying(ray_session, digits):
    """A worker whose loss turns NaN must not leave the other waiting in a collective; the run ends with the
    same DivergedError as in process (after one group restart that ends at once), not with retries."""
    request = digits.request("ga", steps=300, lr=10.0)
    with pytest.raises(DivergedError, match="forget_loss became nan"):
        LocalExecutor("cpu").run(request, verbose=False)
    with pytest.raises(DivergedError, match="forget_loss became nan"):
        RayExecutor(RaySpec(num_workers=2, max_failures=2)).run(request)


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
def test_an_fsdp_run_killed_midway_ends_with_the_weights_of_an_uninterrupted_ddp_run(ray_session, digits, tmp_path,
                                                                                       monkeypatch):
    """FSDP shards the model; a checkpoint gathers it, a restart resumes model, optimizer shards, schedule and
    the data order, so the result equals an uninterrupted run."""
    request = digits.request("ft", steps=40)
    reference = RayExecutor(RaySpec(num_workers=2)).run(request)
    monkeypatch.setenv("UNLEARN_REPORT_EVERY_S", "0")
    monkeypatch.setenv("UNLEARN_FAIL_AT_STEP", "25")
    monkeypatch.setenv("UNLEARN_FAIL_MARKER", str(tmp_path / "failed-once"))
    monkeypatch.setenv("UNLEARN_FAIL_DELAY_S", "3")
    out = RayExecutor(RaySpec(num_workers=2, strategy="fsdp", max_failures=1)).run(request)
    assert (out.resumed_from_step, out.restarts) == (19, 1)
    for name, value in reference.state.items():
        torch.testing.assert_close(out.state[name], value, rtol=1e-5, atol=1e-6)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.slow
def test_a_job_submitted_to_a_started_head_writes_its_results(digits, tmp_path):
    """`ray start --head` + `ray job submit -- unlearn run job.yaml`: the engine joins the head via RAY_ADDRESS
    (and, run from outside with `--set ray.address=host:port`, via the spec).

    The head gets its own temp dir (so its address file never redirects other `ray.init()` calls on this
    machine) and its own process group, which teardown ends (`ray stop` would end every Ray on the machine).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()  # one Ray cluster at a time on this machine
    gcs, dashboard = _free_port(), _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}", "--num-cpus=3",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats", "--block"],
        stdout=open(tmp_path / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
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
    finally:
        _end_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
