"""`sync_norm_stats`: N CPU workers (gloo) train BatchNorm nets exactly as one process on the whole batch.

The distributed tests spawn real processes; each takes a contiguous share of fixed global batches,
trains a few SGD steps with the data-parallel loss (its rows' summed loss over the global batch size,
gradients summed over workers) and saves what it saw; the test compares that with one process running
plain BatchNorm on the whole batch. Plain BatchNorm on the shares fails every comparison.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from gloo_workers import free_port, gloo_group, spawn
from torch import nn

from unlearn.comm import LocalComm, TorchDistComm
from unlearn.loop import freeze_norm_stats
from unlearn.norm_sync import sync_norm_stats

STEPS = 3
TOL = {"rtol": 1e-5, "atol": 1e-6}
JOIN_TIMEOUT_S = 150  # under the test's 180 s: a collective out of step fails the test with its own message


def _conv() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(100, 3))


def _mlp() -> nn.Module:
    """Cumulative running average (momentum=None) and a non-affine layer."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(),
                         nn.Linear(8, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU(), nn.Linear(8, 3))


def _untracked() -> nn.Module:
    """No running statistics: batch statistics in training; evaluation would use each share's own."""
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8, track_running_stats=False), nn.ReLU(), nn.Linear(8, 3))


MODELS = {"conv": (_conv, (3, 5, 5)), "mlp": (_mlp, (6,)), "untracked": (_untracked, (6,))}

# (model, rows per worker): uneven shares, and in world 3 an empty one.
CASES = {2: [("conv", (4, 3)), ("mlp", (4, 3)), ("untracked", (4, 3))],
         3: [("conv", (3, 3, 2)), ("mlp", (4, 0, 3)), ("untracked", (3, 2, 2))]}


class _CountingComm(TorchDistComm):
    """Counts collectives, to show evaluation does none."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        self.calls += 1
        return super().all_reduce(tensor, op)


class _NoCollectives:
    """Two workers on paper; any collective fails the test."""

    world_size, rank = 2, 0

    def all_reduce(self, tensor, op="sum"):
        raise AssertionError("collective called")

    all_gather = broadcast = all_reduce

    def barrier(self):
        raise AssertionError("collective called")


def _batch(name: str, rows: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(rows, *MODELS[name][1], generator=g) * 3 + 2  # off-centre, so the mean matters
    return x, torch.randint(0, 3, (rows,), generator=g)


def _train(name: str, shares: tuple[int, ...], rank: int, comm: _CountingComm | None) -> dict:
    """STEPS SGD steps on this worker's rows (all rows when `comm` is None); everything to compare."""
    torch.manual_seed(0)
    model = MODELS[name][0]()
    if comm is not None:
        model = sync_norm_stats(model, comm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rows = sum(shares)
    lo = sum(shares[:rank])
    hi = lo + shares[rank] if comm is not None else rows
    seen: dict = {"out": [], "grad_x": [], "grads": []}
    for step in range(STEPS):
        x_all, y_all = _batch(name, rows, step)
        x = x_all[lo:hi].clone().requires_grad_(True)
        out = model(x)
        loss = F.cross_entropy(out, y_all[lo:hi], reduction="sum") / rows
        opt.zero_grad()
        loss.backward()
        if comm is not None:
            for p in model.parameters():
                comm.all_reduce(p.grad)
        seen["out"].append(out.detach())
        seen["grad_x"].append(x.grad)
        seen["grads"].append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    seen["state"] = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    before = comm.calls if comm is not None else 0
    with torch.no_grad():
        seen["eval_out"] = model(_batch(name, rows, STEPS)[0][lo:hi])
    seen["eval_calls"] = (comm.calls if comm is not None else 0) - before
    return seen


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        comm = _CountingComm()
        torch.save({name: _train(name, shares, rank, comm) for name, shares in CASES[world]},
                   Path(folder) / f"rank{rank}.pt")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("world", [2, 3])
def test_workers_match_one_process_on_the_whole_batch(world, tmp_path):
    spawn(_worker, (world, free_port(), str(tmp_path)), nprocs=world, timeout_s=JOIN_TIMEOUT_S, what="norm sync")
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, shares in CASES[world]:
        ref = _train(name, shares, 0, None)
        for step in range(STEPS):
            torch.testing.assert_close(torch.cat([s[name]["out"][step] for s in seen]), ref["out"][step], **TOL)
            torch.testing.assert_close(torch.cat([s[name]["grad_x"][step] for s in seen]), ref["grad_x"][step],
                                       **TOL)
            for s in seen:  # the summed gradient every worker steps with
                torch.testing.assert_close(s[name]["grads"][step], ref["grads"][step], **TOL)
        for s in seen:
            assert s[name]["state"].keys() == ref["state"].keys()
            torch.testing.assert_close(s[name]["state"], ref["state"], **TOL)  # weights and running statistics
            assert s[name]["eval_calls"] == 0
        if name != "untracked":  # evaluation normalises by the (now equal) running statistics
            torch.testing.assert_close(torch.cat([s[name]["eval_out"] for s in seen]), ref["eval_out"], **TOL)


def test_one_worker_gets_the_module_itself():
    model = _conv()
    assert sync_norm_stats(model, LocalComm()) is model
    assert type(model[1]) is nn.BatchNorm2d


def test_layers_keep_identity_names_and_hooks():
    model = _mlp()
    params, keys, layer = dict(model.named_parameters()), list(model.state_dict()), model[1]
    freeze_norm_stats(model)
    assert sync_norm_stats(model, _NoCollectives()) is model
    assert model[1] is layer and isinstance(layer, nn.BatchNorm1d) and layer._forward_pre_hooks
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())


def test_evaluation_and_frozen_layers_match_plain_batchnorm_without_collectives():
    torch.manual_seed(0)
    plain = _mlp()
    plain.train()
    plain(torch.randn(16, 6) + 1)  # running statistics away from their initial values
    x = torch.randn(5, 6)
    expected = plain.eval()(x)
    synced = sync_norm_stats(copy.deepcopy(plain), _NoCollectives())
    assert torch.equal(synced.eval()(x), expected)
    freeze_norm_stats(synced)
    state = copy.deepcopy(synced.state_dict())
    assert torch.equal(synced.train()(x), expected)  # the pre-hook's evaluation mode wins over train()
    assert all(torch.equal(v, state[k]) for k, v in synced.state_dict().items())
    untracked = _untracked().eval()
    assert torch.equal(sync_norm_stats(copy.deepcopy(untracked), _NoCollectives())(x), untracked(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layers_become_sync_batchnorm():
    model = _conv().cuda()
    keys = list(model.state_dict())
    model = sync_norm_stats(model, _NoCollectives())
    assert isinstance(model[1], nn.SyncBatchNorm)
    assert list(model.state_dict()) == keys
