"""Token-level loss maths of the language-model unlearning methods, on causal-LM logits (pure tensor functions).

The LLM forms of CURE (token-level DELETE / GSR, GHR, GROGU) and of the usual LLM baselines (GA, GradDiff, NPO,
SimNPO, RMU) are written here once, apart from any engine, so the maths can be checked on tiny tensors and the
methods that use it stay short. Nothing here calls a model except `layer_forward` / `layer_activations`, which take
one explicitly.

Conventions
-----------
* `logits` (N, L, V) come from a causal LM fed `input_ids` (N, L); `labels` (N, L) hold the token ids to score and
  -100 wherever a position is not an answer token (the question, padding), as Hugging Face's collators write them.
  The logit at position t predicts `labels[t + 1]`: `shift` drops the last logit and the first label, and its
  `valid` mask (labels != -100) is where every loss here is evaluated; logits at other positions never enter a loss
  (they are not even read, so garbage or non-finite values there are harmless).
* Token-level losses return `TokenSum(total, count)`: the SUM over valid tokens and the number of valid tokens,
  never a per-worker mean. The engine all-reduces the counts and divides by the global count, so every answer
  token of the global batch weighs the same whichever worker holds it. `token_mean(total, count, global_count,
  world_size)` gives the per-worker loss `total * world_size / global_count`, whose gradient, once DDP averages it
  over the `world_size` workers, is exactly the gradient of the global token mean. Per-sequence losses (NPO,
  SimNPO) return one value per sequence; they go through `token_mean` the same way with sequence counts.
* Soft targets are computed in float32 on the gathered valid rows (M, V), not on the whole (N, L, V) grid: bf16
  softmaxes lose the small probabilities that distillation is about, and the question/padding rows are never
  copied.

Differences from open-unlearning (locuslab/open-unlearning, src/trainer/{utils.py, unlearn/*.py}):
* Normalisation. open-unlearning takes `model(**inputs).loss` (the token mean of each device's batch) and lets DDP
  average those means, so a device with few answer tokens weighs as much as one with many; we normalise by the
  global token count (above). NPO/SimNPO average per-sequence losses over the batch in both (we: over the global
  batch). On one process with one batch the numbers are the same.
* GA / GradDiff: the same (`-NLL`; `gamma * (-NLL_forget) + alpha * NLL_retain`, gamma = alpha = 1 by default).
* NPO: the same: `compute_dpo_loss(lose_inputs=forget)` is `-(2/β) log σ(-β (log p_θ(y|x) - log p_ref(y|x)))` with
  sequence log-probs summed over answer tokens (`compute_batch_nll`), mean over sequences.
* SimNPO: the paper's form `-(2/β) log σ(-(β/|y|) log p_θ(y|x) - γ)`. open-unlearning (and SimNPO's own code) write
  `-(2/β) log σ(β (NLL/|y| - δ))`, with the margin inside the β product: their δ is our γ / β.
* RMU: the per-token squared error is averaged over the hidden dimension (as both WMDP and open-unlearning); tokens
  are the positions the caller's mask selects. open-unlearning masks with `labels != -100` on the UNSHIFTED labels
  (the answer tokens' own positions; activations predict nothing, so no shift), averages over each sequence's
  tokens and then over sequences; we average over all tokens of the global batch. WMDP's original averages over
  every position of the forget / retain text (pass the attention mask). The loss is forget + α·retain (WMDP; open-
  unlearning's extra weight γ on the forget term is 1 there by default). The control vector is drawn from a seeded
  generator, so every worker draws the same u (open-unlearning draws it from the global RNG, which it seeds per
  rank).
* Token-level DELETE / GSR / GHR have no open-unlearning counterpart; they are the classifier losses of delete.py /
  gsr.py / ghr.py applied to every answer position, with the true next token as the masked class (UNDIAL's
  `compute_undial_loss` is the nearest relative: it lowers, rather than removes, the true token's teacher logit).

GROGU on language models needs no code here: `grogu.combine_gradients` works on any two flat gradient vectors, and
`whole_set.flatten` / `unflatten` turn any two name-keyed gradient dicts with the same keys (e.g. two `grads_of`
snapshots) into those vectors and back. The LM form takes g_S from `token_mean(masked_teacher_kl(...))` and g_H
from `token_mean(masked_teacher_argmax_ce(...))` on the same batch and combines them as the classifier form does.
Two cautions for the engine: under LoRA, restrict the dicts to the trainable parameters (frozen ones only add
zeros, which change neither dot products nor norms, but cost a model's worth of memory); under FSDP each worker
holds a shard of each gradient, so the dot products must be summed over workers before deciding to project.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.methods.delete import delete_loss
from unlearn.methods.distill import MASKED_LOGIT

IGNORE_INDEX = -100  # Hugging Face's label for positions that are not scored


class Shifted(NamedTuple):
    """Logits aligned with the tokens they predict."""

    logits: torch.Tensor  # (N, L-1, V): logits[:, t] predicts labels[:, t + 1]
    labels: torch.Tensor  # (N, L-1): the predicted tokens, -100 where not scored
    valid: torch.Tensor  # (N, L-1) bool: labels != -100


class TokenSum(NamedTuple):
    """A loss summed over valid tokens, with how many there were (the engine normalises by the global count)."""

    total: torch.Tensor  # scalar, with the graph of the logits it came from
    count: torch.Tensor  # scalar int64


def shift(logits: torch.Tensor, labels: torch.Tensor) -> Shifted:
    """Align a causal LM's logits (N, L, V) with the labels (N, L) they predict (HF's `logits[:, :-1]` vs
    `labels[:, 1:]`), with the bool mask of the positions that are scored."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)} in (N, L)")
    labels = labels[:, 1:]
    return Shifted(logits[:, :-1], labels, labels != IGNORE_INDEX)


