"""The backdoor scenario: a trigger planted in the data, forget kind `backdoor`, ASR and clean_TA."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from unlearn import cli
from unlearn import spec as spec_mod

BACKDOOR = {"target": 0, "fraction": 0.1, "patch": 2, "value": 1.0}


def _spec(tmp_path, forget=None, methods=None, **dataset):
    return spec_mod.validate({
        "name": "backdoor-test", "dataset": {"name": "digits", "backdoor": BACKDOOR, **dataset},
        "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 20, "batch_size": 64, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "forget": forget or {"kind": "backdoor"}, "methods": methods or [{"name": "retrain"}],
        "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(tmp_path / "cache")})


def test_the_poisoned_rows_carry_the_trigger_and_the_target_label(tmp_path):
    from unlearn.data import load_dataset
    from unlearn.job import prepare

    spec = _spec(tmp_path)
    clean = load_dataset(spec.dataset.model_copy(update={"backdoor": None}), spec.seed, spec.cache_dir)
    splits = prepare(spec).splits
    forget = splits.forget
    others = int((clean.y_train != 0).sum())
    assert len(forget) == round(0.1 * others) and (forget.y == 0).all()
    assert (clean.y_train[forget.index] != 0).all()  # drawn from the other classes, relabelled
    x = forget.x
    assert (x[..., -2:, -2:] == 1.0).all()  # the trigger, every channel
    np.testing.assert_array_equal(x[..., :-2, :], clean.x_train[forget.index][..., :-2, :])  # the rest untouched
    assert len(splits.retain) == len(clean.y_train) - len(forget)  # retrain = the clean data
    triggered = splits.triggered
    assert (triggered.y == 0).all() and set(triggered.index) == set(splits.test.index) - set(
        splits.test.index[splits.test.y == 0])  # the reported test rows of the other classes
    assert (triggered.x[..., -2:, -2:] == 1.0).all() and not (splits.test.x[..., -2:, -2:] == 1.0).all()


def test_a_fraction_of_the_poisoned_rows_is_forgotten_and_the_rest_retained(tmp_path):
    from unlearn.job import prepare

    every = prepare(_spec(tmp_path)).splits
    tenth = prepare(_spec(tmp_path, forget={"kind": "backdoor", "fraction": 0.1})).splits
    assert len(tenth.forget) == round(0.1 * len(every.forget))
    assert set(tenth.forget.index) < set(every.forget.index)
    assert len(tenth.retain) == len(every.train) - len(tenth.forget)  # retrain keeps the other 90%


def test_the_original_learns_the_backdoor_and_retrain_on_clean_data_does_not(tmp_path):
    from unlearn.job import run_job

    methods = [{"name": "retrain"}, {"name": "ft", "params": {"epochs": 3}},
               {"name": "delete", "params": {"mask_label": 0, "epochs": 20}}]
    results = run_job(_spec(tmp_path, methods=methods), tmp_path / "out", progress="quiet")["methods"]
    original, retrain = results["original"], results["retrain"]
    assert original["ASR"] >= 90 and retrain["ASR"] <= 10
    assert original["clean_TA"] == original["TA"] and retrain["clean_TA"] >= original["clean_TA"] - 3
    assert results["delete"]["ASR"] < original["ASR"] - 50  # the seed method removes it
    assert results["ft"]["ASR"] > results["delete"]["ASR"]


def test_backdoor_forgetting_on_clean_data_is_one_line_exit_2(tmp_path, capsys):
    job = {"name": "x", "dataset": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]},
           "train": {"epochs": 1}, "forget": {"kind": "backdoor"}, "methods": [{"name": "ft"}],
           "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(tmp_path / "cache")}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    codes: list[int] = []
    cli.main(["run", str(tmp_path / "job.yaml"), "--out", str(tmp_path / "out")], exit=codes.append)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert codes == [2] and len(err) == 1 and "set dataset.backdoor" in err[0]


@pytest.mark.parametrize("backdoor, field", [({"target": 10}, "dataset.backdoor.target"),
                                             ({"target": 0, "patch": 8}, "dataset.backdoor.patch")])
def test_a_backdoor_the_data_cannot_hold_is_one_line(tmp_path, capsys, backdoor, field):
    from unlearn.errors import BadInput
    from unlearn.job import prepare

    with pytest.raises(BadInput, match=field):
        prepare(_spec(tmp_path, **{"backdoor": backdoor}))
