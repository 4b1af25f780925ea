"""The unlearning methods on language models: every LLM method (ga, grad_diff, npo, simnpo, rmu) and the token-level
CURE / DELETE forms (delete, gsr, ghr, grogu) unlearn a tiny llama fit to the facts set; their token (and sequence)
means on two gloo ranks with uneven answer tokens equal one process on the union; the classifier forms of delete /
gsr / ghr / grogu give exactly the numbers of their batch-mean formulas; the LM defaults, LoRA runs and the errors
(RMU's layer, DELETE's mask_label).

One original (a 2-layer llama fit to 30 entities' facts) is shared by the module; one spawn of two workers runs every
two-process scenario and saves what it saw, compared here with the same steps in one process.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gloo_workers import free_port, gloo_group, spawn
from torch import nn

import unlearn.methods as methods
from unlearn.batch import Batch
from unlearn.comm import LocalComm, TorchDistComm
from unlearn.data.qa_batches import QABatch, pack_rows
from unlearn.errors import SpecError
from unlearn.execution import LocalExecutor, RunRequest, new_model
from unlearn.lm_task import lm_loss, token_rows
from unlearn.methods.base import Context, build_optimizer, grads_of
from unlearn.methods.delete import delete_loss
from unlearn.methods.ghr import ghr_loss
from unlearn.methods.grogu import combine_gradients
from unlearn.methods.gsr import gsr_loss
from unlearn.methods.whole_set import flatten
from unlearn.tasks import classification_loss, classification_rows
from unlearn.training import empty_split

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

LM_METHODS = ("ga", "grad_diff", "npo", "simnpo", "rmu", "delete", "gsr", "ghr", "grogu")
# GA keeps its classifier defaults (SGD 1e-3, 3 epochs: 4 steps here, which move nothing); the LLM recipe instead
TEST_OVERRIDES = {"ga": {"optimizer": "adamw", "lr": 1e-4, "epochs": 10, "batch_size": 32, "weight_decay": 0.01}}
FIT = {"optimizer": "adamw", "lr": 3e-3, "steps": 300, "batch_size": 32, "weight_decay": 0.0, "lr_schedule": "cosine"}


def _job(cache: Path, lora: dict | None = None) -> dict:
    model = {"name": "causal_lm", "config": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2}}
    if lora is not None:
        model["lora"] = lora
    return {"name": "t", "dataset": {"name": "facts", "facts": {"num_entities": 30}}, "model": model,
            "forget": {"kind": "class", "fraction": 0.1}, "methods": [{"name": "retrain"}], "cache_dir": str(cache)}


class Fitted:
    """The facts job, an original fit to all its training rows, and how to score a state."""

    def __init__(self, cache: Path, lora: dict | None = None, state: dict | None = None) -> None:
        from unlearn.job import prepare
        from unlearn.spec import JobSpec

        self.cache = cache
        self.prep = prepare(JobSpec.model_validate(_job(cache, lora)))
        self.splits = s = self.prep.splits
        self.executor = LocalExecutor("cpu")
        self.state = state if state is not None else self.executor.run(
            self.request("retrain", FIT, None, empty_split(s.train), s.train), verbose=False).state
        self.scorer = new_model(self.request("ft", {}, self.state)).eval()

    def request(self, method: str, params: dict, state: dict | None, forget=None, retain=None) -> RunRequest:
        s = self.splits
        return RunRequest(label=method, method=method, params=params, model=self.prep.spec.model,
                          num_outputs=s.num_outputs, input_shape=self.prep.input_shape, initial_state=state,
                          forget=s.forget if forget is None else forget, retain=s.remain if retain is None else retain,
                          task=self.prep.task, seed=self.prep.spec.seed)

    def nll(self, state: dict, split) -> float:
        """Mean answer NLL (nats per token, per sequence then averaged) of a split under `state`."""
        self.scorer.load_state_dict(state)
        with torch.no_grad():
            return lm_loss(self.scorer, Batch(torch.as_tensor(split.x), torch.as_tensor(split.y), None)).mean().item()

    def run(self, method: str, params: dict) -> dict:
        return self.executor.run(self.request(method, params, self.state), verbose=False).state


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, one_thread) -> Fitted:
    return Fitted(tmp_path_factory.mktemp("facts"))


# --- every method unlearns the fitted original ---------------------------------------------------------------------

@pytest.mark.parametrize("name", LM_METHODS)
def test_each_method_raises_the_forget_answers_nll_more_than_the_retain_answers(name, fitted):
    forget0, retain0 = fitted.nll(fitted.state, fitted.splits.forget), fitted.nll(fitted.state, fitted.splits.retain)
    assert forget0 < 0.3 and retain0 < 0.3  # the original knows its facts
    state = fitted.run(name, TEST_OVERRIDES.get(name, {}))
    forget_rise = fitted.nll(state, fitted.splits.forget) - forget0
    retain_rise = fitted.nll(state, fitted.splits.retain) - retain0
    assert forget_rise > 0.05 and forget_rise > 1.5 * max(retain_rise, 0.0), (name, forget_rise, retain_rise)


def test_the_llm_methods_take_the_open_unlearning_recipe_and_the_classifier_ones_keep_theirs():
    for name in ("grad_diff", "npo", "simnpo", "rmu"):
        p = methods.build(name, {}, family="causal_lm").params
        assert (p.optimizer, p.batch_size, p.epochs, p.weight_decay) == ("adamw", 32, 10.0, 0.01), name
        assert methods.get(name).tasks == {"language_modelling"} and methods.get(name).uses == {"forget", "retain"}
    npo, simnpo, rmu = (methods.build(n, {}).params for n in ("npo", "simnpo", "rmu"))
    assert (npo.beta, npo.retain_weight) == (0.1, 1.0)
    assert (simnpo.beta, simnpo.margin, simnpo.forget_weight, simnpo.retain_weight) == (4.5, 0.0, 0.125, 1.0)
    assert (rmu.layer, rmu.steering_coeff, rmu.alpha) == (None, 2.0, 1.0)
    for name in ("delete", "gsr", "ghr", "grogu"):
        lm = methods.build(name, {}, family="causal_lm").params
        assert (lm.optimizer, lm.lr, lm.batch_size, lm.epochs, lm.weight_decay) == ("adamw", 1e-4, 32, 10.0, 0.01)
        classifier = methods.build(name, {}, family="mlp").params
        classifier = (classifier.optimizer, classifier.lr, classifier.batch_size, classifier.epochs)
        assert classifier == ("sgd", 1e-3, 64, 20.0), name
        assert "language_modelling" in methods.get(name).tasks


def test_rmu_refuses_a_layer_the_model_lacks_and_delete_a_mask_label(fitted):
    with pytest.raises(SpecError, match=r"^params\.layer: layer 5 does not exist: the model has 2 decoder layers"):
        fitted.run("rmu", {"layer": 5, "steps": 1})
    with pytest.raises(SpecError, match=r"^params\.mask_label: .*language model"):
        fitted.run("delete", {"mask_label": 3, "steps": 1})


def test_under_lora_the_methods_train_the_adapters_against_the_base_with_adapters_off(fitted):
    """The frozen original of a LoRA run is the student with its adapters off (no copy): RMU hooks its layers
    through the student, NPO and GROGU read it as a teacher; only the adapters get gradients."""
    lora = Fitted(fitted.cache, lora={"r": 4, "alpha": 8, "dropout": 0.0}, state=fitted.state)
    forget0 = lora.nll(lora.state, lora.splits.forget)
    for name in ("rmu", "npo", "grogu"):
        state = lora.run(name, {"steps": 6, "lr": 1e-2})
        assert set(state) == set(lora.state)  # the adapters are merged back: the model's own keys
        assert lora.nll(state, lora.splits.forget) > forget0 + 0.01, name


def test_grogu_combines_only_the_trainable_gradients():
    """Frozen parameters (a LoRA model's base) never enter GROGU's vectors and keep no gradient."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    model[0].requires_grad_(False)
    original = copy.deepcopy(model).requires_grad_(False).eval()
    torch.manual_seed(1)
    forget = Batch(torch.randn(16, 6), torch.full((16,), 1), torch.arange(16))
    method = methods.build("grogu", {"lr": 0.1, "momentum": 0.0})
    ctx = _classifier_ctx(method, model, original, forget)
    method.setup(ctx)
    before = copy.deepcopy(model.state_dict())
    method.step(ctx, forget, None)
    assert model[0].weight.grad is None and torch.equal(model[0].weight, before["0.weight"])
    assert not torch.equal(model[2].weight, before["2.weight"])


# --- the classifier forms are unchanged ---------------------------------------------------------------------------

def _classifier_ctx(method, model: nn.Module, original: nn.Module, forget: Batch) -> Context:
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], method.params)
    return Context(model=model, module=model, original=original, optimizer=optimizer, params=method.params,
                   loss=classification_loss, rows=classification_rows, task="classification", num_classes=5,
                   forget_size=len(forget.y), retain_size=0, forget_batches=lambda: iter([forget]),
                   retain_batches=lambda: iter([]))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 3.0])
