"""The maths of the unlearning methods: each one's defining property, checked on small tensors.

Pure PyTorch in one process, no Ray. Two simulated workers (threads sharing an in-memory `Comm`)
show that whole-set quantities reduced through `ctx.comm` equal what one worker computes. The last
test runs every classification method on digits through the local executor and checks it unlearns.
"""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import unlearn.methods as methods
from unlearn.data.digits import load_digits_dataset
from unlearn.data.scenarios import make_splits
from unlearn.errors import SpecError
from unlearn.evaluation.metrics import accuracy
from unlearn.execution import LocalExecutor, RunRequest, new_model
from unlearn.methods.base import Batch, Context, build_optimizer, grads_of
from unlearn.methods.delete import delete_loss, masked_teacher_probs
from unlearn.methods.ghr import ghr_loss
from unlearn.methods.grogu import combine_gradients
from unlearn.methods.gsr import gsr_loss
from unlearn.methods.sfr_on import adaptive_weights
from unlearn.methods.tarf import drop_top_scores
from unlearn.methods.whole_set import fisher_diagonal, flatten, mean_gradient
from unlearn.params import MethodParams, bounds, field_doc
from unlearn.spec import ForgetSpec, MLPSpec
from unlearn.tasks import classification_loss, classification_rows
from unlearn.training import empty_split

NUM_CLASSES = 5
FEATURES = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


# --- small fixtures -------------------------------------------------------------------------------

def tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))


def make_batches(n_batches: int, size: int, seed: int, labels: int | None = None, start: int = 0) -> list[Batch]:
    """Batches of random inputs with global indices start, start+1, ... (all one label when `labels` is set)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for b in range(n_batches):
        x = torch.randn(size, FEATURES, generator=gen)
        y = (torch.full((size,), labels) if labels is not None
             else torch.randint(0, NUM_CLASSES, (size,), generator=gen))
        out.append(Batch(x, y, torch.arange(start + b * size, start + (b + 1) * size)))
    return out


def make_ctx(method: methods.Method, model: nn.Module, original: nn.Module, forget: list[Batch], retain: list[Batch],
             comm=None, total_steps: int = 20) -> Context:
    """A one-process context over given batch lists (the shard of one simulated worker)."""
    optimizer = build_optimizer(model.parameters(), method.params)
    ctx = Context(model=model, module=model, original=original, optimizer=optimizer, params=method.params,
                  loss=classification_loss, rows=classification_rows, task="classification", num_classes=NUM_CLASSES,
                  forget_size=sum(len(b.y) for b in forget), retain_size=sum(len(b.y) for b in retain),
                  forget_batches=lambda: iter(forget), retain_batches=lambda: iter(retain), total_steps=total_steps)
    if comm is not None:
        ctx.comm = comm
    return ctx


def frozen(model: nn.Module) -> nn.Module:
    original = copy.deepcopy(model).eval()
    for p in original.parameters():
        p.requires_grad_(False)
    return original


class ThreadComm:
    """Collectives between threads that play the workers: every rank posts, waits, reads all posts."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.barrier_ = threading.Barrier(world_size)
        self.posts: list[torch.Tensor | None] = [None] * world_size

    def for_rank(self, rank: int) -> "RankComm":
        return RankComm(self, rank)


class RankComm:
    def __init__(self, shared: ThreadComm, rank: int) -> None:
        self.shared, self.rank, self.world_size = shared, rank, shared.world_size

    def _exchange(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.shared.posts[self.rank] = tensor.detach().clone()
        self.shared.barrier_.wait()
        posts = list(self.shared.posts)
        self.shared.barrier_.wait()  # nobody overwrites a post before everyone has read it
        return posts

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        stacked = torch.stack(self._exchange(tensor))
        reduced = {"sum": stacked.sum(0), "max": stacked.max(0).values, "min": stacked.min(0).values}[op]
        tensor.copy_(reduced)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(tensor))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        tensor.copy_(self._exchange(tensor)[src])
        return tensor

    def barrier(self) -> None:
        self.shared.barrier_.wait()


