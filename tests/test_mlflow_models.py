"""MLflow the current way: each method's model is a LoggedModel that reloads through `models:/<id>`, the
registry takes it (`unlearn register`), `tracking.log_models` says what is logged, and every method run
carries its worker's system metrics (`system/...`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow.artifacts
import mlflow.pytorch
import numpy as np
import pytest
import torch
import yaml
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from unlearn import cli, spec as spec_mod

JOB = {
    "name": "mlflow-models",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 2},
    "forget": {"kind": "class", "classes": [3]},
    # a label with '.', which MLflow refuses in a LoggedModel's name (the logged model's name replaces it)
    "methods": [{"name": "ft", "label": "ft-epochs1.0", "params": {"epochs": 1}}, {"name": "ga"}],
    "ray": {"enabled": False},
}


def _main(capsys, argv: list[str]) -> tuple[int, str, list[str]]:
    codes: list[int] = []
    cli.main(argv, exit=codes.append)
    out, err = capsys.readouterr()
    return codes[0], out, [line for line in err.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The tiny job through `unlearn run` in a fresh folder (the SQLite store's artifacts land in ./mlartifacts),
    then the same job with `tracking.log_models: none` (original cached)."""
    tmp = tmp_path_factory.mktemp("mlflow-models")
    data = {**JOB, "tracking": {"uri": f"sqlite:///{tmp / 'mlruns.db'}"}}
    (tmp / "job.yaml").write_text(yaml.safe_dump(data))
    old = os.getcwd()
    os.chdir(tmp)
    try:
        for out, extra in (("full", []), ("none", ["--set", "tracking.log_models=none", "--set", "methods=[{name: ga}]"])):
            codes: list[int] = []
            cli.main(["run", str(tmp / "job.yaml"), "--out", str(tmp / out), *extra], exit=codes.append)
            assert codes == [0]
        yield (tmp, spec_mod.validate(data), json.loads((tmp / "full" / "results.json").read_text()),
               json.loads((tmp / "none" / "results.json").read_text()))
    finally:
        os.chdir(old)


def test_logged_model_reloads_through_its_models_uri_and_reproduces_fa(job, monkeypatch):
    """Each method's LoggedModel: READY, named after the method, linked to its run, with a signature and an
    input example; loaded through `models:/<id>` it gives the FA results.json reports."""
    from unlearn.job import prepare
    from unlearn.model_logging import download, load_module

    _, spec, results, _ = job
    uri = results["mlflow"]["tracking_uri"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # what `models:/` resolves in (no global state set anywhere)
    assert mlflow.get_tracking_uri() == uri
    client = MlflowClient(tracking_uri=uri)
    prep = prepare(spec)
    target = prep.splits.target
    assert set(results["mlflow"]["models"]) == {"ft-epochs1.0", "ga"}
    for label, model_uri in results["mlflow"]["models"].items():
        run_id = results["mlflow"]["runs"][label]
        assert model_uri.startswith("models:/")
        logged = client.get_logged_model(model_uri.removeprefix("models:/"))
        assert str(logged.status).endswith("READY") and logged.source_run_id == run_id
        assert logged.name == label.replace(".", "_")
        assert logged.model_id in {o.model_id for o in client.get_run(run_id).outputs.model_outputs}
        info = Model.load(download(model_uri, uri))
        assert info.model_id == logged.model_id and "pytorch" in info.flavors
        assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, *prep.input_shape)
        assert info.saved_input_example_info is not None
        x = torch.from_numpy(target.x)
        with torch.no_grad():
            predicted = mlflow.pytorch.load_model(model_uri).eval()(x).argmax(1).numpy()
            assert torch.equal(load_module(model_uri, uri).eval()(x).argmax(1), torch.from_numpy(predicted))
        fa = 100.0 * float(np.mean(predicted == target.y))
        assert fa == pytest.approx(results["methods"][label]["FA"], abs=1e-3), label


