"""Metrics behave as the seeds define them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from unlearn.evaluation.metrics import accuracy_from_probs, gap, kl_divergence
from unlearn.evaluation.mia import mia_efficacy
from unlearn.schedules import SCHEDULE_KINDS, schedule


def _probs(conf: np.ndarray, n_classes: int = 3) -> np.ndarray:
    """Rows whose true-label (0) probability is `conf`, the rest spread evenly."""
    p = np.repeat(((1 - conf) / (n_classes - 1))[:, None], n_classes, axis=1)
    p[:, 0] = conf
    return p


def test_mia_calls_unseen_like_data_non_member():
    rng = np.random.default_rng(0)
    members = _probs(rng.uniform(0.95, 1.0, 400))
    non_members = _probs(rng.uniform(0.3, 0.7, 400))
    y = np.zeros(400, dtype=int)
    unseen = _probs(rng.uniform(0.3, 0.7, 100))
    seen = _probs(rng.uniform(0.95, 1.0, 100))
    assert mia_efficacy(members, y, non_members, y, unseen, y[:100]) >= 90
    assert mia_efficacy(members, y, non_members, y, seen, y[:100]) <= 10


def test_gap_is_mean_absolute_difference():
    assert gap({"FA": 10, "RA": 90, "TA": 80, "MIA": 50}, {"FA": 0, "RA": 100, "TA": 80, "MIA": 70}) == 10.0


def test_kl_zero_for_identical_and_positive_otherwise():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert kl_divergence(p, p) == pytest.approx(0.0, abs=1e-9)
    assert kl_divergence(p, p[:, ::-1]) > 0.5


def test_accuracy_percent():
    assert accuracy_from_probs(np.eye(4), np.array([0, 1, 2, 0])) == 75.0
    assert math.isnan(accuracy_from_probs(np.zeros((0, 4)), np.zeros(0, dtype=int)))


@pytest.mark.parametrize("kind", SCHEDULE_KINDS)
def test_every_schedule_starts_at_k0_and_reaches_zero_at_t0(kind):
    k = schedule(kind, 0.5, 10)
    assert k(0) == pytest.approx(0.5)
    assert k(10) == 0.0 and k(25) == 0.0
    values = [k(t) for t in np.linspace(0, 9.99, 50)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:]))  # non-increasing
    assert all(v > 0 for v in values)


def test_unknown_schedule_kind_lists_the_allowed():
    with pytest.raises(ValueError, match="cosine"):
        schedule("sawtooth", 1.0, 1.0)


def test_a_model_whose_outputs_overflow_is_a_diverged_run_in_both_evaluators():
    """Finite weights can still give inf logits and NaN probabilities: both the driver's evaluator and the
    workers' sharded one name it a diverged run instead of failing inside the MIA's SVM."""
    import torch
    from torch import nn

    from unlearn.comm import LocalComm
    from unlearn.data.digits import load_digits_dataset
    from unlearn.data.scenarios import make_splits
    from unlearn.errors import DivergedError
    from unlearn.evaluation import ClassificationEvaluator
    from unlearn.evaluation.sharded import EVAL_SPLITS, ShardedClassificationEvaluator
    from unlearn.shards import RowCache
    from unlearn.spec import ForgetSpec

    splits = make_splits(load_digits_dataset(0.25, 0), ForgetSpec(kind="class", classes=[3]), seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        model[1].weight.fill_(3e38)  # finite, but every logit of a non-blank image overflows
    with pytest.raises(DivergedError, match="not finite"):
        ClassificationEvaluator(splits).evaluate(model)
    eval_splits = {name: getattr(splits, name) for name in EVAL_SPLITS}
    caches = {name: RowCache(s.rows, s.index) for name, s in eval_splits.items()}
    sharded = ShardedClassificationEvaluator(eval_splits, caches, LocalComm(), torch.device("cpu"))
    with pytest.raises(DivergedError, match="not finite"):
        sharded.evaluate(model)
    model[1].weight.data.fill_(0.01)  # and a sane model still evaluates
    metrics, _ = sharded.evaluate(model)
    assert math.isfinite(metrics["RA"]) and math.isfinite(metrics["MIA"])
