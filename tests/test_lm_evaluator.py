"""The language-modelling evaluator (`unlearn.evaluation.language_modelling`) on a tiny llama and a 30-entity facts
job: registered for the task, light to pickle, the same numbers on one process and on two gloo ranks (plain and
FSDP2-sharded: a rank out of step would hang), per-row scores equal to lm_metrics', retrain-vs-itself forget quality
1 and PrivLeak 0, and a model briefly fit to the forget answers scores them higher than an untrained one.

One spawn of two workers evaluates both models there; the tests compare with the same evaluation in this process.
"""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from gloo_workers import free_port, gloo_group, spawn

from unlearn.evaluation.language_modelling import LanguageModellingEvaluator, LMOutputs, retain_subset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread

MAX_RETAIN = 64  # a small cap: the test's retain side is 64 of 576 rows
FIT_STEPS = 30  # full-batch AdamW steps at lr 3e-3: the forget answers come back greedily (ROUGE ~1)
JOIN_TIMEOUT_S = 120  # a collective out of step would hang: the spawn is killed and the test fails


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    from unlearn.job import prepare
    from unlearn.spec import JobSpec

    cache = tmp_path_factory.mktemp("cache")
    return prepare(JobSpec.model_validate({
        "name": "lm-eval", "dataset": {"name": "facts", "facts": {"num_entities": 30}},
        "model": {"name": "causal_lm", "config": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2}},
        "forget": {"kind": "class", "fraction": 0.1}, "methods": [{"name": "retrain"}], "cache_dir": str(cache)}))


@pytest.fixture(scope="module")
def evaluator(prep):
    return LanguageModellingEvaluator(prep.splits, prep.spec, prep.dataset, max_retain=MAX_RETAIN)


def _untrained(prep) -> torch.nn.Module:
    from unlearn.models import build_model

    torch.manual_seed(0)
    return build_model(prep.spec.model, prep.splits.num_outputs, prep.input_shape)


@pytest.fixture(scope="module")
def models(prep, evaluator):
    """{"untrained": a fresh tiny llama, "fitted": the same briefly fit (full-batch AdamW) to the forget answers}."""
    from unlearn.data.qa_batches import encode_qa
    from unlearn.lm_task import logits_of
    from unlearn.methods.token_losses import sequence_nll

    untrained = _untrained(prep)
    fitted = copy.deepcopy(untrained)
    forget = evaluator.sides["forget"]
    batch = encode_qa(evaluator.tokenizer(), forget.question, forget.answer)
    opt = torch.optim.AdamW(fitted.parameters(), lr=3e-3, weight_decay=0.0)
    fitted.train()
    for _ in range(FIT_STEPS):
        nll, tokens = sequence_nll(logits_of(fitted, batch), batch.labels)
        loss = nll.sum() / tokens.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"untrained": untrained.eval(), "fitted": fitted.eval()}


@pytest.fixture(scope="module")
def local(models, evaluator):
    """Each model's (metrics, outputs) in this process (LocalComm)."""
    return {name: evaluator.evaluate(model) for name, model in models.items()}