def on_two_workers(work):
    """Run `work(rank, comm)` on two threads sharing a ThreadComm; return both results in rank order."""
    shared = ThreadComm(2)
    results: list = [None, None]
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            results[rank] = work(rank, shared.for_rank(rank))
        except BaseException as err:  # surface a worker's failure in the test
            errors.append(err)
            shared.barrier_.abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    return results


# --- DELETE and CURE ------------------------------------------------------------------------------

def test_delete_target_puts_zero_mass_on_the_masked_class():
    torch.manual_seed(0)
    teacher = torch.randn(16, NUM_CLASSES) * 5
    teacher[:, 2] += 30  # a teacher very sure of the class being forgotten
    labels = torch.randint(0, NUM_CLASSES, (16,))
    for temperature in (1.0, 4.0):
        target = masked_teacher_probs(teacher, labels, temperature)
        assert torch.all(target[torch.arange(16), labels] == 0)
        assert torch.allclose(target.sum(1), torch.ones(16))
    backdoor = masked_teacher_probs(teacher, torch.full((16,), 2), 1.0)
    assert torch.all(backdoor[:, 2] == 0)


def test_delete_keeps_the_teachers_dark_knowledge_on_the_other_classes():
    torch.manual_seed(1)
    teacher = torch.randn(8, NUM_CLASSES)
    labels = torch.zeros(8, dtype=torch.long)
    target = masked_teacher_probs(teacher, labels, 1.0)
    kept = torch.softmax(teacher[:, 1:], dim=1)
    assert torch.allclose(target[:, 1:], kept, atol=1e-6)


def test_gsr_at_temperature_one_equals_deletes_loss():
    torch.manual_seed(2)
    student, teacher = torch.randn(12, NUM_CLASSES), torch.randn(12, NUM_CLASSES) * 3
    labels = torch.full((12,), 3)  # a class-forgetting batch: every sample of the forgotten class
    forgotten = torch.zeros(NUM_CLASSES, dtype=torch.bool)
    forgotten[3] = True
    gsr = gsr_loss(student, teacher, forgotten, 1.0)
    delete = delete_loss(student, teacher, labels, 1.0)
    assert gsr.item() > 0
    assert torch.allclose(gsr, delete, rtol=1e-5, atol=1e-7)


def test_ghr_relabels_to_the_teachers_best_kept_class():
    teacher = torch.tensor([[5.0, 1.0, 4.0, 0.0, 0.0], [0.0, 9.0, 0.0, 8.5, 0.0]])
    forgotten = torch.tensor([True, False, False, False, False])
    student = torch.zeros(2, NUM_CLASSES, requires_grad=True)
    ghr_loss(student, teacher, forgotten).backward()
    # the gradient of CE pushes up exactly the relabelled class: class 2 for row 0 (0 is forgotten), 1 for row 1
    assert student.grad[0].argmin().item() == 2 and student.grad[1].argmin().item() == 1


def test_grogu_removes_the_conflicting_component_and_sums_when_they_agree():
    g_soft = torch.tensor([1.0, 0.0, 2.0])
    g_hard = torch.tensor([-3.0, 1.0, 0.5])  # g_H · g_S = -2 < 0: conflict
    combined, projected = combine_gradients(g_hard, g_soft, "conflict")
    assert projected
    assert torch.dot(combined - g_soft, g_soft).abs() < 1e-6  # g_H' ⟂ g_S
    assert torch.dot(combined, g_soft) >= -1e-6
    agreeing = torch.tensor([1.0, 1.0, 1.0])
    combined, projected = combine_gradients(agreeing, g_soft, "conflict")
    assert not projected and torch.equal(combined, agreeing + g_soft)
    combined, projected = combine_gradients(agreeing, g_soft, "always")
    assert projected and torch.dot(combined - g_soft, g_soft).abs() < 1e-6


