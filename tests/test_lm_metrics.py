"""Question-answer framing (`unlearn.data.qa_batches`) and the TOFU/MUSE language-model metrics
(`unlearn.evaluation.lm_metrics`) on a tiny Llama and a small facts corpus (nothing downloaded).

The metrics' direction is tested with a model overfitted on 8 QA pairs: it must answer them greedily, give them a
higher probability than an untrained model, prefer their true answers to the perturbed ones, and let a Min-K%
attack tell them from held-out entities' pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unlearn.data.facts import FactsConfig, generate_facts, train_tokenizer
from unlearn.data.qa_batches import IGNORE_INDEX, TokenizerAdapter, encode_prompts, encode_qa
from unlearn.errors import BadInput
from unlearn.evaluation import lm_metrics as lm

MAX_NEW = 8


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture(scope="module")
def corpus():
    return generate_facts(FactsConfig(num_entities=20, attributes=4, phrasings=1), seed=0)


@pytest.fixture(scope="module")
def tok(corpus):
    return train_tokenizer(corpus.strings(), 512)


def _rows(corpus, held_out: bool) -> list[dict]:
    ids = set(corpus.entity_ids(held_out=held_out).tolist())
    return [r for r in corpus.qa.to_pylist() if r["entity_id"] in ids][:8]


@pytest.fixture(scope="module")
def members(corpus):
    return _rows(corpus, held_out=False)


@pytest.fixture(scope="module")
def nonmembers(corpus):
    return _rows(corpus, held_out=True)


def _model(tok, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def untrained(tok):
    return _model(tok)


@pytest.fixture(scope="module")
def fitted(tok, members):
    """The 8 member pairs learnt by heart (300 full-batch AdamW steps: about a second)."""
    model = _model(tok)
    batch = encode_qa(tok, _q(members), _a(members))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    for _ in range(300):
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01
    return model


def _q(rows):
    return [r["question"] for r in rows]


def _a(rows):
    return [r["answer"] for r in rows]


# --- framing -------------------------------------------------------------------------------------------------

def test_labels_are_exactly_the_answer_tokens_and_eos(tok, members):
    batch = encode_qa(tok, _q(members), _a(members))
    for i, r in enumerate(members):
        q_ids = tok.encode(r["question"], add_special_tokens=False).ids
        a_ids = tok.encode(r["answer"], add_special_tokens=False).ids
        n = 1 + len(q_ids) + len(a_ids) + 1
        assert batch.input_ids[i, :n].tolist() == [1, *q_ids, *a_ids, 2]  # <bos> question answer <eos>
        assert batch.input_ids[i, n:].eq(0).all() and batch.attention_mask[i, n:].eq(0).all()  # right <pad>
        assert batch.attention_mask[i, :n].eq(1).all()
        labelled = torch.nonzero(batch.labels[i] != IGNORE_INDEX).flatten().tolist()
        assert labelled == list(range(1 + len(q_ids), n))  # the answer's positions and its <eos>, nothing else
        assert batch.labels[i, labelled].tolist() == [*a_ids, 2]
        assert tok.decode(batch.labels[i, labelled].tolist(), skip_special_tokens=True) == r["answer"]
        assert int(batch.num_answer_tokens[i]) == len(a_ids) + 1


def test_transformers_tokenizer_frames_the_same(tok, members):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    ours, theirs = encode_qa(tok, _q(members), _a(members)), encode_qa(hf, _q(members), _a(members))
    for name in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(getattr(ours, name), getattr(theirs, name))
    # No bos token: the eos takes its place (GPT-2's document separator); no pad token: eos pads.
    bare = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    adapter = TokenizerAdapter(bare)
    assert (adapter.bos_id, adapter.eos_id, adapter.pad_id) == (2, 2, 2)


def test_prompts_are_left_padded(tok, members):
    prompts = encode_prompts(tok, _q(members))
    width = prompts.input_ids.shape[1]
    for i, r in enumerate(members):
        q_ids = tok.encode(r["question"], add_special_tokens=False).ids
        assert prompts.input_ids[i, width - len(q_ids) - 1:].tolist() == [1, *q_ids]
        assert prompts.input_ids[i, :width - len(q_ids) - 1].eq(0).all()
        assert prompts.attention_mask[i].sum() == len(q_ids) + 1 and prompts.attention_mask[i, -1] == 1
    assert prompts.num_answer_tokens.eq(0).all()


def test_too_long_pair_is_one_line_bad_input(tok, members):
    batch = encode_qa(tok, _q(members), _a(members))
    longest = int(batch.attention_mask.sum(1).max())
    assert encode_qa(tok, _q(members), _a(members), max_length=longest).input_ids.shape[1] == longest
    with pytest.raises(BadInput) as err:
        encode_qa(tok, _q(members), _a(members), max_length=longest - 1)
    assert "\n" not in str(err.value) and "max_length" in str(err.value)


# --- probabilities -------------------------------------------------------------------------------------------

def test_answer_probability_by_hand_and_padding_free(tok, untrained, members):
    batch = encode_qa(tok, _q(members), _a(members))
    probs = lm.answer_probability(untrained, batch, batch_size=3)
    i = int(torch.argmin(batch.attention_mask.sum(1)))  # the most padded row
    n = int(batch.attention_mask[i].sum())
    ids = batch.input_ids[i:i + 1, :n]
    with torch.no_grad():
        logp = torch.log_softmax(untrained(input_ids=ids).logits[0].float(), dim=-1)
    start = n - int(batch.num_answer_tokens[i])  # the first labelled position
    hand = torch.stack([logp[t - 1, ids[0, t]] for t in range(start, n)]).mean().exp().item()
    assert probs[i] == pytest.approx(hand, rel=1e-5)
    sums, counts = lm.sequence_logprob(untrained, batch, batch_size=len(batch))
    assert counts.tolist() == batch.num_answer_tokens.tolist()
    assert np.allclose(np.exp(sums.numpy() / counts.numpy()), probs, rtol=1e-5)


def test_fitted_model_answers_greedily_and_is_surer(tok, fitted, untrained, members):
    answers = lm.greedy_answers(fitted, tok, _q(members), MAX_NEW)
    assert answers == _a(members)
    assert lm.rouge_l_recall(answers, _a(members)).tolist() == [1.0] * len(members)
    batch = encode_qa(tok, _q(members), _a(members))
    assert np.all(lm.answer_probability(fitted, batch) > lm.answer_probability(untrained, batch))
    # Left-padded chunks, one question at a time, and decoding without the KV cache: the same answers.
    assert lm.greedy_answers(fitted, tok, _q(members), MAX_NEW, batch_size=1) == answers
    assert lm.greedy_answers(fitted, tok, _q(members), MAX_NEW, batch_size=3, use_cache=False) == answers


def test_rouge_l_recall_is_the_share_of_reference_words():
    assert lm.rouge_l_recall(["the city of Lisbon", "Oslo", ""], ["Lisbon", "Lisbon Oslo", "Lisbon"]).tolist() == \
        [1.0, 0.5, 0.0]


def test_truth_ratio_below_one_when_fitted_about_one_when_untrained(tok, fitted, untrained, members):
    args = (tok, _q(members), [r["paraphrase"] for r in members], [r["perturbed"] for r in members])
    tr_fitted, tr_untrained = lm.truth_ratio(fitted, *args), lm.truth_ratio(untrained, *args)
    assert np.median(tr_fitted) < 1.0 and np.mean(np.log(tr_fitted)) < np.mean(np.log(tr_untrained))
    assert np.all(np.abs(np.log(tr_untrained)) < 0.3)  # near-uniform next-token distributions
    # With the trained wording itself as the right answer the preference is overwhelming.
    own = lm.truth_ratio(fitted, tok, _q(members), _a(members), [r["perturbed"] for r in members])
    assert np.all(own < 0.05)
    # Geometric vs arithmetic mean over the perturbed answers: AM >= GM, equal for one perturbed answer.
    arith = lm.truth_ratio(untrained, *args, mean="arithmetic")
    assert np.all(arith >= tr_untrained * (1 - 1e-9))
    one = [r["perturbed"][:1] for r in members]
    assert np.allclose(lm.truth_ratio(untrained, *args[:3], one), lm.truth_ratio(untrained, *args[:3], one,
                                                                                 mean="arithmetic"))


# --- aggregates ----------------------------------------------------------------------------------------------

def test_forget_quality_identical_is_one_disjoint_is_tiny():
    rng = np.random.default_rng(0)
    sample = rng.uniform(0.2, 0.9, 40)
    assert lm.forget_quality(sample, sample) == pytest.approx(1.0)
    assert lm.forget_quality(sample, sample + 5.0) < 0.01


def test_model_utility_harmonic_mean_and_zero():
    prob, rouge, tr = [0.5, 0.7], [1.0, 0.6], [0.2, 1.5]  # truth parts: max(0, 0.8), max(0, -0.5) -> mean 0.4
    parts = [0.6, 0.8, 0.4]
    assert lm.model_utility(prob, rouge, tr) == pytest.approx(3 / sum(1 / p for p in parts))
    assert lm.model_utility(prob, [0.0, 0.0], tr) == 0.0
    assert lm.model_utility(prob, rouge, [1.0, 2.0]) == 0.0


def test_auc_orientation_and_privleak_sign():
    assert lm.auc([3.0, 4.0], [1.0, 2.0]) == 1.0 and lm.auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert lm.auc([1.0, 2.0], [1.0, 2.0]) == 0.5
    assert lm.privleak(0.5, 0.5) == 0.0
    assert lm.privleak(1.0, 0.5) == pytest.approx(-100.0)  # MUSE's original-model end: under-unlearned
    assert lm.privleak(0.25, 0.5) == pytest.approx(50.0)   # forget set now looks less known than held-out data


def test_min_k_by_hand(tok, untrained, members):
    batch = encode_qa(tok, _q(members), _a(members))
    scores = lm.min_k_prob(untrained, batch, k=0.4, batch_size=5)
    i = int(torch.argmax(batch.num_answer_tokens))
    n = int(batch.attention_mask[i].sum())
    ids = batch.input_ids[i:i + 1, :n]
    with torch.no_grad():
        logp = torch.log_softmax(untrained(input_ids=ids).logits[0].float(), dim=-1)
    start = n - int(batch.num_answer_tokens[i])
    token_lp = sorted(logp[t - 1, ids[0, t]].item() for t in range(start, n - 1))  # the <eos> is left out
    lowest = token_lp[:max(1, int(len(token_lp) * 0.4))]
    assert scores[i] == pytest.approx(np.mean(lowest), rel=1e-5)


def test_min_k_attack_finds_the_fitted_members(tok, fitted, members, nonmembers):
    member_scores = lm.min_k_prob(fitted, encode_qa(tok, _q(members), _a(members)))
    other_scores = lm.min_k_prob(fitted, encode_qa(tok, _q(nonmembers), _a(nonmembers)))
    auc = lm.auc(member_scores, other_scores)
    assert auc > 0.5
    assert lm.privleak(auc, 0.5) < 0.0


# --- greedy decoding steps and model mode ----------------------------------------------------------------------

def test_fixed_steps_runs_every_forward_even_after_eos(tok, fitted, members):
    calls = []
    hook = fitted.register_forward_hook(lambda *_: calls.append(1))
    try:
        # Prompts that already hold their answer: the fitted model emits <eos> at once on every row.
        done = [f"{r['question']} {r['answer']}" for r in members]
        assert lm.greedy_answers(fitted, tok, done, MAX_NEW, fixed_steps=True) == [""] * len(members)
        assert len(calls) == MAX_NEW
        calls.clear()
        assert lm.greedy_answers(fitted, tok, done, MAX_NEW, fixed_steps=False) == [""] * len(members)
        assert len(calls) == 1
        calls.clear()
        lm.greedy_answers(fitted, tok, _q(members), MAX_NEW, fixed_steps=True, batch_size=3)
        assert len(calls) == MAX_NEW * 3  # per chunk
    finally:
        hook.remove()


def test_model_mode_is_restored(tok, untrained, members):
    batch = encode_qa(tok, _q(members), _a(members))
    for training in (True, False):
        untrained.train(training)
        lm.answer_probability(untrained, batch)
        lm.min_k_prob(untrained, batch)
        lm.greedy_answers(untrained, tok, _q(members)[:2], 2)
        assert untrained.training is training
    untrained.eval()
