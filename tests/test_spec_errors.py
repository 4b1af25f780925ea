"""Every bad input ends with one clear line naming the cause and exit code 2, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from unlearn import cli
from unlearn import spec as spec_mod

GOOD = {
    "name": "bad-input",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 1},
    "forget": {"kind": "class", "classes": [3]},
    "methods": [{"name": "ft"}],
    "ray": {"enabled": False},
    "tracking": {"enabled": False},
}


def _write(tmp_path: Path, data: dict | str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _run(capsys, argv: list[str]) -> tuple[int, list[str]]:
    codes: list[int] = []
    cli.main(argv, exit=codes.append)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return codes[0], err


def _bad(tmp_path: Path, capsys, data: dict | str, *extra: str) -> str:
    os.chdir(tmp_path)
    code, err = _run(capsys, ["run", str(_write(tmp_path, data)), "--out", str(tmp_path / "out"), *extra])
    assert code == 2, err
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert not (tmp_path / "out" / "results.json").exists()
    return err[0]


def _with(**changes) -> dict:
    data = yaml.safe_load(yaml.safe_dump(GOOD))
    for dotted, value in changes.items():
        node = data
        *parents, last = dotted.split("__")
        for p in parents:
            node = node[p]
        node[last] = value
    return data


def test_bad_yaml(tmp_path, capsys):
    line = _bad(tmp_path, capsys, "name: x\ndataset: {name: digits\n")
    assert "invalid YAML" in line and "line" in line


def test_unknown_key(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(dataset__colour="red"))
    assert "dataset.colour" in line and "unknown key" in line


def test_wrong_type(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(train__epochs="many"))
    assert "train.epochs" in line and "integer" in line


def test_unknown_dataset(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(dataset__name="mnist"))
    assert "dataset.name" in line and "'digits'" in line and "mnist" in line


def test_unknown_model(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(model__name="vit"))
    assert "model.name" in line and "'cnn'" in line


def test_unknown_method(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(methods=[{"name": "forgetful"}]))
    assert "methods.0.name" in line and "forgetful" in line and "ft" in line


def test_bad_method_parameter(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(methods=[{"name": "ft", "params": {"lr": -1}}]))
    assert "methods.0.params.lr" in line and "greater than 0" in line


def test_unknown_method_parameter(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(methods=[{"name": "ft", "params": {"temperature": 2}}]))
    assert "methods.0.params.temperature" in line and "unknown parameter" in line


def test_missing_class(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "class", "classes": [12]}))
    assert "forget.classes" in line and "12" in line and "0..9" in line


def test_empty_forget_set(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "class", "classes": []}))
    assert "forget" in line and "empty forget set" in line


def test_fraction_outside_unit_interval(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "random", "fraction": 1.5}))
    assert "forget.fraction" in line and "less than 1" in line


def test_fraction_too_small_is_empty(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "random", "fraction": 0.0001}))
    assert "forget.fraction" in line and "empty forget set" in line


def test_missing_cifar_folder(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(dataset={"name": "cifar10", "root": str(tmp_path / "nowhere")}))
    assert "cifar10" in line and "nowhere" in line


def test_unwritable_output_folder(tmp_path, capsys):
    os.chdir(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _run(capsys, ["run", str(_write(tmp_path, GOOD)), "--out", str(blocker / "out")])
    assert code == 2 and len(err) == 1 and "output folder is not writable" in err[0]


def test_unknown_mismatch_kind(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "concept", "mismatch": "label", "target": 1}))
    assert "forget.mismatch" in line and "'target'" in line


def test_given_class_outside_target_concept(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "concept", "mismatch": "target", "target": 1, "given": [3]}))
    assert "forget.given" in line and "not part of the target concept" in line


def test_forgetting_everything_leaves_nothing_to_retain(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "class", "classes": list(range(10))}))
    assert "nothing would be retained" in line


def test_missing_spec_file(tmp_path, capsys):
    os.chdir(tmp_path)
    code, err = _run(capsys, ["run", str(tmp_path / "absent.yaml")])
    assert code == 2 and len(err) == 1 and "job spec not found" in err[0]


def test_bad_override(tmp_path, capsys):
    line = _bad(tmp_path, capsys, GOOD, "--set", "methods.7.params.lr=1")
    assert "--set" in line and "not an index" in line


def test_override_applies_and_validates(tmp_path, capsys):
    overrides = ["ray.num_workers=3", "methods.0.params.lr=0.5", "model.hidden=[8, 4]"]
    applied = spec_mod.load(_write(tmp_path, GOOD), overrides)
    assert applied.ray.num_workers == 3 and applied.methods[0].params == {"lr": 0.5} and applied.model.hidden == [8, 4]
    line = _bad(tmp_path, capsys, GOOD, "--set", "ray.num_workers=0")
    assert "ray.num_workers" in line and "(got 0)" in line  # the overridden value is the one validated


def test_console_script_exit_code(tmp_path):
    """The installed `unlearn` command itself exits 2 with one line (the path CI users take)."""
    path = _write(tmp_path, _with(dataset__name="mnist"))
    exe = Path(sys.executable).parent / "unlearn"
    proc = subprocess.run([str(exe), "run", str(path)], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "dataset.name" in lines[0]


def test_cure_on_a_forget_set_spanning_every_class(tmp_path, capsys):
    line = _bad(tmp_path, capsys, _with(forget={"kind": "random", "fraction": 0.2}, methods=[{"name": "grogu"}]))
    assert line.startswith("error: methods.0.params.mask_classes: every class would be masked"), line


# Fail fast (issue 15): what would otherwise hang for minutes or fail deep inside the job ends before any
# work, within 30 s, with one line, exit 2, and nothing written under --out.
UNREACHABLE_MLFLOW = "http://127.0.0.1:9"  # the discard port: nothing listens there


def test_unreachable_tracking_server(tmp_path, capsys):
    started = time.monotonic()
    line = _bad(tmp_path, capsys, _with(tracking={"enabled": True, "uri": UNREACHABLE_MLFLOW}))
    assert time.monotonic() - started < 30
    assert f"MLflow tracking server at {UNREACHABLE_MLFLOW} does not answer" in line, line
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_server_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", UNREACHABLE_MLFLOW)
    line = _bad(tmp_path, capsys, _with(tracking={"enabled": True}))
    assert UNREACHABLE_MLFLOW in line and "MLFLOW_TRACKING_URI" in line, line
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_server_console_script(tmp_path):
    """`unlearn run` and `unlearn tune` end within 30 s with exit 2 (MLflow's own client retries for minutes)."""
    path = _write(tmp_path, _with(tracking={"enabled": True, "uri": UNREACHABLE_MLFLOW}))
    exe = Path(sys.executable).parent / "unlearn"
    for command in (["run", str(path)], ["tune", str(path), "--method", "ft"]):
        started = time.monotonic()
        proc = subprocess.run([str(exe), *command, "--out", str(tmp_path / "out")], capture_output=True, text=True,
                              cwd=tmp_path, timeout=60)
        assert time.monotonic() - started < 30
        assert proc.returncode == 2, proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"error: MLflow tracking server at {UNREACHABLE_MLFLOW}"), lines
        assert not (tmp_path / "out").exists()


