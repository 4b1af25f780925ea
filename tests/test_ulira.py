"""Per-example privacy (U-LiRA): the attack's maths, its shadows on Ray, and what it says of real models."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.evaluation.ulira import attack, fit_shadows, logit_confidence, membership_plan, tpr_at_fpr


def test_every_row_is_in_exactly_its_share_of_the_shadows():
    plan = membership_plan(500, 16, seed=3, share=0.5)
    assert plan.shape == (16, 500) and (plan.sum(axis=0) == 8).all()
    assert 0.4 < plan[0].mean() < 0.6  # each shadow holds about half the rows
    assert (membership_plan(500, 16, seed=3, share=0.5) == plan).all()  # deterministic from the seed
    assert not (membership_plan(500, 16, seed=4, share=0.5) == plan).all()
    assert membership_plan(50, 4, seed=0, share=1.0).all()  # share 1: every shadow trains on every row
    with pytest.raises(ValueError):
        membership_plan(50, 2, seed=0, share=0.5)  # one shadow per side cannot give a spread


def test_logit_confidence_is_the_log_odds_of_the_label_and_stays_finite():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [800.0, 0.0, -800.0]])
    y = np.array([0, 2, 0])
    p = torch.softmax(logits[:2].double(), dim=1).numpy()
    naive = np.log(p[[0, 1], y[:2]]) - np.log(1 - p[[0, 1], y[:2]])
    phi = logit_confidence(logits, y)
    assert phi[:2] == pytest.approx(naive, abs=1e-9)
    assert np.isfinite(phi[2]) and phi[2] == pytest.approx(800.0, abs=1e-6)  # p_y rounds to 1 in floats


def _shadows(rng, mu_u, mu_r, k=16):
    rows = len(mu_u)
    return mu_u + rng.normal(size=(k, rows)), mu_r + rng.normal(size=(k, rows))


def test_the_attack_separates_what_differs_and_not_what_does_not():
    rng = np.random.default_rng(0)
    mu_r = rng.normal(3.0, 2.0, size=2000)  # rows differ in hardness; the test is per row
    holds = np.ones((16, 2000), dtype=bool)
    # a model that kept what it should have forgotten: its rows sit 2 std above retrain's
    u, r = _shadows(rng, mu_r + 2.0, mu_r)
    fit = fit_shadows(u, holds, r, holds)
    leaky = attack(fit, mu_r + 2.0 + rng.normal(size=2000), mu_r + rng.normal(size=2000))
    assert leaky["ULiRA_BA"] > 80 and leaky["ULiRA_TPR"] > 20 and leaky["ULiRA_n"] == 4000
    # a model indistinguishable from retrain
    u, r = _shadows(rng, mu_r, mu_r)
    fit = fit_shadows(u, holds, r, holds)
    fair = attack(fit, mu_r + rng.normal(size=2000), mu_r + rng.normal(size=2000))
    assert abs(fair["ULiRA_BA"] - 50) < 4 and fair["ULiRA_TPR"] < 5
    # only the shadows that held a row count for it on the unlearned side
    u_half = np.where(membership_plan(2000, 16, 1, 0.5), u, np.nan)
    fit = fit_shadows(np.nan_to_num(u_half), membership_plan(2000, 16, 1, 0.5), r, holds)
    assert np.isfinite(fit.mu_u).all()


def test_tpr_at_one_percent_fpr_counts_the_positives_above_the_allowed_negatives():
    neg = np.arange(200.0)  # 1% of 200: two negatives (198, 199) may score above the threshold, which is 197
    assert tpr_at_fpr(np.array([196.5, 197.5, 300.0, 0.0]), neg, 0.01) == 0.5
    assert tpr_at_fpr(np.array([1.0]), np.array([0.0]), 0.01) == 1.0  # no negative may be above: threshold 0


def _job(tmp_path, **eval_):
    from unlearn import spec as spec_mod

    return spec_mod.validate({
        "name": "ulira", "dataset": {"name": "digits"}, "model": {"name": "mlp", "hidden": [64]},
        "train": {"epochs": 10, "batch_size": 128, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}},
        "forget": {"kind": "random", "fraction": 0.15},
        "methods": [{"name": "retrain"}, {"name": "ga", "params": {"epochs": 2, "lr": 0.02}}],
        "eval": {"shadow_models": 4, **eval_}, "ray": {"enabled": False}, "tracking": {"enabled": False},
        "cache_dir": str(tmp_path / "cache")})


def test_the_attack_tells_the_original_from_retrain_better_than_an_independent_retrain(tmp_path):
    """In one process, 4 shadows: the original (trained on the forget rows) scores above an independent retrain;
    every row gets the numbers; shadow originals and retrains are cached and give the same numbers again."""
    from unlearn.job import run_job

    spec = _job(tmp_path)
    first = run_job(spec, tmp_path / "a", progress="quiet")["methods"]
    for row in ("original", "retrain", "ga"):
        assert {"ULiRA_BA", "ULiRA_TPR", "ULiRA_n"} <= set(first[row]) and 0 <= first[row]["ULiRA_BA"] <= 100
    assert first["original"]["ULiRA_n"] == 2 * 202  # each of the 202 forget rows attacked twice
    assert first["original"]["ULiRA_BA"] > first["retrain"]["ULiRA_BA"] + 5
    assert abs(first["retrain"]["ULiRA_BA"] - 50) < 10
    cached = sorted(p.name for p in (tmp_path / "cache" / "models").glob("shadow-*.pt"))
    assert len(cached) == 8  # 4 shadow originals + 4 shadow retrains
    again = run_job(spec, tmp_path / "b", progress="quiet")["methods"]
    assert {r: again[r]["ULiRA_BA"] for r in again} == {r: first[r]["ULiRA_BA"] for r in first}


def test_shadow_tasks_on_ray_compute_what_one_process_does_and_are_never_the_attacked_model(ray_session, tmp_path):
    from unlearn import shadows
    from unlearn.job import prepare, request_for
    from unlearn.training import original_request

    spec = _job(tmp_path, shadow_share=0.5)
    prep = prepare(spec)
    s = prep.splits
    ref, ga = (request_for(prep, e, None, m) for e, m in zip(spec.methods, prep.methods))
    plan = shadows.plan_shadows(4, spec.seed, s.train, s.forget, s.retain, s.remain,
                                original_request(spec, s, prep.input_shape, prep.task), ref, [ga],
                                {"original": "t-o", "retrain": "t-r"}, tmp_path / "cache", share=0.5)
    job_seeds = {spec.seed}
    for work in plan.works:  # no shadow run shares the job's seed, hence its model
        runs = [work.retrain, *work.methods] + ([work.original] if work.original else [])
        assert not {r.seed for r in runs} & job_seeds
        if work.original is not None:  # and it trains on a half, the job's original on everything
            assert len(work.original.retain) < len(s.train)
    on_ray = {r.k: r.phi for r in shadows.run_works(plan, use_ray=True, say=lambda line: None)}
    for work in plan.works:
        work.cached = {}  # train again, in this process
    here = {r.k: r.phi for r in shadows.run_works(plan, use_ray=False, say=lambda line: None)}
    assert sorted(on_ray) == sorted(here) == [-1, 0, 1, 2, 3]
    for k in here:
        for label in here[k]:
            np.testing.assert_allclose(on_ray[k][label], here[k][label], atol=1e-3, err_msg=f"{k}/{label}")


def test_the_attack_is_asked_for_where_it_cannot_run(tmp_path):
    from unlearn import spec as spec_mod
    from unlearn.errors import SpecError
    from unlearn.job import prepare

    with pytest.raises(SpecError, match="shadow"):
        spec_mod.validate({**_job(tmp_path).model_dump(mode="json"), "eval": {"shadow_models": 3}})
    with pytest.raises(SpecError, match="shadow"):
        spec_mod.validate({**_job(tmp_path).model_dump(mode="json"), "eval": {"shadow_models": 4,
                                                                              "shadow_share": 0.25}})
    no_retrain = spec_mod.validate({**_job(tmp_path).model_dump(mode="json"), "methods": [{"name": "ga"}]})
    with pytest.raises(SpecError, match="needs the job's retrain"):
        prepare(no_retrain)


def test_a_method_that_fails_on_a_shadow_loses_its_numbers_not_the_attack(tmp_path):
    from dataclasses import replace

    from unlearn import shadows
    from unlearn.job import prepare, request_for
    from unlearn.training import original_request

    spec = _job(tmp_path)
    prep = prepare(spec)
    s = prep.splits
    ref, ga = (request_for(prep, e, None, m) for e, m in zip(spec.methods, prep.methods))
    exploding = replace(ga, label="ga-exploding", params=ga.params.model_copy(update={"lr": 1e12}))
    plan = shadows.plan_shadows(4, spec.seed, s.train, s.forget, s.retain, s.remain,
                                original_request(spec, s, prep.input_shape, prep.task), ref, [ga, exploding],
                                {"original": "f-o", "retrain": "f-r"}, tmp_path / "cache")
    results = shadows.run_works(plan, use_ray=False, say=lambda line: None)
    assert all("ga-exploding" in r.failed and "diverge" in r.failed["ga-exploding"].lower() for r in results if r.k >= 0)
    attacked = {"original": results[0].phi[shadows.ORIGINAL], "retrain": results[0].phi[shadows.RETRAIN],
                "ga": results[0].phi["ga"], "ga-exploding": results[0].phi["ga"]}
    numbers, _ = shadows.score(plan, results, attacked, "retrain", ["ga", "ga-exploding"])
    assert "ga-exploding" not in numbers and {"ga", "original", "retrain"} <= set(numbers)
