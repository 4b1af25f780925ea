"""`unlearn tune`: a small Optuna/ASHA search on digits, its outputs and MLflow runs, resume, bad spaces."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from unlearn import cli, spec as spec_mod
from unlearn.tuning import proxy_objective, resume_tune, run_tune

pytestmark = pytest.mark.ray

GA_LR = {"kind": "loguniform", "low": 1e-3, "high": 3e-2}


def _job(tmp: Path, **tune) -> dict:
    """A tiny digits job: MLP [32], GA for 3 epochs (each trial takes seconds)."""
    return {
        "name": "tune-digits",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "hidden": [32]},
        "train": {"epochs": 8},
        "forget": {"kind": "class", "classes": [3]},
        "methods": [{"name": "retrain"}, {"name": "ga", "params": {"epochs": 3}}],
        "ray": {"enabled": False},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}"},
        "tune": {"space": {"lr": GA_LR}, "max_concurrent": 2, "reports": 3, **tune},
        "cache_dir": str(tmp.parent / "cache"),  # one original and retrain for the whole module
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def _main(argv: list[str]) -> int:
    codes: list[int] = []
    cli.main(argv, exit=codes.append)
    return codes[0]


@pytest.fixture(scope="module")
def search(ray_session, tmp_path_factory):
    """`unlearn tune job.yaml --method ga --num-samples 4` through the CLI (Ray: conftest's shared session)."""
    tmp = tmp_path_factory.mktemp("search")
    job = _write(tmp / "job.yaml", _job(tmp))
    assert _main(["tune", str(job), "--method", "ga", "--num-samples", "4", "--out", str(tmp / "out")]) == 0
    return tmp, json.loads((tmp / "out" / "tune.json").read_text())


def test_search_records_every_trial_inside_the_space(search):
    _, result = search
    assert result["method"] == "ga" and result["metric"] == "gap" and len(result["trials"]) == 4
    assert result["space"] == {"lr": GA_LR} and result["fixed"] == {"epochs": 3}
    for trial in result["trials"]:
        assert GA_LR["low"] <= trial["config"]["lr"] <= GA_LR["high"]
        assert trial["status"] in ("completed", "early_stopped")
        assert {"FA", "RA", "TA", "MIA", "gap", "KL", "proxy"} <= set(trial["metrics"])
        assert 1 <= trial["reports"] <= 3 and trial["executions"] == 1
    assert result["counts"]["completed"] >= 1 and not result["interrupted"]
    best = result["best"]
    completed = [t["metrics"]["gap"] for t in result["trials"] if t["status"] == "completed"]
    assert best["metrics"]["gap"] == min(completed)


def test_proxy_scores_retrain_near_zero_and_the_original_high(search):
    """The retrain-free objective agrees with the reference on class forgetting."""
    _, result = search
    retrain, original = result["reference"]["retrain"], result["reference"]["original"]
    assert result["proxy_targets"]["labels_leave"] and result["proxy_targets"]["FA"] == 0.0
    assert retrain["proxy"] < 3.0
    assert original["proxy"] > 30.0
    best = result["best"]["metrics"]
    assert proxy_objective(best, _targets(result)) == pytest.approx(best["proxy"])


def _targets(result):
    from unlearn.tuning import ProxyTargets

    return ProxyTargets(**result["proxy_targets"])


def test_best_yaml_is_a_runnable_job_that_reproduces_the_gap(search, tmp_path):
    tmp, result = search
    best_path = tmp / "out" / "best.yaml"
    spec = spec_mod.load(best_path)
    assert [m.name for m in spec.methods] == ["retrain", "ga"]
    assert spec.methods[1].params == {"epochs": 3, "lr": result["best"]["config"]["lr"]}
    os.chdir(tmp_path)
    assert _main(["run", str(best_path), "--out", str(tmp_path / "run")]) == 0
    ran = json.loads((tmp_path / "run" / "results.json").read_text())["methods"]["ga"]
    assert ran["gap"] == pytest.approx(result["best"]["metrics"]["gap"], abs=2.0)


def test_mlflow_has_a_parent_search_run_with_one_nested_run_per_trial(search):
    _, result = search
    client = MlflowClient(tracking_uri=result["mlflow"]["tracking_uri"])
    parent = client.get_run(result["mlflow"]["parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.tags["unlearn.kind"] == "tune"
    assert parent.data.tags["unlearn.best_trial"] == result["best"]["trial_id"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"trials.png", "tune.json", "best.yaml"}
    nested = client.search_runs([result["mlflow"]["experiment_id"]],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(nested) == 4
    by_trial = {r.data.tags["unlearn.trial_id"]: r for r in nested}
    assert set(by_trial) == {t["trial_id"] for t in result["trials"]}
    for trial in result["trials"]:
        run = by_trial[trial["trial_id"]]
        assert float(run.data.params["lr"]) == pytest.approx(trial["config"]["lr"])
        assert run.data.metrics["gap"] == pytest.approx(trial["metrics"]["gap"])
    assert [t for t, r in by_trial.items() if r.data.tags.get("unlearn.best") == "true"] == [result["best"]["trial_id"]]


def test_report_shows_the_search_as_a_table_of_its_trials(search):
    """`unlearn report` reads the search back: one row per trial (status, gap, proxy, lr), best first and marked."""
    from unlearn.reporting import report

    _, result = search
    lines = report(uri=result["mlflow"]["tracking_uri"]).splitlines()
    # the search's block (a job run from best.yaml may share its experiment and come first)
    start = next(i for i, line in enumerate(lines) if line.startswith("tune-digits: tune ga (run "))
    lines = lines[start:]
    assert "4 trials, gap min" in lines[0]
    header = lines[1].split()
    assert header[:4] == ["trial", "status", "gap", "proxy"] and header[-1] == "lr"
    rows = [row for row in lines[3:3 + len(result["trials"]) + 1] if row.strip()]  # up to the block's end
    assert len(rows) == 4 and rows[0].startswith(f"* {result['best']['trial_id']} ")
    assert sum(row.startswith("* ") for row in rows) == 1
    for trial in result["trials"]:
        row = next(r.split() for r in rows if f" {trial['trial_id']} " in f" {r} ")
        shift = row[0] == "*"  # the best row's mark is a column of its own once split
        assert row[1 + shift] == trial["status"]
        assert float(row[header.index("gap") + shift]) == pytest.approx(trial["metrics"]["gap"], abs=0.005)
        assert float(row[-1]) == pytest.approx(trial["config"]["lr"], rel=1e-3)


def _interrupt_after(folder: Path, finished: int, timeout: float = 240.0) -> threading.Thread:
    """Send this process SIGUSR1 (Tune's graceful stop, like Ctrl-C) once `finished` trials have ended."""
    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline:
            logs = list(folder.glob("*.log"))
            if sum("final" in p.read_text() for p in logs) >= finished:
                os.kill(os.getpid(), signal.SIGUSR1)
                return
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_an_interrupted_search_resumes_without_rerunning_finished_trials(ray_session, tmp_path):
    spec = spec_mod.validate(_job(tmp_path, max_concurrent=1, scheduler="fifo"))
    out = tmp_path / "out"
    watcher = _interrupt_after(out / "trials", finished=2)
    # trials take under a second on an idle machine: 12 leave some to interrupt (with 6, all had ended before Tune
    # acted on the signal)
    first = run_tune(spec, method="ga", num_samples=12, out_dir=out)
    watcher.join()
    assert first["interrupted"]
    done_before = {t["trial_id"] for t in first["trials"] if t["status"] == "completed"}
    assert len(done_before) >= 2
    logs_before = {t: (out / "trials" / f"{t}.log").read_text() for t in done_before}

    assert _main(["tune", str(_write(tmp_path / "job.yaml", _job(tmp_path))), "--method", "ga",
                  "--out", str(out)]) == 2  # a fresh search will not overwrite an interrupted one

    second = resume_tune(out)
    assert not second["interrupted"] and len(second["trials"]) == 12
    assert all(t["status"] == "completed" for t in second["trials"])
    for trial in second["trials"]:
        if trial["trial_id"] in done_before:
            assert trial["executions"] == 1
            assert (out / "trials" / f"{trial['trial_id']}.log").read_text() == logs_before[trial["trial_id"]]
    client = MlflowClient(tracking_uri=second["mlflow"]["tracking_uri"])
    nested = client.search_runs([second["mlflow"]["experiment_id"]],
                                f"tags.mlflow.parentRunId = '{second['mlflow']['parent_run']}'")
    assert sorted(r.data.tags["unlearn.trial_id"] for r in nested) == sorted(t["trial_id"] for t in second["trials"])
    assert yaml.safe_load((out / "best.yaml").read_text())["methods"][1]["params"]["lr"] == second["best"]["config"]["lr"]


@pytest.mark.parametrize("space, expected", [
    ({"nope": {"kind": "uniform", "low": 0, "high": 1}},
     "error: tune.space.nope: unknown parameter; ga takes: lr, epochs, steps,"),
    ({"lr": {"kind": "loguniform", "low": 1e-3, "high": 50}},
     "error: tune.space.lr.high: 50 is outside ga's declared range of lr: (0, 10]"),
    ({"momentum": {"kind": "uniform", "low": 0.5, "high": 1.0}},
     "error: tune.space.momentum.high: 1.0 is outside ga's declared range of momentum: [0, 1)"),
    ({"optimizer": {"kind": "choice", "values": ["sgd", "lion"]}},
     "error: tune.space.optimizer.values.1: 'lion' is not a valid optimizer for ga"),
])
def test_a_bad_search_space_fails_with_one_line_and_exit_2(tmp_path, capsys, space, expected):
    job = _write(tmp_path / "job.yaml", {**_job(tmp_path), "tune": {"space": space}})
    assert _main(["tune", str(job), "--method", "ga", "--out", str(tmp_path / "out")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out" / "tune.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)  # a Train run that ASHA stopped and that kept its CPUs would starve the next trial
def test_engine_trials_run_ray_train_inside_tune_and_free_their_workers_when_stopped(ray_session, tmp_path):
    """Each trial is a TorchTrainer with two DDP workers; rank 0's reports reach Tune; ASHA stops some."""
    # the entry's lr (0.007, good) is the first point; the tiny ones barely move the model: ASHA stops them
    job = _job(tmp_path, max_concurrent=1, reports=3, space={"lr": {"kind": "choice", "values": [0.007, 1e-5, 3e-5]}})
    job["methods"][1]["params"]["lr"] = 0.007
    job["ray"] = {"enabled": True, "num_workers": 2, "cpus_per_worker": 0.5}
    result = run_tune(spec_mod.validate(job), method="ga", num_samples=4, out_dir=tmp_path / "out")
    assert not result["in_process"] and len(result["trials"]) == 4 and not result["interrupted"]
    for trial in result["trials"]:
        assert trial["status"] in ("completed", "early_stopped") and trial["executions"] == 1
        assert {"FA", "RA", "TA", "MIA", "gap", "proxy"} <= set(trial["metrics"])
    assert result["counts"]["completed"] >= 1 and result["counts"]["early_stopped"] >= 1


VOLATILE = ("wall_seconds", "mlflow")  # timings and MLflow run ids; trial ids (random prefix) and seconds below


def _selection(tune_json: Path) -> str:
    """tune.json without what differs between two identical searches (wall time, run and trial ids)."""
    data = json.loads(tune_json.read_text())
    for key in VOLATILE:
        data.pop(key)
    for row in data["trials"]:
        row["trial_id"] = row["trial_id"].rsplit("_", 1)[-1]
        row.pop("seconds")
    data["best"]["trial_id"] = data["best"]["trial_id"].rsplit("_", 1)[-1]
    return json.dumps(data, sort_keys=True)


def test_nothing_tune_selects_reads_the_reported_test_split(ray_session, tmp_path, monkeypatch):
    """The same search twice, once with the reported test split's images shuffled across its labels (its TA
    becomes chance): best.yaml is byte-identical and tune.json differs only in timings and ids."""
    import numpy as np

    import unlearn.data
    from unlearn.data.scenarios import validation_rows
    from unlearn.job import prepare

    real_load = unlearn.data.load_dataset

    def shuffled_test_split(spec, seed, cache_dir):
        ds = real_load(spec, seed, cache_dir)
        reported = np.flatnonzero(~validation_rows(len(ds.y_test), 0.2, 0))
        ds.x_test[reported] = ds.x_test[np.random.default_rng(1).permutation(reported)]
        return ds

    import shutil

    job = _job(tmp_path, search="random", scheduler="fifo", max_concurrent=1, in_process=True)
    # The data store is rebuilt from the loader per search; the original's cache is kept (it depends on the
    # training data only, which the shuffle leaves alone), so the second search trains nothing new.
    job["cache_dir"] = str(tmp_path / "cache")
    job["tracking"] = {"enabled": False}
    path, out = _write(tmp_path / "job.yaml", job), tmp_path / "out"
    outputs = {}
    for name in ("clean", "shuffled"):
        shutil.rmtree(tmp_path / "cache" / "data", ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
        if name == "shuffled":
            monkeypatch.setattr(unlearn.data, "load_dataset", shuffled_test_split)
        assert _main(["tune", str(path), "--method", "ga", "--num-samples", "2", "--out", str(out)]) == 0
        splits = prepare(spec_mod.load(path)).splits
        outputs[name] = (_selection(out / "tune.json"), (out / "best.yaml").read_bytes(), splits.test.x,
                         splits.validation.x)
    clean, shuffled = outputs["clean"], outputs["shuffled"]
    assert not np.array_equal(clean[2], shuffled[2])  # the reported test split really changed ...
    assert np.array_equal(clean[3], shuffled[3])  # ... the validation split did not
    assert json.loads(clean[0])["splits"]["TA"] == "validation split"
    assert shuffled[1] == clean[1]
    assert shuffled[0] == clean[0]



def test_a_diverged_trial_reports_the_penalty_and_the_runs_own_message(tmp_path):
    """A trial whose run failed ranks last and says why (tune.json and the progress line show the message)."""
    from unlearn.run_queue import RunQueue
    from unlearn.tuning.trials import Shared, _report_failure

    queue = RunQueue([{"label": "ga", "role": "method"}], base_ready=True)
    queue.next(0)
    queue.failed(0, {"error": "DivergedError", "message": "ga: forget_loss became nan at step 5/21 (try a lower lr)"})
    shared = Shared.__new__(Shared)
    shared.failure_value, shared.out_dir = 100.0, str(tmp_path)
    reports: list[dict] = []
    _report_failure(shared, queue, "t1", reports.append)
    assert reports == [{"gap": 100.0, "proxy": 100.0, "final": True, "diverged": True, "progress": 1.0,
                        "why": "ga: forget_loss became nan at step 5/21 (try a lower lr)"}]
    assert (tmp_path / "trials" / "t1.log").read_text().startswith("diverged ")


SEARCH_STARTS_RAY = """
import json, os, signal
from types import SimpleNamespace
import ray
from unlearn.cli import _terminated
from unlearn.ray_session import LEAN_TRAIN_ENV
from unlearn.spec import RaySpec
from unlearn.tuning import driver
signal.signal(signal.SIGTERM, _terminated)  # as `unlearn tune` runs
for key in [*LEAN_TRAIN_ENV, "RAY_ADDRESS"]:
    os.environ.pop(key, None)
plan = SimpleNamespace(spec=SimpleNamespace(ray=RaySpec(num_workers=1)), in_process=False)
started = driver._ensure_ray(plan)
print(json.dumps({"started": started, "cpus": ray.cluster_resources().get("CPU"),
                  "lean": all(os.environ.get(k) == v for k, v in LEAN_TRAIN_ENV.items()),
                  "handler": signal.getsignal(signal.SIGTERM) is _terminated}))
ray.shutdown()
"""


def test_a_search_with_no_cluster_to_join_starts_its_own_ray_and_keeps_the_clis_sigterm_handler(tmp_path):
    """`unlearn tune` outside any Ray session, with Train trials (the default), starts a real local Ray sized for one
    trial's workers with the engine's lean Train settings (it once called a helper that had moved: AttributeError);
    ray.init replaces the driver's SIGTERM handler with sys.exit, and the search puts the CLI's back, so `ray job
    stop` ends it like Ctrl-C (resumable) rather than as a failure. In a process of its own: no session yet."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", SEARCH_STARTS_RAY], capture_output=True, text=True, cwd=tmp_path,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found == {"started": True, "cpus": found["cpus"], "lean": True, "handler": True}
    assert found["cpus"] >= 2  # one trial's worker and the driver's share