def _rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The valid positions gathered to rows: (logit rows (M, V) in float32, their targets (M,), sequence of each
    row (M,)). Only answer rows are copied, so the float32 copy costs M·V, not N·L·V."""
    s = shift(logits, labels)
    rows = s.valid.nonzero(as_tuple=True)
    return s.logits[rows].float(), s.labels[rows], rows[0]


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL summed over each sequence's answer tokens (N,), answer-token count per sequence (N,)).

    -nll is the sequence log-probability log p(y|x) of NPO / SimNPO; open-unlearning's `compute_batch_nll` is the
    same sum (it computes it on the whole grid with ignore_index; we only on the answer rows).
    """
    rows, targets, seq = _rows(logits, labels)
    token_nll = F.cross_entropy(rows, targets, reduction="none")
    n = labels.shape[0]
    nll = torch.zeros(n, dtype=token_nll.dtype, device=token_nll.device).index_add(0, seq, token_nll)
    tokens = torch.bincount(seq, minlength=n)
    return nll, tokens


def nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> TokenSum:
    """NLL summed over every answer token of the batch (the fine-tuning / retain term), with the token count."""
    nll, tokens = sequence_nll(logits, labels)
    return TokenSum(nll.sum(), tokens.sum())


def token_mean(total: torch.Tensor, count: torch.Tensor | int, global_count: torch.Tensor | int | None = None,
               world_size: int = 1) -> torch.Tensor:
    """The per-worker loss `total * world_size / global_count`.

    DDP averages gradients over the `world_size` workers, so the step follows Σ_workers total / global_count: the
    mean over every token of the global batch, however unevenly the tokens fall across workers. `global_count` is
    the all-reduced (summed) `count`; without it (one process) this is total / count. A global count of 0 (no
    answer token anywhere) gives 0, not NaN.
    """
    if global_count is None:
        if world_size != 1:
            raise ValueError("token_mean over several workers needs the global count (the all-reduced sum of count)")
        global_count = count
    denominator = torch.as_tensor(global_count, device=total.device).clamp_min(1).to(total.dtype)
    return total * world_size / denominator


def ga_loss(logits: torch.Tensor, labels: torch.Tensor) -> TokenSum:
    """Gradient ascent on forget answers: minus the NLL sum (minimising it raises the NLL), with the token count."""
    nll = nll_sum(logits, labels)
    return TokenSum(-nll.total, nll.count)


