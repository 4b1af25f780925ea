"""The embedded default job end to end (in-process executor): results.json contract, MLflow layout,
and the reference figures on digits class forgetting."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from unlearn import cli, spec as spec_mod

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_METRICS = {"FA", "RA", "TA", "MIA", "gap", "KL", "seconds"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Run jobs/quickstart.yaml through the CLI in a fresh folder (embedded MLflow store there)."""
    work = tmp_path_factory.mktemp("quickstart")
    old = os.getcwd()
    os.chdir(work)
    try:
        codes: list[int] = []
        cli.main(["run", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "ray.enabled=false"], exit=codes.append)
        assert codes == [0]
        yield work, json.loads((work / "results" / "quickstart" / "results.json").read_text())
    finally:
        os.chdir(old)


def test_results_follow_the_contract(quickstart):
    _, results = quickstart
    assert results["job"] == "quickstart" and results["dataset"] == "digits"
    assert results["forget"] == {"kind": "class", "classes": [3]}
    assert set(results["sizes"]) >= {"forget", "retain", "test"}
    assert results["sizes"]["forget"] + results["sizes"]["retain"] == 1347  # digits train split at 25% test
    spec = spec_mod.load(ROOT / "jobs" / "quickstart.yaml")
    assert set(results["methods"]) == {"original", *(m.run_name for m in spec.methods)}
    for name, metrics in results["methods"].items():
        assert CONTRACT_METRICS <= set(metrics), name
        for key in ("FA", "RA", "TA", "MIA"):
            assert 0.0 <= metrics[key] <= 100.0
    assert results["methods"]["original"]["seconds"] == 0.0
    assert results["mlflow"]["tracking_uri"].startswith("sqlite:///")
    assert set(results["mlflow"]["runs"]) == set(results["methods"]) - {"original"}


def test_digits_reference_figures(quickstart):
    """Retrain never saw class 3: FA 0 and the attack calls it non-member; the original knows it."""
    _, results = quickstart
    retrain, original = results["methods"]["retrain"], results["methods"]["original"]
    assert retrain["FA"] == 0.0
    assert retrain["MIA"] >= 90.0
    assert original["FA"] >= 95.0
    assert retrain["gap"] == 0.0 and retrain["KL"] == 0.0
    assert original["gap"] > 20.0  # the original is far from retrain: unlearning has work to do


