"""Language-model unlearning metrics of TOFU (Maini et al. 2024) and MUSE (Shi et al. 2024), in plain PyTorch.

What (METHODS.md, "Language models"; conventions checked against locuslab/open-unlearning, src/evals/metrics):
- `answer_probability`: p(a|q)^(1/|a|) = exp(mean log-prob of the labelled tokens), per pair. |a| counts the
  answer's tokens and its <eos>, as TOFU and open-unlearning label them (see data/qa_batches.py).
- `greedy_answers` + `rouge_l_recall`: ROUGE-L recall of the greedy answer against the reference (rouge_score with
  `use_stemmer=True`, reference as target, as open-unlearning's `eval_text_similarity`).
- `truth_ratio`: per question, perturbed (wrong) answers over the paraphrased (right) one, each length-normalised.
  How the perturbed answers are averaged: open-unlearning (`truth_ratio`: `aggregate_to_1D` over the
  `avg_loss`es) and TOFU's own code (`avg_perturbed_loss.mean(-1)`) average the *log*-probabilities, i.e. take the
  geometric mean of p(ã_i|q)^(1/|ã_i|); the TOFU paper's formula (and METHODS.md) writes an arithmetic mean. The
  default `mean="geometric"` follows the code the published numbers come from; `mean="arithmetic"` gives the
  formula. The ratio is taken in log space, exp(log p_wrong − log p_right), not open-unlearning's
  p_wrong / (p_right + 1e-10): the same value wherever p_right ≫ 1e-10, and still a ratio when unlearning has
  pushed p_right below that.
- `forget_quality`: KS-test p-value between the forget set's truth ratios under the unlearned model and under
  retrain (open-unlearning's `ks_test` on the raw ratios; its `get_forget_quality` and TOFU test 1/ratio: the
  two-sample KS statistic depends only on ranks, so any strictly monotone map gives the same p-value).
- `model_utility`: harmonic mean of retain answer probability, retain ROUGE-L recall and retain
  mean(max(0, 1 − truth ratio)) (open-unlearning's `true_better` aggregator, clipped per question before the
  mean). TOFU's and open-unlearning's model utility is the harmonic mean of nine numbers: these three on the retain
  set and on two more sets (real authors, world facts) that the facts corpus has no counterpart of; the formula is
  the same. 0 when any component is 0 (the harmonic mean's limit; scipy's hmean warns there).
- `min_k_prob`: the Min-K% Prob attack statistic (Shi et al. 2024, k = 40% in TOFU/MUSE): mean of the lowest
  k share (at least one) of the token log-probs of the answer. Scored tokens as open-unlearning's
  `tokenwise_logprobs`: the labelled positions less the last one (the <eos>). Sign: we return the mean log-prob
  itself (higher = more member-like); open-unlearning returns its negation and then labels members 0, so
  `auc` below gives the same number as its `mia_auc`.
- `auc`: ROC AUC of telling members (forget) from non-members (held-out), members labelled 1 and scored by
  `min_k_prob`: > 0.5 when members get higher scores (the model still knows them), 0.5 when indistinguishable.
- `privleak`: MUSE's PrivLeak = (AUC_model − AUC_retrain) / AUC_retrain × 100, where MUSE's AUC is the
  complement of the conventional one above (open-unlearning's `privleak` computes 1 − auc of both before the
  ratio, adding 1e-10 to the denominator). So a model that still separates its forget set from held-out data
  better than retrain scores *negative* (the original model ≈ −100 in MUSE's tables), an over-unlearned one
  positive, retrain-like 0. Inputs are conventional AUCs from `auc`.

How. Everything runs in `batch_size` chunks under `torch.no_grad()`, with the model in eval mode and put back in
its previous mode afterwards. Log-softmax is taken in float32 only at the scored positions (not over the whole
N x L x V logits), so a bf16 model with a large vocabulary costs little beyond its own forward pass. Position ids
follow the attention mask, so left- and right-padded batches score the same as one row alone.

Greedy decoding is a hand-written loop (KV cache by default), not `model.generate`: with `fixed_steps=True` every
call runs exactly `max_new_tokens` forward passes per chunk whatever the rows emit, so FSDP ranks that each decode
their own questions stay in lockstep (a rank that stopped early would leave the others waiting in an all-gather
forever). The caller keeps the chunk count equal across ranks (same number of questions, same batch_size).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from unlearn.data.qa_batches import IGNORE_INDEX, QABatch, as_adapter, encode_prompts, encode_qa
from unlearn.errors import BadInput

EVAL_BATCH = 32
MIN_K = 0.4  # TOFU's and MUSE's Min-K% share (open-unlearning's mia_min_k `k`)


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[torch.device]:
    """Eval mode and no grad for the duration, the model's previous mode back after; yields its device."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def _chunks(n: int, batch_size: int) -> range:
    if batch_size < 1:
        raise BadInput(f"batch_size must be at least 1, not {batch_size}")
    return range(0, n, batch_size)