@pytest.mark.parametrize("name", ["delete", "gsr", "ghr", "grogu"])
def test_classifier_steps_give_the_batch_mean_formulas_numbers(name, temperature):
    """Rows summed then divided by their count (`ctx.row_mean`) against the batch-mean losses as they were: the
    same bits at T = 1 and T = 4 (T² a power of two), the same to rounding at other T."""
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    teacher = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5)).requires_grad_(False).eval()
    x, y = torch.randn(24, 6), torch.tensor([1, 3] * 12)
    forget = Batch(x, y, torch.arange(24))
    params = {"lr": 0.1, "momentum": 0.0, **({} if name == "ghr" else {"temperature": temperature})}
    method = methods.build(name, params)
    model = copy.deepcopy(student)
    ctx = _classifier_ctx(method, model, teacher, forget)
    method.setup(ctx)
    method.step(ctx, forget, None)

    expected = copy.deepcopy(student)
    forgotten = torch.zeros(5, dtype=torch.bool)
    forgotten[[1, 3]] = True
    t = teacher(x)
    if name == "grogu":
        gsr_loss(expected(x), t, forgotten, temperature).backward()
        g_soft = flatten(grads_of(expected))
        expected.zero_grad()
        ghr_loss(expected(x), t, forgotten).backward()
        want, _ = combine_gradients(flatten(grads_of(expected)), g_soft, "conflict")
    else:
        loss = {"delete": lambda: delete_loss(expected(x), t, y, temperature),
                "gsr": lambda: gsr_loss(expected(x), t, forgotten, temperature),
                "ghr": lambda: ghr_loss(expected(x), t, forgotten)}[name]()
        loss.backward()
        want = flatten(grads_of(expected))
    got = flatten(grads_of(model))  # the gradient the step applied
    if temperature in (1.0, 4.0) or name == "ghr":
        assert torch.equal(got, want), (name, (got - want).abs().max())
    else:
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-8)