def test_grogu_step_writes_the_combined_gradient_of_both_objectives():
    model = tiny_model(3)
    original = frozen(tiny_model(4))  # a different teacher, so GSR and GHR gradients differ
    forget = make_batches(1, 16, seed=5, labels=1)
    method = methods.build("grogu", {"lr": 0.1})
    ctx = make_ctx(method, model, original, forget, make_batches(1, 8, seed=6))
    method.setup(ctx)
    probe = copy.deepcopy(model)
    batch = forget[0]
    teacher = original(batch.x)
    gsr_loss(probe(batch.x), teacher, method.forgotten, 1.0).backward()
    g_soft = flatten(grads_of(probe))
    probe.zero_grad()
    ghr_loss(probe(batch.x), teacher, method.forgotten).backward()
    g_hard = flatten(grads_of(probe))
    expected, _ = combine_gradients(g_hard, g_soft, "conflict")
    method.step(ctx, batch, None)
    written = flatten(grads_of(model))
    assert torch.allclose(written, expected, atol=1e-6)
    assert torch.dot(written, g_soft) >= -1e-6


def test_cure_refuses_to_mask_every_class():
    model = tiny_model()
    forget = [Batch(torch.randn(NUM_CLASSES, FEATURES), torch.arange(NUM_CLASSES), torch.arange(NUM_CLASSES))]
    method = methods.build("gsr", {})
    with pytest.raises(SpecError, match=r"^params\.mask_classes: every class would be masked") as refused:
        method.setup(make_ctx(method, model, frozen(model), forget, forget))
    assert refused.value.field == "params.mask_classes"


# --- SFR-on ---------------------------------------------------------------------------------------