def test_mlflow_has_runs_params_metrics_artifacts(quickstart):
    work, results = quickstart
    client = MlflowClient(tracking_uri=results["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name("quickstart")
    assert exp is not None and exp.experiment_id == results["mlflow"]["experiment_id"]
    parent = client.get_run(results["mlflow"]["parent_run"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset.name"] == "digits" and parent.data.params["model.name"] == "mlp"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"spec.yaml", "results.json", "metrics.png"}
    for name, run_id in results["mlflow"]["runs"].items():
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.params["method"] == name
        for key in ("FA", "RA", "TA", "MIA", "gap", "KL", "seconds"):
            assert run.data.metrics[key] == pytest.approx(results["methods"][name][key], abs=1e-3)
        assert "losses.png" in {a.path for a in client.list_artifacts(run_id)}
        model = client.get_logged_model(results["mlflow"]["models"][name].removeprefix("models:/"))  # MLflow 3
        assert model.source_run_id == run_id and model.name == name
        assert len(client.get_metric_history(run_id, next(k for k in run.data.metrics if "loss" in k))) > 1


def test_logged_model_reproduces_the_reported_accuracy(quickstart):
    """The run's LoggedModel (`models:/<id>`) is the unlearned model: loading it gives the reported FA."""
    from unlearn.model_logging import load_module

    _, results = quickstart
    model = load_module(results["mlflow"]["models"]["retrain"], results["mlflow"]["tracking_uri"])
    from unlearn.data.digits import load_digits_dataset

    ds = load_digits_dataset(0.25, 0)
    x = torch.from_numpy(ds.x_train[ds.y_train == 3])
    with torch.no_grad():
        fa = 100.0 * float((model(x).argmax(1) == 3).float().mean())
    assert fa == pytest.approx(results["methods"]["retrain"]["FA"], abs=1e-6)


def test_second_job_reuses_the_cached_original(quickstart, capsys):
    work, _ = quickstart
    os.chdir(work)
    codes: list[int] = []
    cli.main(["run", str(ROOT / "jobs" / "quickstart.yaml"), "--set", "ray.enabled=false", "--set", "methods=[{name: ga}]",
              "--set", "tracking.enabled=false", "--out", str(work / "second")], exit=codes.append)
    assert codes == [0]
    assert "original model: cached" in capsys.readouterr().err
    assert json.loads((work / "second" / "results.json").read_text())["original_cached"] is True


def test_report_reads_back_the_table(quickstart, capsys):
    work, results = quickstart
    os.chdir(work)
    codes: list[int] = []
    cli.main(["report", "--experiment", "quickstart"], exit=codes.append)
    out = capsys.readouterr().out
    assert codes == [0]
    for name in results["methods"]:
        assert name in out
    assert f"{results['methods']['retrain']['MIA']:.2f}" in out


def test_methods_command_lists_params_and_sources(capsys):
    codes: list[int] = []
    cli.main(["methods"], exit=codes.append)
    out = capsys.readouterr().out
    assert codes == [0]
    for name in ("retrain", "ft", "ga"):
        assert f"{name}:" in out
    assert "lr = " in out and "search loguniform" in out


def test_nan_loss_fails_the_run_in_mlflow(tmp_path, capsys):
    """A diverging method ends with one line naming it and the cause, exit 1, its MLflow run FAILED and its
    row in results.json saying why (the job's other runs are written: tests/test_engine.py)."""
    os.chdir(tmp_path)
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text((ROOT / "jobs" / "quickstart.yaml").read_text())
    codes: list[int] = []
    cli.main(["run", str(spec_path), "--set", "ray.enabled=false", "--set", "name=diverge",
              "--set", "methods=[{name: ga, params: {lr: 10.0, epochs: 50, momentum: 0.99}}]",
              "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "train.epochs=2"], exit=codes.append)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(("failed", "error"))]
    assert codes == [1] and len(err) == 1 and "became" in err[0] and err[0].startswith("failed: ga:")
    results = json.loads((tmp_path / "results" / "diverge" / "results.json").read_text())
    assert results["failed"] == ["ga"] and "became" in results["methods"]["ga"]["error"]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns.db'}")
    assert client.get_run(results["mlflow"]["runs"]["ga"]).info.status == "FAILED"


def test_seeds_run_the_whole_job_per_seed_and_report_mean_and_std(tmp_path):
    """`--seeds 2`: each seed its own original, retrain and method runs; results.json holds the mean (under the
    usual names), the sample std and every seed's numbers; MLflow nests each seed's job under one run."""
    import numpy as np

    job = {"name": "two-seeds", "dataset": {"name": "digits"}, "model": {"name": "mlp", "hidden": [32]},
           "train": {"epochs": 6}, "forget": {"kind": "random", "fraction": 0.1},
           "methods": [{"name": "retrain", "params": {"epochs": 4}}, {"name": "ft", "params": {"steps": 10}}],
           "ray": {"enabled": False}, "tracking": {"uri": f"sqlite:///{tmp_path / 'mlruns.db'}"},
           "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "job.yaml").write_text(spec_mod.dump(spec_mod.validate(job)))
    codes: list[int] = []
    cli.main(["run", str(tmp_path / "job.yaml"), "--seeds", "2", "--out", str(tmp_path / "out")], exit=codes.append)
    assert codes == [0]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["seeds"] == [0, 1] and not results["failed"]
    per_seed = {s: json.loads((tmp_path / "out" / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert per_seed[0]["forget"] != per_seed[1]["forget"] or per_seed[0]["methods"] != per_seed[1]["methods"]
    assert len(list((tmp_path / "cache" / "models").glob("*.pt"))) == 2  # an original per seed
    for name in ("original", "retrain", "ft"):
        values = [per_seed[s]["methods"][name]["RA"] for s in (0, 1)]
        row = results["methods"][name]
        assert row["RA"] == pytest.approx(np.mean(values), abs=1e-4)
        assert row["RA_std"] == pytest.approx(np.std(values, ddof=1), abs=1e-4)
        assert row["per_seed"]["1"]["RA"] == values[1]
    client = MlflowClient(results["mlflow"]["tracking_uri"])
    for s, seed_run in results["mlflow"]["seed_runs"].items():
        assert client.get_run(seed_run).data.tags["mlflow.parentRunId"] == results["mlflow"]["parent_run"]
        ft_run = results["mlflow"]["runs_per_seed"][s]["ft"]
        assert client.get_run(ft_run).data.tags["mlflow.parentRunId"] == seed_run
    parent = client.get_run(results["mlflow"]["parent_run"]).data.metrics
    assert parent["ft.RA_std"] == pytest.approx(results["methods"]["ft"]["RA_std"])