# --- token means on two ranks ------------------------------------------------------------------------------------

VOCAB, LENGTH = 48, 12
TINY = {"family": "llama", "layers": 2, "hidden": 32, "heads": 2, "vocab_size": VOCAB}
SGD = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.0, "weight_decay": 0.0}
# Method, params beyond SGD, strategy: every normaliser (tokens, sequences, activation positions) under DDP, and
# GROGU's dot products over shards under FSDP2.
SCENARIOS = {"delete": ("delete", {}, "ddp"), "ghr": ("ghr", {}, "ddp"), "grad_diff": ("grad_diff", {}, "ddp"),
             "npo": ("npo", {}, "ddp"), "simnpo": ("simnpo", {"margin": 0.5}, "ddp"),
             "rmu": ("rmu", {"steering_coeff": 4.0}, "ddp"), "grogu": ("grogu", {}, "ddp"),
             "grogu_fsdp": ("grogu", {"combine": "always"}, "fsdp")}
STEPS = 2
JOIN_TIMEOUT_S = 150


def _rows(seed: int, answers: list[int]) -> torch.Tensor:
    """Packed QA rows: one per entry of `answers`, each a 4-token question and that many answer tokens."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for n in answers:
        ids = torch.full((LENGTH,), 0)
        ids[:4 + n] = torch.randint(3, VOCAB, (4 + n,), generator=gen)
        labels = torch.full((LENGTH,), -100)
        labels[4:4 + n] = ids[4:4 + n]
        rows.append((ids, labels, (torch.arange(LENGTH) < 4 + n).long()))
    ids, labels, mask = (torch.stack(column) for column in zip(*rows))
    qa = QABatch(ids, mask, labels)
    return torch.from_numpy(pack_rows(qa))


# rank 0: three forget rows with long answers, one retain row with a short one; rank 1 the other way round
FORGET = [_rows(1, [7, 6, 8]), _rows(2, [1])]
RETAIN = [_rows(3, [2]), _rows(4, [7, 5, 6])]


def _model() -> nn.Module:
    from unlearn.models.causal_lm import build_causal_lm
    from unlearn.spec import CausalLMSpec

    torch.manual_seed(0)
    return build_causal_lm(CausalLMSpec(config=TINY))


def _steps(name: str, comm, forget: torch.Tensor, retain: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """STEPS steps of a scenario's method on these rows; the full weights after each step."""
    from unlearn.lm_sharding import gather_full_state, wrap_causal_lm
    from unlearn.models.causal_lm import frozen_original

    method_name, params, strategy = SCENARIOS[name]
    method = methods.build(method_name, {**SGD, **params}, family="causal_lm")
    module = _model()
    model = wrap_causal_lm(module, strategy, "cpu")  # one process: the model itself
    original = frozen_original(model, module)
    f_batch, r_batch = (Batch(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))) for x in (forget, retain))
    ctx = Context(model=model, module=module, original=original, optimizer=method.optimizer(model),
                  params=method.params, loss=lm_loss, rows=token_rows, global_rows=True, task="language_modelling",
                  num_classes=VOCAB, forget_size=4, retain_size=4, forget_batches=lambda: iter([f_batch]),
                  retain_batches=lambda: iter([r_batch]), comm=comm, seed=7)
    method.setup(ctx)
    states = []
    for step in range(STEPS):
        ctx.step = step
        method.step(ctx, f_batch, r_batch)
        state = gather_full_state(model) if strategy == "fsdp" and comm.world_size > 1 else module.state_dict()
        states.append({k: v.detach().clone() for k, v in state.items()} if state is not None else None)
    return states


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        comm = TorchDistComm()
        seen = {name: _steps(name, comm, FORGET[rank], RETAIN[rank]) for name in SCENARIOS}
        torch.save(seen, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("ranks")
    spawn(_worker, (2, free_port(), str(folder)), nprocs=2, timeout_s=JOIN_TIMEOUT_S, what="method")
    return torch.load(folder / "rank0.pt", weights_only=False)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_ranks_with_uneven_answer_tokens_step_as_one_process_on_the_union(name, two_ranks):
    forget_tokens = [int((x[:, 1] != -100).sum()) for x in FORGET]
    assert forget_tokens == [21, 1]  # 21 answer tokens on rank 0, one on rank 1
    one = _steps(name, LocalComm(), torch.cat(FORGET), torch.cat(RETAIN))
    for step, (theirs, mine) in enumerate(zip(two_ranks[name], one)):
        for key, value in mine.items():
            assert torch.allclose(theirs[key], value, rtol=1e-4, atol=1e-6), (name, step, key)
    assert any(not torch.equal(one[-1][k], v) for k, v in _model().state_dict().items())  # the steps moved


def test_per_rank_means_would_not_match(two_ranks):
    """The check has teeth: averaging each rank's own token mean (what DDP does with a per-worker mean) differs."""
    deltas = []
    for rank in range(2):
        module = _model()
        method = methods.build("delete", SGD, family="causal_lm")
        f_batch = Batch(FORGET[rank], torch.zeros(len(FORGET[rank]), dtype=torch.long), torch.arange(len(FORGET[rank])))
        ctx = Context(model=module, module=module, original=copy.deepcopy(module).requires_grad_(False).eval(),
                      optimizer=method.optimizer(module), params=method.params, loss=lm_loss, rows=token_rows,
                      global_rows=False, task="language_modelling", num_classes=VOCAB, forget_size=4, retain_size=0,
                      forget_batches=lambda: iter([f_batch]), retain_batches=lambda: iter([]))
        start = flatten(copy.deepcopy(module.state_dict()))
        method.step(ctx, f_batch, None)
        deltas.append(flatten(module.state_dict()) - start)
    naive = flatten(_model().state_dict()) + (deltas[0] + deltas[1]) / 2
    assert not torch.allclose(naive, flatten(two_ranks["delete"][0]), rtol=1e-4, atol=1e-6)