def naive_fisher(model: nn.Module, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """Mean over batches of the squared gradient of the batch-mean loss, the plain way."""
    probe = copy.deepcopy(model)
    for p in probe.parameters():
        p.requires_grad_(True)
    total = {n: torch.zeros_like(p) for n, p in probe.named_parameters()}
    for batch in batches:
        probe.zero_grad()
        F.cross_entropy(probe(batch.x), batch.y).backward()
        for n, p in probe.named_parameters():
            total[n] += p.grad.square()
    return {n: t / len(batches) for n, t in total.items()}


def test_sfr_on_mask_is_the_forget_retain_fisher_ratio_above_gamma():
    model = tiny_model(7)
    forget, retain = make_batches(3, 8, seed=8, labels=2), make_batches(5, 8, seed=9, start=100)
    for gamma in (1.0, 3.0):
        method = methods.build("sfr_on", {"gamma": gamma})
        method.setup(make_ctx(method, model, frozen(model), forget, retain))
        f_forget, f_retain = naive_fisher(model, forget), naive_fisher(model, retain)
        for name, f in f_forget.items():
            expected = ((f + 1e-15) / (f_retain[name] + 1e-15) >= gamma).float()
            assert torch.equal(method.mask[name], expected), name
        share = flatten(method.mask).mean().item()
        assert 0.0 < share < 1.0


def test_sfr_on_ascent_weights_sum_to_one_and_fall_with_the_loss():
    losses = torch.tensor([0.01, 0.1, 0.5, 1.0, 3.0, 10.0])
    for lam in (0.5, 1.0):
        weights = adaptive_weights(losses, lam)
        assert torch.isclose(weights.sum(), torch.tensor(1.0))
        assert torch.all(weights[1:] < weights[:-1])
    assert torch.allclose(adaptive_weights(losses, 0.0), torch.full((6,), 1 / 6))


def test_sfr_on_saturated_losses_share_the_weight_instead_of_one_taking_it_all():
    """float32 gives a saturated sample a loss of 0: without a floor it takes the whole weight (and its
    gradient is 0, so the ascent stalls); at the floor every saturated sample weighs the same."""
    losses = torch.tensor([0.0, 1e-9, 1e-6, 0.5, 2.0])
    assert adaptive_weights(losses, 0.5)[0] > 0.999  # the release's formula
    floored = adaptive_weights(losses, 0.5, floor=1e-4)
    assert torch.allclose(floored[:3], floored[:1].expand(3)) and floored[:3].sum() > 0.9
    assert floored[3] > floored[4] > 0  # above the floor the weights still fall with the loss
    unsaturated = torch.tensor([0.01, 0.1, 1.0])
    assert torch.equal(adaptive_weights(unsaturated, 0.5, floor=1e-4), adaptive_weights(unsaturated, 0.5))


def test_sfr_on_forget_steps_come_every_fifth_iteration_with_the_adaptive_weights():
    model = tiny_model(10)
    forget, retain = make_batches(2, 8, seed=11, labels=0), make_batches(2, 8, seed=12, start=50)
    method = methods.build("sfr_on", {"lr": 0.05, "steps": 10})
    ctx = make_ctx(method, model, frozen(model), forget, retain, total_steps=10)
    method.setup(ctx)
    ctx.step = 1  # not a forget step (forget_every = 5): only the retain step runs
    logged = method.step(ctx, forget[0], retain[0])
    assert "forget_loss" not in logged and method.sample_weights is None
    with torch.no_grad():
        losses = F.cross_entropy(model(forget[0].x), forget[0].y, reduction="none")
    ctx.step = 5
    logged = method.step(ctx, forget[0], retain[0])
    expected = adaptive_weights(losses, 0.5, floor=method.params.loss_floor)
    assert logged["forget_loss"] == pytest.approx(-float((expected * losses).sum()), rel=1e-5)
    assert torch.allclose(method.sample_weights, expected)
    assert logged["forget_weight"] == pytest.approx(method.forget_weight(5))


def test_sfr_on_slow_weights_move_alpha_of_the_way_to_the_fast_ones():
    torch.manual_seed(0)
    model = tiny_model(13)
    forget, retain = make_batches(1, 8, seed=14, labels=1), make_batches(1, 8, seed=15, start=10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    full = copy.deepcopy(model)
    results = []
    for alpha, net in ((1.0, full), (0.5, model)):
        method = methods.build("sfr_on", {"alpha": alpha, "momentum": 0.0, "weight_decay": 0.0, "steps": 5,
                                          "lr_schedule": "constant", "saliency": False})
        ctx = make_ctx(method, net, frozen(net), forget, retain, total_steps=5)
        method.setup(ctx)
        ctx.step = 1  # a retain step only: the same plain SGD step for both
        method.step(ctx, forget[0], retain[0])
        results.append({n: p.detach().clone() for n, p in net.named_parameters()})
    fast, half = results
    for name in start:
        assert torch.allclose(half[name], start[name] + 0.5 * (fast[name] - start[name]), atol=1e-6)


# --- TARF -----------------------------------------------------------------------------------------

def test_tarf_tau_drops_exactly_the_top_scored_share():
    torch.manual_seed(16)
    scores = torch.rand(50)
    index = torch.randperm(200)[:50]
    tau, beta = drop_top_scores(scores, index, 0.1, 200)
    top = index[torch.topk(scores, 5).indices]
    assert int((tau[index] == 0).sum()) == 5
    assert torch.all(tau[top] == 0)
    assert beta == pytest.approx(float(torch.topk(scores, 5).values.min()))
    kept = tau[index] == 1
    assert torch.all(scores[kept] < beta)


def test_tarf_k_reaches_zero_at_t0_and_tau_follows_the_loss_change():
    model = tiny_model(17)
    forget = make_batches(2, 8, seed=18, labels=4)
    retain = make_batches(5, 8, seed=19, start=1000)  # 40 samples: 4 dropped
    method = methods.build("tarf", {"batch_size": 8, "k0": 0.5, "t0_epochs": 2, "t1_epochs": 1, "lr": 0.2})
    ctx = make_ctx(method, model, frozen(model), forget, retain, total_steps=20)
    method.setup(ctx)
    assert method.t0_steps == 10 and method.t1_steps == 5
    assert method.k(0) == pytest.approx(0.5) and method.k(method.t0_steps - 1) > 0
    assert method.k(method.t0_steps) == 0 and method.k(method.t0_steps + 3) == 0
    for step in range(method.t1_steps):
        ctx.step = step
        logged = method.step(ctx, forget[step % 2], retain[step % 5])
        assert "retain_loss" not in logged  # phase I: ascent only
    assert method.tau is None
    with torch.no_grad():
        x = torch.cat([b.x for b in retain])
        y = torch.cat([b.y for b in retain])
        change = (F.cross_entropy(model(x), y, reduction="none")
                  - F.cross_entropy(ctx.original(x), y, reduction="none")).abs()
    ctx.step = method.t1_steps
    logged = method.step(ctx, forget[0], retain[0])
    assert "retain_loss" in logged and "forget_loss" in logged  # phase II: both terms
    index = torch.cat([b.index for b in retain])
    dropped = index[torch.topk(change, 4).indices]
    assert int((method.tau[index] == 0).sum()) == 4
    assert torch.all(method.tau[dropped] == 0)
    ctx.step = method.t0_steps
    logged = method.step(ctx, forget[0], retain[0])
    assert "forget_loss" not in logged and logged["k"] == 0  # phase III: retaining only


def test_tarf_state_round_trips_through_a_checkpoint():
    model = tiny_model(20)
    forget, retain = make_batches(1, 8, seed=21, labels=1), make_batches(3, 8, seed=22)
    method = methods.build("tarf", {"batch_size": 8, "t1_epochs": 0})
    ctx = make_ctx(method, model, frozen(model), forget, retain)
    method.setup(ctx)
    method.step(ctx, forget[0], retain[0])
    state = method.state_dict()
    resumed = methods.build("tarf", {"batch_size": 8, "t1_epochs": 0})
    resumed.setup(ctx)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.tau, method.tau) and resumed.threshold == method.threshold


# --- N workers compute what one computes -----------------------------------------------------------

def test_whole_set_gradients_on_two_workers_equal_one_worker():
    model = tiny_model(23)
    batches = make_batches(6, 8, seed=24)
    method = methods.build("salun", {})
    one = make_ctx(method, model, frozen(model), batches, batches)
    fisher_one = fisher_diagonal(one, one.original, batches)
    mean_one = mean_gradient(one, one.original, batches)

    def work(rank, comm):
        ctx = make_ctx(method, model, frozen(model), batches[rank::2], batches[rank::2], comm=comm)
        return fisher_diagonal(ctx, ctx.original, batches[rank::2]), mean_gradient(ctx, ctx.original, batches[rank::2])

    for fisher_two, mean_two in on_two_workers(work):
        for name in fisher_one:
            assert torch.allclose(fisher_two[name], fisher_one[name], rtol=1e-5, atol=1e-9)
            assert torch.allclose(mean_two[name], mean_one[name], rtol=1e-5, atol=1e-7)


def test_sfr_on_mask_on_two_workers_equals_one_worker():
    model = tiny_model(25)
    forget, retain = make_batches(4, 8, seed=26, labels=3), make_batches(6, 8, seed=27, start=100)
    single = methods.build("sfr_on", {})
    single.setup(make_ctx(single, model, frozen(model), forget, retain))

    def work(rank, comm):
        method = methods.build("sfr_on", {})
        method.setup(make_ctx(method, model, frozen(model), forget[rank::2], retain[rank::2], comm=comm))
        return method.mask

    for mask in on_two_workers(work):
        assert all(torch.equal(mask[n], single.mask[n]) for n in single.mask)


def test_sfr_on_ascent_weights_on_two_workers_normalise_over_the_whole_batch():
    losses = torch.tensor([0.2, 0.4, 0.8, 1.6, 3.2, 6.4])
    whole = adaptive_weights(losses, 0.5)
    halves = on_two_workers(lambda rank, comm: adaptive_weights(losses[rank * 3:(rank + 1) * 3], 0.5, comm))
    assert torch.allclose(torch.cat(halves), whole)


def test_tarf_threshold_on_two_workers_equals_one_worker():
    model = tiny_model(28)
    forget, retain = make_batches(2, 8, seed=29, labels=2), make_batches(6, 8, seed=30, start=500)
    params = {"batch_size": 8, "lr": 0.3, "k0": 1.0, "t1_epochs": 0.5}

    def run(ctx_forget, ctx_retain, comm=None):
        torch.manual_seed(0)
        net = copy.deepcopy(model)
        method = methods.build("tarf", params)
        ctx = make_ctx(method, net, frozen(model), ctx_forget, ctx_retain, comm=comm)
        ctx.retain_size = 48  # the global size: both simulated workers count epochs like one
        method.setup(ctx)
        with torch.no_grad():  # the same ascent on every worker stands in for DDP's averaged step
            for p in net.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        method.identify(ctx)
        return method.tau, method.threshold

    tau_one, beta_one = run(forget, retain)
    for tau, beta in on_two_workers(lambda rank, comm: run(forget[rank::2], retain[rank::2], comm)):
        assert torch.equal(tau, tau_one) and beta == beta_one
    assert int((tau_one[500:548] == 0).sum()) == 5  # round(0.1 × 48)


# --- task-agnostic methods only go through ctx.loss ------------------------------------------------

class TinyDenoiser(nn.Module):
    """A class-conditional noise predictor standing in for a diffusion model."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(FEATURES + NUM_CLASSES, FEATURES)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, F.one_hot(y, NUM_CLASSES).float()], dim=1))


def noise_prediction_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample noise-MSE, drawing fresh noise every call like the diffusion task's loss."""
    noise = torch.randn_like(batch.x)
    return (model(batch.x + noise, batch.y) - noise).square().mean(dim=1)


@pytest.mark.parametrize("name", sorted(n for n, c in methods.REGISTRY.items() if "diffusion" in c.tasks))
def test_diffusion_capable_methods_run_on_a_noise_prediction_loss(name):
    torch.manual_seed(31)
    model = TinyDenoiser()
    forget, retain = make_batches(2, 8, seed=32, labels=1), make_batches(3, 8, seed=33, start=200)
    method = methods.build(name, {"batch_size": 8})
    ctx = make_ctx(method, model, frozen(model), forget, retain, total_steps=6)
    ctx.loss, ctx.task = noise_prediction_loss, "diffusion"
    ctx.sample = lambda m, labels, noise, steps, guidance: (noise - m(noise, labels)).detach()  # one denoising step
    before = flatten({n: p.detach().clone() for n, p in model.named_parameters()})
    method.setup(ctx)
    for step in range(6):
        ctx.step = step
        logged = method.step(ctx, forget[step % 2], retain[step % 3])
        assert all(np.isfinite(v) for v in logged.values())
    after = flatten({n: p.detach() for n, p in model.named_parameters()})
    assert not torch.equal(before, after)


# --- the registry ---------------------------------------------------------------------------------

IMPLEMENTED_HERE = ("rl", "l1_sparse", "salun", "scrub", "bs", "iu", "delete", "ghr", "gsr", "grogu", "sfr_on", "tarf")


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_declares_valid_defaults_and_where_they_come_from(name):
    cls = methods.get(name)
    params = cls.Params.model_validate({})
    assert cls.name == name and cls.paper and cls.summary
    assert cls.uses and cls.uses <= {"forget", "retain"}
    assert cls.tasks and cls.tasks <= {"classification", "diffusion", "language_modelling"}
    assert cls.primary in ("forget", "retain")
    assert methods.build(name, {}).params == params
    for field_name, field in cls.Params.model_fields.items():
        _, paper, search = field_doc(field)
        if name in IMPLEMENTED_HERE and field_name not in MethodParams.model_fields:
            assert paper, f"{name}.{field_name} has no paper string"
        if search and search["kind"] != "choice":
            low, high = bounds(field)
            assert low is None or search["low"] >= low, f"{name}.{field_name} search below its bound"
            assert high is None or search["high"] <= high, f"{name}.{field_name} search above its bound"


def test_the_registry_holds_every_method_of_the_product():
    assert set(IMPLEMENTED_HERE) | {"retrain", "ft", "ga"} <= set(methods.REGISTRY)


# --- every method unlearns digit 3 ------------------------------------------------------------------

# ft and ga keep their own (paper) defaults; on this small set they need a stronger budget to unlearn.
TEST_OVERRIDES = {"ft": {"lr": 0.05, "epochs": 10}, "ga": {"lr": 0.02}}
FORGETS_BY_DESIGN_ONLY = {"ga"}  # ascent alone: no retain term, RA is not protected
CLASSIFICATION_METHODS = sorted(n for n, c in methods.REGISTRY.items()
                                if n != "retrain" and "classification" in c.tasks)


@pytest.fixture(scope="module")
def digits_original(one_thread):
    """Digits, class-3 forgetting, and an MLP [64] trained 15 epochs on all training data (once)."""
    ds = load_digits_dataset(0.25, 0)
    splits = make_splits(ds, ForgetSpec(kind="class", classes=[3]), 0)
    model_spec = MLPSpec(hidden=[64])

    def request(method: str, params: dict, state, forget, retain) -> RunRequest:
        return RunRequest(label=method, method=method, params=params, model=model_spec,
                          num_outputs=splits.num_outputs, input_shape=ds.input_shape, initial_state=state,
                          forget=forget, retain=retain, seed=0)

    executor = LocalExecutor("cpu")
    train = {"epochs": 15, "lr": 0.05, "batch_size": 64}
    state = executor.run(request("retrain", train, None, empty_split(splits.train), splits.train), verbose=False).state

    def scores(weights) -> tuple[float, float]:
        model = new_model(request("ft", {}, weights, splits.forget, splits.remain))
        return accuracy(model, splits.target.x, splits.target.y), accuracy(model, splits.retain.x, splits.retain.y)

    return splits, request, executor, state, scores


@pytest.mark.parametrize("name", CLASSIFICATION_METHODS)
def test_each_method_lowers_forget_accuracy_on_digits(name, digits_original):
    splits, request, executor, state, scores = digits_original
    fa_before, ra_before = scores(state)
    assert fa_before > 90
    out = executor.run(request(name, TEST_OVERRIDES.get(name, {}), state, splits.forget, splits.remain), verbose=False)
    fa_after, ra_after = scores(out.state)
    assert fa_after <= 0.5 * fa_before, f"{name}: FA {fa_before:.1f} -> {fa_after:.1f}"
    if name not in FORGETS_BY_DESIGN_ONLY:
        assert ra_after >= ra_before - 10, f"{name}: RA {ra_before:.1f} -> {ra_after:.1f}"
    assert all(np.isfinite(v) for row in out.history for v in row.values())


@pytest.mark.parametrize("name", ["rl", "salun"])
def test_release_schedule_takes_a_forget_pass_then_a_retain_pass_each_epoch(name, digits_original):
    """`schedule: release` (the SalUn release's epoch): ceil(|D_f|/B) random-label updates, then ceil(|D_r|/B)
    retain updates, every epoch; `paired` takes both terms at every step of a retain pass."""
    import math

    splits, request, executor, state, _ = digits_original
    batch = 64
    forget_steps, retain_steps = math.ceil(len(splits.forget) / batch), math.ceil(len(splits.remain) / batch)
    out = executor.run(request(name, {"schedule": "release", "epochs": 2, "batch_size": batch}, state, splits.forget,
                               splits.remain), verbose=False)
    phases = ["forget" if "forget_loss" in row else "retain" for row in out.history]
    assert all(("forget_loss" in row) != ("retain_loss" in row) for row in out.history)  # one term per update
    assert phases == (["forget"] * forget_steps + ["retain"] * retain_steps) * 2
    paired = executor.run(request(name, {"schedule": "paired", "epochs": 1, "batch_size": batch}, state,
                                  splits.forget, splits.remain), verbose=False)
    assert len(paired.history) == retain_steps
    assert all({"forget_loss", "retain_loss"} <= set(row) for row in paired.history)


def test_tarf_phase_two_ascends_on_the_identified_samples_too():
    forget = make_batches(2, 8, seed=18, labels=4)
    retain = make_batches(5, 8, seed=19, start=1000)
    logged = {}
    for flag in (True, False):
        model = tiny_model(17)
        method = methods.build("tarf", {"batch_size": 8, "k0": 0.5, "t0_epochs": 2, "t1_epochs": 1, "lr": 0.2,
                                        "beta_quantile": 0.5, "ascend_identified": flag})
        ctx = make_ctx(method, model, frozen(model), forget, retain, total_steps=20)
        method.setup(ctx)
        for step in range(method.t1_steps + 1):
            ctx.step = step
            logged[flag] = method.step(ctx, forget[step % 2], retain[step % 5])
        batch = retain[method.t1_steps % 5]
        n_identified = int((method.tau[batch.index] == 0).sum())
    assert 0 < n_identified < 8
    assert logged[True]["identified"] == n_identified and "identified" not in logged[False]


def test_frozen_norm_stats_keep_the_running_statistics_while_update_changes_them():
    from unlearn import loop

    for setting, should_change in (("frozen", False), ("update", True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, NUM_CLASSES))
        before = model[1].running_mean.clone()
        method = methods.build("delete", {"batch_size": 8, "norm_stats": setting})
        forget = make_batches(3, 8, seed=5, labels=2)
        ctx = make_ctx(method, model, frozen(model), forget, [], total_steps=3)
        stream = type("S", (), {"size": 24, "batches": lambda self: iter(forget * 10)})()
        loop.run(method, ctx, stream, stream, verbose=False)
        changed = not torch.equal(model[1].running_mean, before)
        assert changed == should_change, setting
        model.train()  # a later train() cannot undo the freeze
        model(forget[0].x)
        assert (not torch.equal(model[1].running_mean, before)) == should_change


def test_every_method_that_sees_forget_only_batches_freezes_batchnorm_by_default():
    """One BatchNorm policy (a method may declare otherwise, with its source): a method that forwards
    forget-only batches keeps the original's running statistics; retain-only methods update them."""
    from unlearn.params import FORGET_BATCH_NORM_POLICY

    for name, cls in methods.REGISTRY.items():
        field = cls.Params.model_fields["norm_stats"]
        if "forget" in cls.uses:
            assert field.default == "frozen" and field_doc(field)[1], name
            assert FORGET_BATCH_NORM_POLICY in field_doc(field)[1] or "deviat" in field_doc(field)[1], name
        else:
            assert field.default == "update", name


def test_a_family_default_applies_to_its_model_family_unless_the_spec_sets_the_param():
    from unlearn.params import family_defaults, hparam

    class Params(MethodParams):
        lr: float = hparam(1e-3, gt=0, family={"cnn": 1e-4}, help="learning rate")

    assert family_defaults(Params, "cnn") == {"lr": 1e-4} and family_defaults(Params, "mlp") == {}
    for name, cls in methods.REGISTRY.items():  # every declared family default is valid for its field
        for family in ("mlp", "cnn", "resnet18", "ddpm"):
            values = family_defaults(cls.Params, family)
            built = methods.build(name, {}, family=family).params
            assert all(getattr(built, k) == v for k, v in values.items()), (name, family)
            if values:
                key = next(iter(values))
                default = cls.Params.model_fields[key].default
                assert getattr(methods.build(name, {key: default}, family=family).params, key) == default


def test_a_last_step_that_leaves_non_finite_weights_is_a_diverged_run():
    """The loss is checked before each update, so an update that overflows the weights on the last step must
    still fail the run as diverged (not reach the evaluation as NaN probabilities)."""
    from unlearn import loop
    from unlearn.errors import DivergedError

    class Overflowing(type(methods.build("ga", {}))):
        def step(self, ctx, forget, retain):
            logged = super().step(ctx, forget, retain)  # a finite loss...
            with torch.no_grad():
                ctx.module[0].weight.mul_(1e38).mul_(1e38)  # ...then weights past float32's range
            return logged

    model = tiny_model()
    method = Overflowing(methods.build("ga", {"batch_size": 8}).params)
    forget = make_batches(1, 8, seed=5, labels=2)
    ctx = make_ctx(method, model, frozen(model), forget, [], total_steps=1)
    stream = type("S", (), {"size": 8, "batches": lambda self: iter(forget * 2)})()
    with pytest.raises(DivergedError, match="0.weight became non-finite"):
        loop.run(method, ctx, stream, stream, verbose=False)


def test_random_relabelling_takes_any_seed():
    """Shadow models (U-LiRA) run with seeds in the millions: the relabelling hash must not overflow int64, and
    a salt equal modulo 2^32 gives the same labels (the hash works mod 2^32)."""
    import torch

    from unlearn.methods.rl import random_other_labels

    y, index = torch.arange(50) % 10, torch.arange(50)
    big = random_other_labels(y, 10, index, salt=1_000_003 * 3_000_011 + 7)
    assert (big != y).all() and big.max() < 10
    assert torch.equal(random_other_labels(y, 10, index, salt=5 + 2 ** 32), random_other_labels(y, 10, index, salt=5))