def _token_logprobs(model: nn.Module, batch: QABatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of every labelled token given the ones before it, as (values[M], row index[M]) in row-major
    order over the M labelled positions of a batch already on the model's device."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids()).logits
    # Position t predicts token t+1: the logits lose their last column, the labels their first.
    targets = batch.labels[:, 1:]
    scored = targets != IGNORE_INDEX
    rows = torch.nonzero(scored)[:, 0]
    picked = logits[:, :-1][scored].float().log_softmax(dim=-1)
    values = picked.gather(1, targets[scored].unsqueeze(1)).squeeze(1)
    return values, rows


def sequence_logprob(model: nn.Module, batch: QABatch, *, batch_size: int = EVAL_BATCH
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of the labelled tokens' log-probs, number of labelled tokens), each (N,) float32 / int64 on the CPU."""
    sums, counts = [], []
    with _evaluating(model) as device:
        for start in _chunks(len(batch), batch_size):
            chunk = batch.rows(start, start + batch_size).to(device)
            values, rows = _token_logprobs(model, chunk)
            total = torch.zeros(len(chunk), dtype=torch.float32, device=device).index_add_(0, rows, values)
            sums.append(total.cpu())
            counts.append(chunk.num_answer_tokens.cpu())
    if not sums:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(sums), torch.cat(counts)


def _mean_logprob(model: nn.Module, batch: QABatch, batch_size: int) -> np.ndarray:
    """log p(a|q)^(1/|a|) per row (float64)."""
    sums, counts = sequence_logprob(model, batch, batch_size=batch_size)
    return sums.double().numpy() / counts.double().numpy()


def answer_probability(model: nn.Module, batch: QABatch, *, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """p(a|q)^(1/|a|) per row: exp of the mean log-prob of the labelled tokens (answer and <eos>)."""
    return np.exp(_mean_logprob(model, batch, batch_size))


def truth_ratio(model: nn.Module, tokenizer: Any, questions: Sequence[str], paraphrases: Sequence[str],
                perturbed_lists: Sequence[Sequence[str]], *, batch_size: int = EVAL_BATCH,
                max_length: int | None = None, mean: str = "geometric") -> np.ndarray:
    """Per question, mean_i p(ã_i|q)^(1/|ã_i|) / p(â|q)^(1/|â|): perturbed answers ã_i over the paraphrased â.
    `mean`: "geometric" over the perturbed answers (TOFU's and open-unlearning's code) or "arithmetic" (the
    paper's formula). Below 1 where the model prefers the true answer; about 1 where it cannot tell."""
    if mean not in ("geometric", "arithmetic"):
        raise BadInput(f"truth_ratio: mean must be 'geometric' or 'arithmetic', not {mean!r}")
    if not len(questions) == len(paraphrases) == len(perturbed_lists):
        raise BadInput(f"truth_ratio: {len(questions)} questions, {len(paraphrases)} paraphrases and "
                       f"{len(perturbed_lists)} perturbed lists")
    if any(len(p) == 0 for p in perturbed_lists):
        raise BadInput("truth_ratio: every question needs at least one perturbed answer")
    if not questions:
        return np.zeros(0)
    right = _mean_logprob(model, encode_qa(tokenizer, questions, paraphrases, max_length), batch_size)
    owner = np.repeat(np.arange(len(questions)), [len(p) for p in perturbed_lists])
    flat_q = [questions[i] for i in owner]
    flat_a = [a for p in perturbed_lists for a in p]
    wrong_each = _mean_logprob(model, encode_qa(tokenizer, flat_q, flat_a, max_length), batch_size)
    # Each question's perturbed answers are consecutive in the flat list.
    groups = np.split(wrong_each, np.cumsum([len(p) for p in perturbed_lists])[:-1])
    if mean == "geometric":
        wrong = np.array([g.mean() for g in groups])
    else:  # log of the mean of the probabilities, without leaving log space
        wrong = np.array([np.logaddexp.reduce(g) - math.log(len(g)) for g in groups])
    return np.exp(wrong - right)


@lru_cache(maxsize=1)
def _cache_name() -> str:
    """The keyword (and output field) of the KV cache: `cache` in recent transformers, which only warns about the
    older `past_key_values` (the name of transformers 4.x, which pyproject still allows)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def _step(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any,
          use_cache: bool) -> tuple[torch.Tensor, Any]:
    """Next-token logits of every row (its last column: left padding puts every row's last token there)."""
    name = _cache_name()
    extra = {name: cache} if cache is not None else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, **extra)
    return out.logits[:, -1], (out.get(name) if use_cache else None)


def _greedy_chunk(model: nn.Module, prompts: QABatch, max_new_tokens: int, eos_id: int, pad_id: int,
                  fixed_steps: bool, use_cache: bool) -> torch.Tensor:
    """Greedy continuations (N x steps) of a left-padded prompt batch on the model's device."""
    ids, mask = prompts.input_ids, prompts.attention_mask
    positions = prompts.position_ids()
    done = torch.zeros(len(ids), dtype=torch.bool, device=ids.device)
    generated = []
    cache = None
    for step in range(max_new_tokens):
        if cache is None:  # the first step, or every step without a cache: the whole sequence goes in
            logits, cache = _step(model, ids, mask, positions, None, use_cache)
        else:  # only the newest token goes in; the cache holds the rest (the mask still spans everything)
            logits, cache = _step(model, ids[:, -1:], mask, positions[:, -1:], cache, use_cache)
        # A finished row keeps being fed (pad) so the batch's shape never changes; its tokens are cut below.
        token = logits.argmax(dim=-1).masked_fill(done, pad_id)
        generated.append(token)
        done |= token == eos_id
        if not fixed_steps and bool(done.all()):
            break
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
    if not generated:
        return torch.zeros(len(ids), 0, dtype=torch.long)
    return torch.stack(generated, dim=1).cpu()


def greedy_answers(model: nn.Module, tokenizer: Any, questions: Sequence[str], max_new_tokens: int, *,
                   fixed_steps: bool = True, batch_size: int = EVAL_BATCH, use_cache: bool = True,
                   max_length: int | None = None) -> list[str]:
    """The greedy answer to each question (`<bos> question` prompt, left-padded batches), cut at the first <eos>,
    decoded without special tokens and stripped. `fixed_steps=True`: exactly `max_new_tokens` forward passes per
    chunk of `batch_size` questions even when every row has emitted <eos> (FSDP ranks in lockstep); False: stop
    once every row of the chunk has. `use_cache=False` re-reads the whole sequence each step (same answers)."""
    if max_new_tokens < 0:
        raise BadInput(f"greedy_answers: max_new_tokens must be at least 0, not {max_new_tokens}")
    tok = as_adapter(tokenizer)
    prompts = encode_prompts(tok, questions, max_length)
    answers: list[str] = []
    with _evaluating(model) as device:
        for start in _chunks(len(prompts), batch_size):
            chunk = prompts.rows(start, start + batch_size).to(device)
            tokens = _greedy_chunk(model, chunk, max_new_tokens, tok.eos_id, tok.pad_id, fixed_steps, use_cache)
            for row in tokens.tolist():
                cut = row.index(tok.eos_id) if tok.eos_id in row else len(row)
                answers.append(tok.decode(row[:cut]).strip())
    return answers


def rouge_l_recall(predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each prediction against its reference (rouge_score, Porter stemmer as open-unlearning):
    the share of the reference's words that the prediction holds in order."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise BadInput(f"rouge_l_recall: {len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return np.array([scorer.score(ref, pred)["rougeL"].recall for pred, ref in zip(predictions, references)],
                    dtype=np.float64)


def forget_quality(tr_unlearned: Sequence[float], tr_retrain: Sequence[float]) -> float:
    """Two-sample KS-test p-value between the forget set's truth ratios under the unlearned model and under
    retrain: 1 when indistinguishable, near 0 when the unlearned model is told apart from retrain."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(tr_unlearned, dtype=np.float64), np.asarray(tr_retrain, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise BadInput("forget_quality: both truth-ratio samples must be non-empty")
    return float(ks_2samp(a, b).pvalue)


def model_utility(retain_prob: Sequence[float] | float, retain_rouge: Sequence[float] | float,
                  retain_tr: Sequence[float] | float) -> float:
    """Harmonic mean of mean retain answer probability, mean retain ROUGE-L recall and mean max(0, 1 − truth ratio)
    over the retain questions (per-question ratios: the clip comes before the mean). 0 if any component is 0."""
    parts = [float(np.mean(retain_prob)), float(np.mean(retain_rouge)),
             float(np.mean(np.maximum(0.0, 1.0 - np.asarray(retain_tr, dtype=np.float64))))]
    if min(parts) <= 0.0:
        return 0.0
    return len(parts) / sum(1.0 / p for p in parts)


def min_k_prob(model: nn.Module, batch: QABatch, k: float = MIN_K, *, batch_size: int = EVAL_BATCH) -> np.ndarray:
    """Min-K% Prob per row: the mean of the lowest max(1, int(k·n)) of the n answer-token log-probs (labelled
    positions less the final <eos>, as open-unlearning). Higher = more likely a training member."""
    if not 0.0 < k <= 1.0:
        raise BadInput(f"min_k_prob: k must be in (0, 1], not {k}")
    scores = []
    with _evaluating(model) as device:
        for start in _chunks(len(batch), batch_size):
            chunk = batch.rows(start, start + batch_size).to(device)
            values, rows = _token_logprobs(model, chunk)
            values, rows = values.cpu(), rows.cpu()
            for i in range(len(chunk)):
                lp = values[rows == i][:-1]  # the last labelled token is the <eos>
                if lp.numel() == 0:
                    raise BadInput("min_k_prob: a row has no answer token before its <eos>")
                lowest = torch.sort(lp).values[:max(1, int(lp.numel() * k))]
                scores.append(float(lowest.double().mean()))
    return np.array(scores, dtype=np.float64)


def auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """ROC AUC of the attack that calls high scores members: P(member score > non-member score), ties half."""
    from sklearn.metrics import roc_auc_score

    members, others = np.asarray(member_scores, dtype=np.float64), np.asarray(nonmember_scores, dtype=np.float64)
    if members.size == 0 or others.size == 0:
        raise BadInput("auc: needs at least one member and one non-member score")
    labels = np.concatenate([np.ones(members.size), np.zeros(others.size)])
    return float(roc_auc_score(labels, np.concatenate([members, others])))


def privleak(auc_model: float, auc_retrain: float) -> float:
    """MUSE's PrivLeak in percent from conventional AUCs (`auc`): (A_m − A_r) / A_r × 100 on MUSE's AUC
    A = 1 − AUC, as open-unlearning computes it (1e-10 in the denominator as there). Negative: the forget set is
    still told apart from held-out data better than under retrain (under-unlearned); positive: over-unlearned;
    0: as retrain."""
    model_side, retrain_side = 1.0 - float(auc_model), 1.0 - float(auc_retrain)
    return (model_side - retrain_side) / (retrain_side + 1e-10) * 100.0