def test_register_sets_an_alias_that_reads_back(job, capsys):
    import mlflow

    _, _, results, without = job
    uri = results["mlflow"]["tracking_uri"]
    run_id = results["mlflow"]["runs"]["ga"]
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"))
    code, out, err = _main(capsys, ["register", run_id, "--name", "digits-ga", "--alias", "champion",
                                    "--tracking-uri", uri])
    assert code == 0 and not err
    assert out.strip().splitlines() == [f"registered digits-ga version 1, alias champion "
                                        f"({results['mlflow']['models']['ga']}, run {run_id})"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias("digits-ga", "champion")
    assert version.run_id == run_id and int(version.version) == 1
    assert version.source == results["mlflow"]["models"]["ga"]  # the SQL registry keeps no model_id field
    assert (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI")) == before  # global state restored
    with torch.no_grad():  # the alias loads the same weights
        from unlearn.model_logging import load_module

        x = torch.ones(2, 1, 8, 8)
        assert torch.equal(load_module("models:/digits-ga@champion", uri)(x), load_module(version.source, uri)(x))
    # a run that logged no model, and an unknown run: one line each, exit 2
    code, _, err = _main(capsys, ["register", without["mlflow"]["runs"]["ga"], "--name", "x", "--tracking-uri", uri])
    assert code == 2 and len(err) == 1 and "has no logged model" in err[0]
    code, _, err = _main(capsys, ["register", "0" * 32, "--name", "x", "--tracking-uri", uri])
    assert code == 2 and len(err) == 1 and "no MLflow run" in err[0]


def test_log_models_none_logs_no_model(job):
    _, _, _, without = job
    client = MlflowClient(tracking_uri=without["mlflow"]["tracking_uri"])
    run = client.get_run(without["mlflow"]["runs"]["ga"])
    assert without["mlflow"]["models"] == {}
    assert not client.search_logged_models([run.info.experiment_id],
                                           filter_string=f"source_run_id = '{run.info.run_id}'")
    assert not run.outputs or not run.outputs.model_outputs


def test_every_method_run_has_system_metrics(job):
    """rank 0's samples: MLflow's own names under system/, one step per sample, the sample's timestamp."""
    _, _, results, without = job
    client = MlflowClient(tracking_uri=results["mlflow"]["tracking_uri"])
    for run_id in [*results["mlflow"]["runs"].values(), *without["mlflow"]["runs"].values()]:
        memory = client.get_metric_history(run_id, "system/system_memory_usage_megabytes")
        assert len(memory) >= 2 and [m.step for m in memory] == list(range(len(memory)))
        assert all(m.value > 0 for m in memory)
        assert len(client.get_metric_history(run_id, "system/cpu_utilization_percentage")) >= 1
        rss = client.get_metric_history(run_id, "system/process_rss_megabytes")
        assert [m.timestamp for m in rss] == [m.timestamp for m in memory]


def test_adapter_mode_logs_only_adapter_weights(tmp_path, monkeypatch, capsys):
    """`log_models: adapter`: a model with adapters logs only their weights; a plain one logs none, said once."""
    from unlearn.spec import TrackingSpec
    from unlearn.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    tracker = Tracker(TrackingSpec(uri=f"sqlite:///{tmp_path / 'mlruns.db'}", log_models="adapter"), "adapters")
    run_id = tracker.start("lora")
    plain = torch.nn.Linear(4, 2)
    assert tracker.model(run_id, plain, (4,)) is None and tracker.model(run_id, plain, (4,)) is None
    notes = [line for line in capsys.readouterr().err.splitlines() if "log_models" in line]
    assert len(notes) == 1 and "no adapters" in notes[0]

    class WithAdapter(torch.nn.Linear):
        def adapter_state_dict(self):
            return {"lora_A": self.weight[:1] * 0 + 1.0}

    uri = tracker.model(run_id, WithAdapter(4, 2), (4,))
    from unlearn.model_logging import download

    local = Path(download(uri, tracker.uri))
    state = torch.load(local / "adapter_weights.pt")
    assert list(state) == ["lora_A"] and torch.equal(state["lora_A"], torch.ones(1, 4))
    assert not (local / "MLmodel").exists()


def test_diffusion_model_is_a_pyfunc_of_noise_timestep_and_labels(tmp_path, monkeypatch):
    """A DDPM logs as a pyfunc {noise, timestep, labels} -> noise; it predicts what the module predicts."""
    import mlflow.pyfunc

    from unlearn.model_logging import download, load_module
    from unlearn.models.ddpm import build_ddpm
    from unlearn.spec import DDPMSpec, TrackingSpec
    from unlearn.tracking import Tracker

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    ddpm = build_ddpm(DDPMSpec(channels=[8, 16], train_timesteps=20), num_classes=3, input_shape=(1, 8, 8))
    tracker = Tracker(TrackingSpec(uri=f"sqlite:///{tmp_path / 'mlruns.db'}"), "ddpm")
    run_id = tracker.start("sfr_on")
    uri = tracker.model(run_id, ddpm, (1, 8, 8), "diffusion", name="sfr_on")
    local = download(uri, tracker.uri)
    assert {i["name"] for i in Model.load(local).signature.inputs.to_dict()} == {"noise", "timestep", "labels"}
    noise = torch.randn(2, 1, 8, 8)
    t, y = torch.tensor([3, 7]), torch.tensor([0, 2])
    with torch.no_grad():
        expected = ddpm.eval()(noise, t, y).numpy()
    predicted = mlflow.pyfunc.load_model(local).predict({"noise": noise.numpy(), "timestep": t.numpy(),
                                                         "labels": y.numpy()})
    np.testing.assert_allclose(predicted, expected, atol=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(load_module(uri, tracker.uri)(noise, t, y).numpy(), expected, atol=1e-5)
