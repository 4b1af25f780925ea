"""The language-modelling task: what a causal LM is trained and unlearned by, on packed question-answer rows.

A batch's `x` holds packed QA rows (data/facts_rows.py, `qa_batches.unpack_rows`): `<bos> question answer <eos>`
with labels on the answer and its <eos>. Three views of it serve every method:

* `lm_loss` (the task's per-sample loss, `ctx.loss`): each sequence's mean NLL over its answer tokens, TOFU's
  per-sample loss. Methods that take `ctx.loss(...).mean()` (ft, retrain, GA) weigh each QA pair alike.
* `token_rows` (`ctx.scored_rows`): every answer position as one row of next-token logits (R x V) with the true
  next token as its label, so a classifier loss over rows (DELETE's masked-teacher KL, GHR's arg-max relabel) is
  its token-level form. `ctx.row_mean` normalises a sum over rows by the global row count across workers (the
  task sets `global_rows`): every answer token of the global batch weighs the same whichever worker holds it.
* `bind_job`: before any work, fits the dataset and the model to each other: a `model.path` model's own tokenizer
  encodes the facts (`dataset.tokenizer`), and a model built from `config` gets the dataset's tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from unlearn.batch import Batch
from unlearn.data.qa_batches import QABatch, unpack_rows

if TYPE_CHECKING:
    from unlearn.spec import JobSpec


def logits_of(model: nn.Module, qa: QABatch) -> torch.Tensor:
    """The causal LM's logits (N, L, V) on a QA batch (padding masked out of attention, no key/value cache)."""
    return model(input_ids=qa.input_ids, attention_mask=qa.attention_mask, use_cache=False).logits


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Each sequence's NLL averaged over its answer tokens, shape (batch,)."""
    logp, tokens = sequence_logprob(model, batch)
    return -logp / tokens.clamp_min(1).to(logp.dtype)


def token_rows(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token logits at every answer position (R, V) in float32, the true next tokens (R,))."""
    from unlearn.methods.token_losses import shift

    qa = unpack_rows(batch.x)
    s = shift(logits_of(model, qa), qa.labels)
    return s.logits[s.valid].float(), s.labels[s.valid]


def sequence_logprob(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(answer | question) summed over each sequence's answer tokens (N,), answer tokens per sequence (N,)):
    what NPO and SimNPO read."""
    from unlearn.methods.token_losses import sequence_nll

    qa = unpack_rows(batch.x)
    nll, tokens = sequence_nll(logits_of(model, qa), qa.labels)
    return -nll, tokens


def bind_job(spec: "JobSpec") -> "JobSpec":
    """The spec with its dataset and model tokenizers agreed (see the module docstring); BadInput, one line, when a
    model folder, tokenizer or LoRA target is wrong: checked on files and a weightless skeleton, before any work."""
    from unlearn.data.facts_rows import corpus_of, tokenizer_path
    from unlearn.errors import SpecError
    from unlearn.models.causal_lm import check_causal_lm, tokenizer_location

    model, dataset = spec.model, spec.dataset
    if dataset.name != "facts":
        raise SpecError("dataset.name", f"a causal LM unlearns text: dataset 'facts' (not {dataset.name!r})")
    check_causal_lm(model)
    if model.path is not None or model.tokenizer is not None:  # the model's own tokenizer encodes the facts
        if dataset.tokenizer is None:
            dataset = dataset.model_copy(update={"tokenizer": str(tokenizer_location(model))})
    else:  # a fresh model speaks the dataset's tokenizer
        where = tokenizer_path(dataset, corpus_of(dataset, spec.seed, spec.cache_dir))
        model = model.model_copy(update={"tokenizer": str(where)})
    return spec.model_copy(update={"model": model, "dataset": dataset})


__all__ = ["bind_job", "lm_loss", "logits_of", "sequence_logprob", "token_rows"]