def test_output_folder_that_is_a_file(tmp_path, capsys):
    (tmp_path / "out").write_text("not a folder")
    started = time.monotonic()
    line = _bad(tmp_path, capsys, GOOD)
    assert time.monotonic() - started < 30
    assert "output folder is not writable" in line and "out (it is a file, not a folder)" in line, line
    assert (tmp_path / "out").read_text() == "not a folder"


def test_unwritable_checkpoint_storage(tmp_path, capsys):
    from unlearn.engine import STORAGE_ENV
    from unlearn.preflight import STORAGE_ENV as checked

    assert checked == STORAGE_ENV  # the preflight checks the variable the engine reads
    (tmp_path / "file").write_text("not a folder")
    storage = tmp_path / "file" / "engine"
    started = time.monotonic()
    line = _bad(tmp_path, capsys, _with(ray={"enabled": True, "storage": str(storage)}))
    assert time.monotonic() - started < 30  # stopped before Ray started
    assert line.startswith(f"error: ray.storage is not writable: {storage}"), line
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_more_workers_than_the_embedded_session_can_ever_hold(tmp_path, capsys, ray_session):
    started = time.monotonic()
    line = _bad(tmp_path, capsys, _with(ray={"enabled": True, "num_workers": 64}))
    assert time.monotonic() - started < 30
    assert "the job asks for 64 CPUs (1 group x 64 workers x 1 CPU)" in line and "ray.num_workers" in line, line
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_a_joined_cluster_is_waited_for_then_refused(ray_session, monkeypatch, capsys):
    """A joined cluster may grow (autoscaling) or be busy: wait `ray.resource_wait_s` with one line, then refuse."""
    import ray

    from unlearn import ray_session as session
    from unlearn.errors import BadInput
    from unlearn.spec import RaySpec

    # the shared test session stands in for a joined cluster (an embedded one can never grow: refused at once)
    monkeypatch.setattr(session, "in_embedded_session", lambda: False)
    session.check_fits(RaySpec(num_workers=1, resource_wait_s=0))  # what fits never waits
    total = ray.cluster_resources()["CPU"]
    for spec, busy, expected in [(RaySpec(num_workers=64, resource_wait_s=0.5), False, "in all after 0.5 s"),
                                 (RaySpec(num_workers=1, resource_wait_s=0.5), True, "were free within 0.5 s")]:
        held = None
        if busy:  # every CPU of the session really taken, by a placement group
            held = ray.util.placement_group([{"CPU": total}])
            ray.get(held.ready(), timeout=30)
        try:
            started = time.monotonic()
            with pytest.raises(BadInput, match=expected):
                session.check_fits(spec, poll_s=0.1)
            assert 0.5 <= time.monotonic() - started < 5
        finally:
            if held is not None:
                ray.util.remove_placement_group(held)
        waited = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(waited) == 1 and waited[0].startswith("waiting up to 0.5 s for"), waited


def test_embedded_session_is_sized_to_the_machine(monkeypatch):
    from unlearn.ray_session import embedded_cpus
    from unlearn.spec import RaySpec

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert embedded_cpus(RaySpec(num_workers=2)) == 3  # the quickstart: a CPU stays free beside the workers
    assert embedded_cpus(RaySpec(num_workers=1)) == 2
    assert embedded_cpus(RaySpec(num_workers=64)) == 2  # never the request: check_fits refuses it
    assert embedded_cpus(RaySpec(num_workers=2, groups=4)) == 3  # groups beyond the machine share it