def grad_diff_loss(forget_nll: torch.Tensor, retain_nll: torch.Tensor, gamma: float = 1.0,
                   alpha: float = 1.0) -> torch.Tensor:
    """GradDiff as open-unlearning: gamma · (-NLL on forget) + alpha · NLL on retain.

    Both NLLs are normalised token means (`token_mean` of `nll_sum`, each with its own global count), the roles
    of open-unlearning's `model(**inputs).loss`.
    """
    return gamma * -forget_nll + alpha * retain_nll


def npo_loss(policy_logp_seq: torch.Tensor, ref_logp_seq: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO per sequence: -(2/β) log σ(-β (log p_θ(y|x) - log p_ref(y|x))), shape (N,).

    The log-probs are sums over answer tokens (`-sequence_nll`); the reference's carries no graph. At
    p_θ = p_ref each sequence costs (2/β) log 2, falling towards 0 as p_θ drops below p_ref (and its gradient
    vanishing there, NPO's bound on GA's collapse). open-unlearning's `compute_dpo_loss` with only lose inputs is
    the same formula; it then takes the batch mean, we leave the reduction to `token_mean` over sequences.
    """
    return -2.0 / beta * F.logsigmoid(-beta * (policy_logp_seq - ref_logp_seq))


def simnpo_loss(policy_logp_seq: torch.Tensor, tokens: torch.Tensor, beta: float, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO per sequence (Fan et al. 2024): -(2/β) log σ(-(β/|y|) log p_θ(y|x) - γ), shape (N,).

    Reference-free; the log-prob is length-normalised by the answer's token count |y| (`tokens`), so equal
    per-token log-probs cost the same at any length. γ is the paper's margin: open-unlearning's / SimNPO's code
    `delta` (`gamma` there) sits inside the β product, δ = γ / β. A sequence without answer tokens counts |y| = 1
    (its log-prob is 0).
    """
    length = tokens.clamp_min(1).to(policy_logp_seq.dtype)
    return -2.0 / beta * F.logsigmoid(-beta / length * policy_logp_seq - gamma)


def masked_teacher_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 1.0) -> TokenSum:
    """Token-level DELETE / GSR: KL(masked teacher ‖ student) at temperature T, × T², summed over answer positions.

    The masked teacher is the teacher's next-token distribution with the true next token's logit set to
    MASKED_LOGIT before softmax(· / T), so it puts no mass on the token to forget and keeps the rest of the
    teacher's dark knowledge. The valid positions are gathered to (M, V) rows and passed to the classifier's
    `delete_loss` (a batch mean), times M: classifier and LM share one formula. With a single forgotten class per
    row, GSR's renormalised teacher is the same distribution, so this is the token form of both.
    """
    student, targets, _ = _rows(student_logits, labels)
    teacher, _, _ = _rows(teacher_logits, labels)
    count = torch.tensor(len(targets), device=targets.device)
    if len(targets) == 0:  # delete_loss's batch mean of nothing is NaN; the sum of nothing is 0 (with a graph)
        return TokenSum(student.sum(), count)
    return TokenSum(delete_loss(student, teacher, targets, temperature) * len(targets), count)


def masked_teacher_argmax_ce(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                             labels: torch.Tensor) -> TokenSum:
    """Token-level GHR: cross-entropy of the student to the masked teacher's arg-max at each answer position, summed.

    The target is the teacher's most likely next token other than the true one (the same masking as
    `masked_teacher_kl`; the arg-max does not depend on T), so the student is relabelled to the original model's
    runner-up rather than to noise.
    """
    student, targets, _ = _rows(student_logits, labels)
    teacher, _, _ = _rows(teacher_logits, labels)
    relabel = teacher.scatter(1, targets[:, None], MASKED_LOGIT).argmax(dim=1)
    count = torch.tensor(len(targets), device=targets.device)
    return TokenSum(F.cross_entropy(student, relabel, reduction="sum"), count)


# --- RMU --------------------------------------------------------------------------------------------------------

