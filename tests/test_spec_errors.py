"""Every bad input ends with one clear line naming the cause and exit code 2, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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