# --- two ranks -------------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, folder: str, evaluator: LanguageModellingEvaluator,
            states: dict) -> None:
    from unlearn.comm import TorchDistComm
    from unlearn.lm_sharding import wrap_causal_lm
    from unlearn.models import build_model

    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        comm, seen = TorchDistComm(), {}
        for name, (spec, num_outputs, input_shape, state) in states.items():
            model = build_model(spec, num_outputs, input_shape)
            model.load_state_dict(state)
            seen[name] = evaluator.evaluate(model.eval(), comm=comm, device="cpu")
            if name == "fitted":  # FSDP2: every forward all-gathers, so ranks out of step would hang here
                sharded = wrap_causal_lm(model, "fsdp", "cpu")
                seen["fitted-fsdp"] = evaluator.evaluate(sharded, comm=comm, device="cpu")
        torch.save(seen, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(prep, models, evaluator, tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ranks")
    fresh = pickle.loads(pickle.dumps(evaluator))  # what a worker receives: no tokenizer, loaded there
    states = {name: (prep.spec.model, prep.splits.num_outputs, prep.input_shape, model.state_dict())
              for name, model in models.items()}
    spawn(_worker, (2, free_port(), str(folder), fresh, states), nprocs=2, timeout_s=JOIN_TIMEOUT_S, what="evaluating")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _same_outputs(a: LMOutputs, b: LMOutputs, **tol) -> None:
    for name in ("forget_truth_ratio", "forget_min_k", "held_out_min_k"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), **tol)
    assert [row[:3] for row in a.answers] == [row[:3] for row in b.answers]


# --- tests -----------------------------------------------------------------------------------------------------

def test_registered_for_the_task_and_light_to_pickle(prep, evaluator, local):
    from unlearn.evaluation import EVALUATORS, build_evaluator

    assert EVALUATORS.lookup("language_modelling") is LanguageModellingEvaluator
    built = build_evaluator(prep.task, prep.splits, prep.spec, prep.dataset)
    assert prep.task == "language_modelling" and isinstance(built, LanguageModellingEvaluator)
    # the sides: the whole target, a seeded capped retain subset, the held-out (test) rows
    splits = prep.splits
    assert len(evaluator.sides["forget"]) == len(splits.target) == 72
    assert len(evaluator.sides["held_out"]) == len(splits.test)
    assert len(evaluator.sides["retain"]) == MAX_RETAIN < len(splits.retain)
    assert len(built.sides["retain"]) == min(400, len(splits.retain))
    np.testing.assert_array_equal(retain_subset(len(splits.retain), MAX_RETAIN, 0),
                                  retain_subset(len(splits.retain), MAX_RETAIN, 0))
    assert evaluator._tokenizer is not None  # loaded by the evaluations above, and left out of the pickle
    blob = pickle.dumps(evaluator)
    assert pickle.loads(blob)._tokenizer is None and len(blob) < 100_000


def test_metrics_and_the_model_against_itself(local):
    metrics, out = local["fitted"]
    assert set(metrics) == {"forget_prob", "retain_prob", "held_out_prob", "forget_ROUGE", "retain_ROUGE", "held_out_ROUGE",
                            "forget_truth_ratio", "model_utility", "mia_auc"}
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    assert all(0.0 <= metrics[k] <= 1.0 for k in metrics if k != "forget_truth_ratio")
    assert len(out.forget_truth_ratio) == len(out.forget_min_k) == 72 and len(out.answers) == 20
    evaluator = LanguageModellingEvaluator.__new__(LanguageModellingEvaluator)  # compare needs no data
    assert evaluator.compare(metrics, out, metrics, out) == {"forget_quality": 1.0, "privleak": 0.0, "gap": 0.0}
    assert evaluator.compare(metrics, None, metrics, out) == {}
    # the original (untrained here) against a "retrain" (fitted): both numbers, forget quality below 1
    other = evaluator.compare(*local["untrained"], *local["fitted"])
    assert set(other) == {"forget_quality", "privleak", "gap"} and other["forget_quality"] < 1.0 and other["gap"] > 5


def test_per_row_scores_are_lm_metrics(evaluator, models, local):
    from unlearn.data.qa_batches import as_adapter, encode_qa
    from unlearn.evaluation import lm_metrics as lm

    model, (metrics, out) = models["fitted"], local["fitted"]
    tok = evaluator.tokenizer()
    forget, held_out = evaluator.sides["forget"], evaluator.sides["held_out"]
    batch = encode_qa(tok, forget.question, forget.answer)
    assert metrics["forget_prob"] == pytest.approx(lm.answer_probability(model, batch).mean(), rel=1e-9)
    np.testing.assert_array_equal(out.forget_min_k, lm.min_k_prob(model, batch))
    np.testing.assert_array_equal(out.held_out_min_k,
                                  lm.min_k_prob(model, encode_qa(tok, held_out.question, held_out.answer)))
    np.testing.assert_allclose(out.forget_truth_ratio,
                               lm.truth_ratio(model, tok, forget.question, forget.paraphrase, forget.perturbed),
                               rtol=1e-5)
    answers = lm.greedy_answers(model, tok, forget.question, evaluator._max_new_tokens(as_adapter(tok)))
    assert metrics["forget_ROUGE"] == pytest.approx(lm.rouge_l_recall(answers, forget.answer).mean())
    assert [a for _, _, a, _ in out.answers] == answers[:20]
    assert metrics["mia_auc"] == pytest.approx(lm.auc(out.forget_min_k, out.held_out_min_k))


def test_a_peft_model_is_evaluated_as_handed(prep, evaluator, models, local):
    from unlearn.models.causal_lm import apply_lora
    from unlearn.spec import LoRASpec

    wrapped = apply_lora(copy.deepcopy(models["fitted"]), LoRASpec(r=4, dropout=0.0))  # adapters start at zero
    metrics, out = evaluator.evaluate(wrapped)
    assert metrics == pytest.approx(local["fitted"][0], rel=1e-6)
    _same_outputs(out, local["fitted"][1], rtol=1e-6)


def test_two_ranks_give_the_numbers_of_one_process(two_ranks, local):
    for name in ("untrained", "fitted"):
        metrics, out = local[name]
        for rank in range(2):  # every rank returns the whole set's numbers
            got_metrics, got_out = two_ranks[rank][name]
            assert got_metrics == metrics, (name, rank)
            _same_outputs(got_out, out, rtol=0, atol=0)
    # the FSDP2-sharded model (same weights): every rank in lockstep, the same numbers up to rounding
    for rank in range(2):
        got_metrics, got_out = two_ranks[rank]["fitted-fsdp"]
        assert got_metrics == pytest.approx(local["fitted"][0], rel=1e-5)
        _same_outputs(got_out, local["fitted"][1], rtol=1e-5)


def test_a_model_fit_to_the_forget_answers_scores_them_higher(local):
    fitted, untrained = local["fitted"][0], local["untrained"][0]
    assert fitted["forget_prob"] > 2 * untrained["forget_prob"]
    assert fitted["forget_ROUGE"] > untrained["forget_ROUGE"] + 0.5
    assert fitted["forget_prob"] > max(fitted["retain_prob"], fitted["held_out_prob"])  # fit to the forget rows only
    assert fitted["mia_auc"] > 0.8  # its forget rows stand out from the held-out entities'
    evaluator = LanguageModellingEvaluator.__new__(LanguageModellingEvaluator)
    # against an untrained "retrain", the fitted model leaks: PrivLeak negative (MUSE's sign)
    assert evaluator.compare(*local["fitted"], *local["untrained"])["privleak"] < 0


def test_artifacts_write_the_answers_csv(evaluator, local, tmp_path):
    import csv

    metrics, out = local["fitted"]
    evaluator.out_dir = tmp_path / "results"
    try:
        paths = evaluator.artifacts(None, "ga", tmp_path / "run", out)
    finally:
        evaluator.out_dir = None
    assert [p.name for p in paths] == ["answers_ga.csv"] and (tmp_path / "results" / "answers_ga.csv").is_file()
    rows = list(csv.reader(open(paths[0])))
    assert rows[0] == ["question", "reference", "answer", "rouge_l_recall"] and len(rows) == 21
    assert rows[1][:3] == list(out.answers[0][:3])
    assert evaluator.artifacts(None, "ga", tmp_path / "run", None) == []
