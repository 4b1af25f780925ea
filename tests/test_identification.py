"""Identification precision and recall: a method's own guess at the hidden target, scored by the job."""

from __future__ import annotations

import numpy as np
import pytest


def test_precision_and_recall_against_the_hidden_rows():
    from unlearn.evaluation.identification import identification

    target, forget = np.arange(0, 20), np.arange(0, 10)  # rows 10..19 are the hidden rest of the target
    scored = identification({"identified_rows": np.array([10, 11, 12, 13, 50, 51, 52, 53])}, target, forget)
    assert scored == {"id_precision": 50.0, "id_recall": 40.0, "identified": 8.0}
    assert identification({"identified_rows": np.array([1, 2])}, forget, forget) == {}  # nothing hidden
    assert identification({}, target, forget) == {}


def test_tarf_reports_its_identification_under_target_mismatch(tmp_path):
    """TARF's τ = 0 rows come back through `diagnostics()` and land in the results beside FA."""
    from unlearn import spec as spec_mod
    from unlearn.job import run_job

    spec = spec_mod.validate({
        "name": "identification", "dataset": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 15, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}},
        "forget": {"kind": "concept", "mismatch": "target", "target": 3}, "methods": [{"name": "tarf"}],
        "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(tmp_path / "cache")})
    tarf = run_job(spec, tmp_path / "out", progress="quiet")["methods"]["tarf"]
    assert 0 <= tarf["id_precision"] <= 100 and 0 <= tarf["id_recall"] <= 100
    remain = 1347 - 137  # digits' training part minus the given class
    assert tarf["identified"] == pytest.approx(round(0.1 * remain), abs=2)  # the paper's top-10% cut
