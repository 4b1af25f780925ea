"""Token-level loss maths of the LLM unlearning methods (`unlearn.methods.token_losses`): hand computations on tiny
tensors, the shift alignment, positions labelled -100 that never count, the classifier/LM equivalence of DELETE,
NPO/SimNPO's shapes, the global-token-mean gradient under simulated DDP, and GA / RMU steps on a tiny llama."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from unlearn.methods.delete import delete_loss
from unlearn.methods.grogu import combine_gradients
from unlearn.methods.token_losses import (activation_mse, decoder_layers, ga_loss, grad_diff_loss, layer_activations,
                                          masked_teacher_argmax_ce, masked_teacher_kl, nll_sum, npo_loss,
                                          random_control_vector, rmu_loss, sequence_nll, shift, simnpo_loss,
                                          token_mean)
from unlearn.methods.whole_set import flatten, unflatten

V = 5


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _logits(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, length, V, generator=torch.Generator().manual_seed(seed))


# Two sequences of length 4: the first answers at positions 2, 3; the second only at position 3.
LABELS = torch.tensor([[-100, -100, 1, 4], [-100, -100, -100, 2]])


def _tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def _qa_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two question/answer sequences of 8 tokens: answers in the last 3 (first) and last 2 (second) positions."""
    ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, :6] = -100
    return ids, torch.ones_like(ids), labels


# --- alignment and NLL ------------------------------------------------------------------------------------------

def test_shift_aligns_each_logit_with_the_next_token():
    logits = _logits(2, 4)
    s = shift(logits, LABELS)
    assert s.logits.shape == (2, 3, V) and s.labels.shape == (2, 3)
    assert torch.equal(s.logits, logits[:, :3]) and torch.equal(s.labels, LABELS[:, 1:])
    assert s.valid.tolist() == [[False, True, True], [False, False, True]]
    with pytest.raises(ValueError, match="do not match"):
        shift(logits, LABELS[:, :3])


def test_sequence_nll_by_hand():
    logits = _logits(2, 4)
    logp = torch.log_softmax(logits, dim=-1)
    nll, tokens = sequence_nll(logits, LABELS)
    # position t's logits predict labels[t + 1]: sequence 0 scores token 1 at t=1 and token 4 at t=2
    expected = torch.stack([-(logp[0, 1, 1] + logp[0, 2, 4]), -logp[1, 2, 2]])
    assert torch.allclose(nll, expected) and tokens.tolist() == [2, 1]
    total = nll_sum(logits, LABELS)
    assert torch.allclose(total.total, expected.sum()) and total.count.item() == 3
    ga = ga_loss(logits, LABELS)
    assert torch.allclose(ga.total, -expected.sum()) and ga.count.item() == 3


def test_ignored_positions_contribute_nothing():
    """Changing (even to inf/NaN) the logits at positions whose next label is -100 leaves every loss unchanged."""
    student, teacher = _logits(2, 4, 0), _logits(2, 4, 1)
    edited_s, edited_t = student.clone(), teacher.clone()
    edited_s[0, 0], edited_s[1, :2], edited_s[:, 3] = float("nan"), 1e6, float("-inf")  # none predicts an answer
    edited_t[0, 0], edited_t[1, :2], edited_t[:, 3] = float("inf"), -3.0, float("nan")
    for fn in (lambda s, t: sequence_nll(s, LABELS)[0], lambda s, t: masked_teacher_kl(s, t, LABELS, 2.0).total,
               lambda s, t: masked_teacher_argmax_ce(s, t, LABELS).total):
        assert torch.allclose(fn(student, teacher), fn(edited_s, edited_t))


def test_no_answer_token_gives_zero_not_nan():
    labels = torch.full((2, 4), -100)
    student = _logits(2, 4).requires_grad_()
    kl = masked_teacher_kl(student, _logits(2, 4, 1), labels)
    assert kl.total.item() == 0 and kl.count.item() == 0
    kl.total.backward()
    assert torch.equal(student.grad, torch.zeros_like(student))
    assert token_mean(kl.total, kl.count).item() == 0
    nll, tokens = sequence_nll(_logits(2, 4), labels)
    assert nll.tolist() == [0, 0] and tokens.tolist() == [0, 0]


# --- token-level DELETE / GSR / GHR --------------------------------------------------------------------------------