def random_control_vector(hidden: int, seed: int, dtype: torch.dtype = torch.float32,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """RMU's random direction u (hidden,): uniform [0, 1) entries scaled to unit norm, as WMDP's RMU.

    Drawn from its own generator seeded with `seed`, so every worker (and every rerun) gets the same u.
    """
    u = torch.rand(hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    return (u / u.norm()).to(dtype=dtype, device=device)


def activation_mse(acts: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> TokenSum:
    """Σ over the selected positions of the per-token mean squared error over the hidden dimension, with the count.

    acts (N, L, H); target broadcastable to it; mask (N, L) bool (None: every position). Computed in float32.
    """
    per_token = (acts.float() - target.float()).pow(2).mean(dim=-1)
    if mask is None:
        mask = torch.ones(per_token.shape, dtype=torch.bool, device=per_token.device)
    return TokenSum(per_token[mask].sum(), mask.sum())


@dataclass(frozen=True)
class RMULoss:
    """RMU's two token sums; `value` normalises each by its (global) token count and weights the retain term."""

    forget: TokenSum  # activations on forget text vs c·u
    retain: TokenSum  # activations on retain text vs the frozen original's
    alpha: float

    def value(self, forget_global: torch.Tensor | int | None = None, retain_global: torch.Tensor | int | None = None,
              world_size: int = 1) -> torch.Tensor:
        """token mean of the forget term + α · token mean of the retain term (see `token_mean`)."""
        return (token_mean(self.forget.total, self.forget.count, forget_global, world_size)
                + self.alpha * token_mean(self.retain.total, self.retain.count, retain_global, world_size))


def rmu_loss(forget_acts: torch.Tensor, retain_acts: torch.Tensor, original_retain_acts: torch.Tensor,
             control_vector: torch.Tensor, steering_coeff: float, alpha: float,
             forget_mask: torch.Tensor | None = None, retain_mask: torch.Tensor | None = None) -> RMULoss:
    """RMU (Li et al. 2024, WMDP): push a layer's activations on forget text towards c·u, keep them on retain text.

    forget_acts / retain_acts (N, L, H) from `layer_activations` of the model being unlearned; original_retain_acts
    the same layer of the frozen original (no graph); control_vector u (H,) from `random_control_vector`; c =
    steering_coeff. The masks choose the token positions: `labels != -100` (unshifted) for open-unlearning's
    answer-token form, the attention mask for WMDP's every-token form; None takes every position.
    """
    target = steering_coeff * control_vector.to(device=forget_acts.device, dtype=torch.float32)
    return RMULoss(forget=activation_mse(forget_acts, target, forget_mask),
                   retain=activation_mse(retain_acts, original_retain_acts.detach(), retain_mask), alpha=alpha)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a Hugging Face causal LM, under any wrapper (peft, DDP): the first ModuleList in
    module order whose length is the config's layer count (llama's `model.layers`, gpt2's `transformer.h`)."""
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "num_hidden_layers")),
                  None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no transformers config with num_hidden_layers")
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == config.num_hidden_layers:
            return module
    raise ValueError(f"no list of {config.num_hidden_layers} decoder layers in {type(model).__name__}")


def layer_activations(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      layer: int) -> torch.Tensor:
    """The hidden state (N, L, H) after decoder layer `layer` (0-based, as WMDP's `layer_id` and open-unlearning's
    `model.layers.<i>`), caught by a forward hook during one forward of `model` (`layer_forward`).

    It carries a graph whenever the forward does (grad enabled and trainable weights at or below the layer), so it
    serves both the student and, under `torch.no_grad()` or `frozen_reference`, the frozen original. A hook rather
    than `output_hidden_states`: llama's last hidden state there is after the final norm, not the layer's output.
    """
    return layer_forward(model, decoder_layers(model)[layer], input_ids, attention_mask)[0]


def layer_forward(model: nn.Module, layer: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
    """(the hidden state (N, L, H) after the decoder layer module `layer`, the model's output) of one forward of
    `model`. The hooked layer is given apart from the model that runs: a LoRA run's frozen original is the student
    with its adapters off (`causal_lm.AdaptersOff`), which runs through the student's own layers; the output is
    kept for a caller that ties the layers above to its loss (RMU)."""
    caught: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor | tuple) -> None:
        # layers return a tensor or a tuple (hidden, cache, attentions) depending on family and version;
        # activation checkpointing may run the layer again in backward, after the hook is gone
        caught.append(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return caught[0], output
