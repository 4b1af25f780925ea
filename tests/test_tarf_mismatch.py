"""TARF's `identify: otsu` option (label-domain mismatch): the fitted cut, per-label identification, re-identification.

The option must never read the hidden target (its size or labels): only the scores of the retain stream, its own
labels and the two models. Small constructed cases; the measured benchmark is benchmarks/tarf_mismatch.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from unlearn import methods
from unlearn.methods.tarf import TARFParams, drop_above_otsu, label_means, otsu_threshold

from test_methods_maths import frozen, make_batches, make_ctx, on_two_workers, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def test_paper_rule_stays_the_default():
    p = TARFParams()
    assert (p.identify, p.identify_score, p.identify_by, p.identify_every) == ("top_quantile", "abs_delta", "sample", 0.0)
    assert p.beta_quantile == 0.1


@pytest.mark.parametrize("n_high", [30, 170])
def test_otsu_cut_follows_the_scores_not_a_share(n_high):
    """Two groups of scores: the cut falls between them whether the high group is 15% or 85% of the rows."""
    gen = torch.Generator().manual_seed(n_high)
    low = 1.0 + 0.3 * torch.rand(200 - n_high, generator=gen)
    high = 5.0 + 0.3 * torch.rand(n_high, generator=gen)
    scores = torch.cat([low, high])
    beta = otsu_threshold(scores)
    assert 1.3 <= beta < 5.0
    index = torch.randperm(200, generator=gen)
    tau, beta2 = drop_above_otsu(scores, index, 200)
    assert beta2 == beta and int((tau == 0).sum()) == n_high
    assert torch.all(tau[index[200 - n_high:]] == 0)
    shuffled = torch.randperm(200, generator=gen)  # the order the shards arrive in does not matter
    assert otsu_threshold(scores[shuffled]) == beta
    assert otsu_threshold(torch.full((10,), 2.0)) == float("inf")  # one value: nothing is cut


def test_label_means_score_each_row_by_its_label():
    scores = torch.tensor([1.0, 3.0, 10.0, 20.0, 5.0])
    labels = torch.tensor([0, 0, 2, 2, 7])
    assert torch.equal(label_means(scores, labels), torch.tensor([2.0, 2.0, 15.0, 15.0, 5.0]))


def _moved_on_label(model: nn.Module, label: int, by: float = 6.0) -> nn.Module:
    """The model with its logit of `label` pushed down: its loss rises on exactly the rows of that label."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        moved[-1].bias[label] -= by
    return moved


@pytest.mark.parametrize("by", ["sample", "label"])
def test_option_finds_the_rows_the_model_moved_on(by):
    """A constructed case: the current model differs from the original on one label's rows only; the option
    identifies those rows, whatever their share (here 1/5 of the retain stream, not the paper's 10%)."""
    original = tiny_model(40)
    forget, retain = make_batches(2, 8, seed=41, labels=2), make_batches(10, 8, seed=42, start=300)
    method = methods.build("tarf", {"batch_size": 8, "identify": "otsu", "identify_by": by})
    ctx = make_ctx(method, _moved_on_label(original, 3), frozen(original), forget, retain)
    method.setup(ctx)
    method.identify(ctx)
    index = torch.cat([b.index for b in retain])
    y = torch.cat([b.y for b in retain])
    identified = set(torch.nonzero(method.tau == 0).flatten().tolist())
    moved = set(index[y == 3].tolist())
    assert identified == moved
    assert set(method.diagnostics()["identified_rows"].tolist()) == moved


def test_option_tau_does_not_depend_on_the_hidden_target(tmp_path):
    """Two jobs with the same forget set and remain stream but different target concepts (target mismatch on
    superclass 1 given class 4, and class forgetting of class 4) give the method the same streams, hence the same
    τ: nothing about the hidden target reaches the cut."""
    from unlearn.data import load_dataset
    from unlearn.data.scenarios import make_splits
    from unlearn.spec import DatasetSpec, ForgetSpec

    ds = load_dataset(DatasetSpec(name="digits"), 0, tmp_path)
    taus = []
    for forget_spec in (ForgetSpec(kind="concept", mismatch="target", target=1, given=[ds.classes_of(1)[0]]),
                        ForgetSpec(kind="class", classes=[ds.classes_of(1)[0]])):
        splits = make_splits(ds, forget_spec, 0)
        torch.manual_seed(0)
        original = nn.Sequential(nn.Flatten(), nn.Linear(int(np.prod(ds.input_shape)), 16), nn.ReLU(),
                                 nn.Linear(16, splits.num_outputs))
        current = copy.deepcopy(original)
        with torch.no_grad():
            for p in current.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))

        def batches(split):
            x, y, index = torch.tensor(split.x), torch.tensor(split.y), torch.tensor(split.index)
            return [methods.Batch(x[i:i + 64], y[i:i + 64], index[i:i + 64]) for i in range(0, len(y), 64)]

        method = methods.build("tarf", {"identify": "otsu", "identify_by": "label"})
        ctx = make_ctx(method, current, frozen(original), batches(splits.forget), batches(splits.remain))
        method.setup(ctx)
        method.identify(ctx)
        taus.append((method.tau, splits))
    (tau_a, a), (tau_b, b) = taus
    assert np.array_equal(a.forget.index, b.forget.index) and np.array_equal(a.remain.index, b.remain.index)
    assert not np.array_equal(a.target.index, b.target.index)  # the hidden target differs ...
    assert torch.equal(tau_a, tau_b)  # ... and the cut does not see it


@pytest.mark.parametrize("by", ["sample", "label"])
def test_option_threshold_on_two_workers_equals_one_worker(by):
    model = tiny_model(43)
    forget, retain = make_batches(2, 8, seed=44, labels=2), make_batches(6, 8, seed=45, start=500)
    params = {"batch_size": 8, "identify": "otsu", "identify_by": by, "identify_score": "log_ratio"}

    def run(ctx_forget, ctx_retain, comm=None):
        net = copy.deepcopy(model)
        method = methods.build("tarf", params)
        ctx = make_ctx(method, net, frozen(model), ctx_forget, ctx_retain, comm=comm)
        ctx.retain_size = 48
        method.setup(ctx)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        method.identify(ctx)
        return method.tau, method.threshold

    tau_one, beta_one = run(forget, retain)
    assert 0 < int((tau_one[500:548] == 0).sum()) < 48
    for tau, beta in on_two_workers(lambda rank, comm: run(forget[rank::2], retain[rank::2], comm)):
        assert torch.equal(tau, tau_one) and beta == beta_one


def test_reidentification_runs_during_phase_two_only():
    """identify_every: again every so many steps while k > 0 (phase II), never in phase III; the default, once."""
    model = tiny_model(46)
    forget, retain = make_batches(2, 8, seed=47, labels=4), make_batches(4, 8, seed=48, start=100)

    def identified_at(params):
        method = methods.build("tarf", {"batch_size": 8, "k0": 0.2, "t0_epochs": 3, "t1_epochs": 1, "lr": 0.05,
                                        **params})
        ctx = make_ctx(method, copy.deepcopy(model), frozen(model), forget, retain, total_steps=20)
        method.setup(ctx)
        calls = []
        identify = method.identify
        method.identify = lambda c: (calls.append(c.step), identify(c))
        for step in range(20):
            ctx.step = step
            method.step(ctx, forget[step % 2], retain[step % 4])
        return calls

    assert identified_at({}) == [4]  # the paper: once at t1 (1 epoch = 4 steps)
    assert identified_at({"identify": "otsu", "identify_every": 0.5}) == [4, 6, 8, 10]  # every 2 steps until t0 = 12