def test_masked_teacher_kl_by_hand():
    student, teacher = _logits(2, 4, 0), _logits(2, 4, 1)
    temperature = 2.0
    expected = torch.tensor(0.0)
    for i, t in [(0, 1), (0, 2), (1, 2)]:
        true = LABELS[i, t + 1]
        masked = teacher[i, t].clone()
        masked[true] = -1e10
        p = torch.softmax(masked / temperature, dim=-1)
        assert p[true].item() == 0.0  # the masked teacher puts zero mass on the true token
        log_q = torch.log_softmax(student[i, t] / temperature, dim=-1)
        nonzero = p > 0
        expected = expected + (p[nonzero] * (p[nonzero].log() - log_q[nonzero])).sum() * temperature**2
    kl = masked_teacher_kl(student, teacher, LABELS, temperature)
    assert torch.allclose(kl.total, expected, atol=1e-6) and kl.count.item() == 3


def test_masked_teacher_kl_equals_the_classifier_delete_loss_on_one_position():
    """Length-2 sequences answering only their last token: after the shift, (N, 1, V) logits are classifier logits
    (N, V) with the answer as the label, and the LM sum is the classifier's batch mean times N."""
    n = 6
    student, teacher = _logits(n, 2, 0), _logits(n, 2, 1)
    y = torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(2))
    labels = torch.stack([torch.full((n,), -100), y], dim=1)
    for temperature in (1.0, 4.0):
        kl = masked_teacher_kl(student, teacher, labels, temperature)
        classifier = delete_loss(student[:, 0], teacher[:, 0], y, temperature)
        assert torch.allclose(kl.total, classifier * n, atol=1e-6) and kl.count.item() == n


def test_masked_teacher_kl_is_zero_when_the_student_is_the_masked_teacher():
    teacher = _logits(2, 4, 1)
    student = teacher.clone()
    s = shift(student, LABELS)
    student[:, :3].scatter_(2, s.labels.clamp_min(0)[..., None], -1e10)  # student = the masked teacher's logits
    assert masked_teacher_kl(student, teacher, LABELS, 3.0).total.abs().item() < 1e-6


def test_masked_teacher_argmax_ce_by_hand():
    student = _logits(1, 3, 0)
    teacher = torch.tensor([[[0.0, 1.0, 0.0, 5.0, 2.0],  # predicts labels[1] = 3, the arg-max: masked, so 4
                             [9.0, 0.0, 0.0, 0.0, 0.0],  # predicts labels[2] = 2: the arg-max 0 stays
                             [0.0, 0.0, 0.0, 0.0, 7.0]]])  # predicts nothing
    labels = torch.tensor([[-100, 3, 2]])
    ce = masked_teacher_argmax_ce(student, teacher, labels)
    logp = torch.log_softmax(student, dim=-1)
    assert torch.allclose(ce.total, -(logp[0, 0, 4] + logp[0, 1, 0])) and ce.count.item() == 2


def test_grogu_combination_works_on_lm_gradient_dicts():
    """combine_gradients + flatten/unflatten need no LM-specific code: two name-keyed gradient dicts of a model."""
    model = _tiny_llama()
    ids, attention, labels = _qa_batch()
    teacher = copy.deepcopy(model).requires_grad_(False)
    grads = []
    soft_loss, hard_loss = (lambda s, t: masked_teacher_kl(s, t, labels, 2.0),
                            lambda s, t: masked_teacher_argmax_ce(s, t, labels))
    for loss_fn in (soft_loss, hard_loss):
        model.zero_grad()
        with torch.no_grad():
            t = teacher(input_ids=ids, attention_mask=attention).logits
        part = loss_fn(model(input_ids=ids, attention_mask=attention).logits, t)
        token_mean(part.total, part.count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    g_soft, g_hard = grads
    combined, projected = combine_gradients(flatten(g_hard), flatten(g_soft), "always")
    assert projected
    back = unflatten(combined, g_soft)
    assert list(back) == list(g_soft) and all(back[n].shape == g_soft[n].shape for n in back)
    g_h_proj = combined - flatten(g_soft)
    assert abs(F.cosine_similarity(g_h_proj, flatten(g_soft), dim=0).item()) < 1e-4  # g_H' is orthogonal to g_S


# --- NPO, SimNPO, GradDiff ------------------------------------------------------------------------------------

def test_npo_at_the_reference_is_two_over_beta_log_two_and_falls_with_the_policy():
    beta = 0.1
    ref = torch.tensor([-3.0, -10.0, -0.5])
    assert torch.allclose(npo_loss(ref, ref, beta), torch.full((3,), 2 / beta * math.log(2)))
    values = [npo_loss(ref - drop, ref, beta) for drop in (0.0, 1.0, 5.0, 50.0)]
    assert all(bool((a > b).all()) for a, b in zip(values, values[1:]))
    # by hand: -(2/β) log σ(-β·Δ) at Δ = log p_θ - log p_ref = -1
    assert torch.allclose(values[1], torch.full((3,), -2 / beta * math.log(1 / (1 + math.exp(-beta)))))


def test_simnpo_normalises_by_length():
    beta, gamma = 2.5, 0.3
    per_token = -0.7
    tokens = torch.tensor([1, 4, 20])
    loss = simnpo_loss(per_token * tokens.float(), tokens, beta, gamma)
    assert torch.allclose(loss, loss[0].expand(3))
    expected = -2 / beta * math.log(1 / (1 + math.exp(-(-beta * per_token - gamma))))
    assert math.isclose(loss[0].item(), expected, rel_tol=1e-6)
    # open-unlearning's form -(2/β) log σ(β (NLL/|y| - δ)) with δ = γ/β is the same number
    nll = -per_token * tokens.float()
    theirs = -F.logsigmoid(beta * (nll / tokens - gamma / beta)) * 2 / beta
    assert torch.allclose(loss, theirs)


def test_grad_diff_weights():
    f, r = torch.tensor(2.0), torch.tensor(0.5)
    assert grad_diff_loss(f, r).item() == pytest.approx(-1.5)
    assert grad_diff_loss(f, r, gamma=0.5, alpha=3.0).item() == pytest.approx(-1.0 + 1.5)


# --- global token mean under DDP ------------------------------------------------------------------------------

def test_token_mean_gradient_under_ddp_is_the_global_token_mean():
    """Two workers with 5 and 1 answer tokens: averaging their per-worker gradients (what DDP does) gives the
    gradient of the single-process mean over all 6 tokens; averaging per-worker means would not."""
    weight = torch.randn(V, V, generator=torch.Generator().manual_seed(0), requires_grad=True)
    hidden = [torch.randn(2, 4, V, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    labels = [torch.tensor([[-100, 1, 2, 3], [-100, -100, 4, 0]]), torch.tensor([[-100, -100, -100, 2],
                                                                                [-100, -100, -100, -100]])]

    def grad(loss: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(loss, weight, retain_graph=True)  # parts are reused
        return g

    parts = [nll_sum(h @ weight, lab) for h, lab in zip(hidden, labels)]
    assert [p.count.item() for p in parts] == [5, 1]
    global_count = sum(p.count for p in parts)
    ddp = sum(grad(token_mean(p.total, p.count, global_count, world_size=2)) for p in parts) / 2
    single = grad(nll_sum(torch.cat(hidden) @ weight, torch.cat(labels)).total / 6)
    assert torch.allclose(ddp, single, atol=1e-6)
    naive = sum(grad(p.total / p.count) for p in parts) / 2
    assert not torch.allclose(naive, single, atol=1e-3)
    assert torch.allclose(token_mean(parts[0].total, parts[0].count), parts[0].total / 5)
    with pytest.raises(ValueError, match="global count"):
        token_mean(parts[0].total, parts[0].count, world_size=2)


# --- behaviour on a tiny llama ------------------------------------------------------------------------------------

def _answer_logp(model, ids, attention, labels) -> torch.Tensor:
    with torch.no_grad():
        nll, tokens = sequence_nll(model(input_ids=ids, attention_mask=attention).logits, labels)
    return -nll / tokens


def test_ga_lowers_the_answer_probability():
    model = _tiny_llama()
    ids, attention, labels = _qa_batch()
    before = _answer_logp(model, ids, attention, labels)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        optimizer.zero_grad()
        part = ga_loss(model(input_ids=ids, attention_mask=attention).logits, labels)
        token_mean(part.total, part.count).backward()
        optimizer.step()
    after = _answer_logp(model, ids, attention, labels)
    assert bool((after < before - 1.0).all()), (before, after)  # mean answer log-prob: about -3.7 -> -5.7


def test_layer_activations_is_the_layer_output_on_llama_gpt2_and_peft():
    from unlearn.models.causal_lm import apply_lora, build_causal_lm
    from unlearn.spec import CausalLMSpec, LoRASpec

    ids, attention, _ = _qa_batch()
    llama = _tiny_llama()
    acts = layer_activations(llama, ids, attention, 0)
    assert acts.shape == (2, 8, 32) and acts.requires_grad
    with torch.no_grad():
        hidden = llama(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        assert not layer_activations(llama, ids, attention, 1).requires_grad
    assert torch.allclose(acts, hidden[1], atol=1e-6)  # hidden_states[i + 1] is layer i's output (not the last)
    assert decoder_layers(llama) is llama.model.layers

    torch.manual_seed(0)
    gpt2 = build_causal_lm(CausalLMSpec(config={"family": "gpt2", "layers": 2, "hidden": 32, "heads": 2}), 40)
    assert decoder_layers(gpt2) is gpt2.transformer.h
    with torch.no_grad():
        hidden = gpt2(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
        assert torch.allclose(layer_activations(gpt2, ids, attention, 0), hidden[1], atol=1e-6)

    peft = apply_lora(_tiny_llama(), LoRASpec(r=4, dropout=0.0))
    assert decoder_layers(peft) is peft.get_base_model().model.layers
    with torch.no_grad():
        base = layer_activations(_tiny_llama(), ids, attention, 1)
    lora_acts = layer_activations(peft, ids, attention, 1)
    assert torch.allclose(lora_acts, base, atol=1e-6) and lora_acts.requires_grad  # adapters start at zero


def test_random_control_vector_is_unit_norm_non_negative_and_seeded():
    u = random_control_vector(32, seed=7)
    assert u.shape == (32,) and math.isclose(u.norm().item(), 1.0, rel_tol=1e-6) and bool((u >= 0).all())
    assert torch.equal(u, random_control_vector(32, seed=7)) and not torch.equal(u, random_control_vector(32, 8))


def test_rmu_loss_by_hand_and_masks():
    forget = torch.arange(12.0).reshape(1, 3, 4)
    u = torch.tensor([1.0, 0.0, 0.0, 0.0])
    mask = torch.tensor([[False, True, True]])
    retain, original = torch.ones(2, 2, 4), torch.zeros(2, 2, 4)
    loss = rmu_loss(forget, retain, original, u, 2.0, alpha=3.0, forget_mask=mask)
    target = torch.tensor([2.0, 0.0, 0.0, 0.0])
    per_token = [((forget[0, t] - target) ** 2).mean() for t in (1, 2)]
    assert torch.allclose(loss.forget.total, sum(per_token)) and loss.forget.count.item() == 2
    assert loss.retain.total.item() == 4.0 and loss.retain.count.item() == 4
    assert torch.allclose(loss.value(), sum(per_token) / 2 + 3.0 * 1.0)
    # WMDP's form (every position) is F.mse_loss over the whole tensor
    every = activation_mse(forget, target)
    assert torch.allclose(every.total / every.count, F.mse_loss(forget, target.expand_as(forget)))


def test_rmu_steps_turn_forget_activations_towards_the_control_vector():
    model = _tiny_llama()
    original = copy.deepcopy(model).requires_grad_(False).eval()
    ids, attention, labels = _qa_batch()
    retain_ids = torch.randint(0, 40, (2, 8), generator=torch.Generator().manual_seed(9))
    u = random_control_vector(32, seed=0)
    forget_mask = labels != -100  # open-unlearning's positions: the answer tokens (unshifted)
    with torch.no_grad():
        original_retain = layer_activations(original, retain_ids, attention, 1)

    def cosine() -> float:
        with torch.no_grad():
            acts = layer_activations(model, ids, attention, 1)[forget_mask]
        return F.cosine_similarity(acts, u[None], dim=-1).mean().item()

    before = cosine()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        loss = rmu_loss(layer_activations(model, ids, attention, 1), layer_activations(model, retain_ids, attention, 1),
                        original_retain, u, steering_coeff=6.5, alpha=1.0, forget_mask=forget_mask)
        loss.value().backward()
        optimizer.step()
    after = cosine()
    assert before < 0.3 and after > 0.8, (before, after)  # about 0.14 -> 0.99


def test_layer_activations_under_activation_checkpointing_give_the_same_gradient():
    """The engine recomputes decoder layers in backward: the hook (gone by then) must not change the gradient."""
    from unlearn.models.causal_lm import enable_activation_checkpointing

    ids, attention, labels = _qa_batch()
    u = random_control_vector(32, seed=0)
    grads = []
    for checkpointing in (False, True):
        model = _tiny_llama().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        acts = layer_activations(model, ids, attention, 1)
        rmu_loss(acts, acts, torch.zeros_like(acts), u, 6.5, 1.0, forget_mask=labels != -100).value().backward()
        grads.append(model.model.layers[0].mlp.down_proj.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-7) and grads[0].norm() > 0
