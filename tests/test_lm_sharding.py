"""lm_sharding on two gloo processes against one process, on a tiny llama (2 layers, hidden 32): FSDP2 and DDP
training steps with gradient accumulation and global token-mean normalisation, LoRA under FSDP2, the sharded frozen
reference, sharded checkpoints resumed in a fresh process group, and lockstep greedy generation with uneven
prompts per rank.

One spawn of two workers runs every two-process scenario and saves what it saw (imports dominate the time); the
tests compare those records with the same loops run here in one process. A second spawn is the restarted job that
loads the first one's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_workers import free_port, gloo_group, spawn

from unlearn.comm import LocalComm, TorchDistComm
from unlearn.lm_sharding import (accumulation_steps, filler_row, frozen_reference_sharded, gather_full_state,
                                 gradient_sync, load_sharded, local_parameter_count, micro_batches, save_sharded,
                                 synced_greedy, wrap_causal_lm)
from unlearn.methods.token_losses import IGNORE_INDEX, nll_sum, token_mean
from unlearn.models.causal_lm import build_causal_lm, frozen_reference
from unlearn.spec import CausalLMSpec, LMConfigSpec, LoRASpec

VOCAB, PAD, LENGTH, ROWS, STEPS = 64, 0, 10, 4, 3
RANK_ROWS = [slice(0, 3), slice(3, 4)]  # three rows on rank 0, one on rank 1: uneven rows and answer tokens
MICRO = 2  # micro-batches per step on both ranks (rank 1's second one is a filler row)
CONFIG = LMConfigSpec(family="llama", layers=2, hidden=32, heads=2, vocab_size=VOCAB)
TOL = {"rtol": 1e-5, "atol": 1e-6}
PROMPT_LENGTHS = [5, 3, 7, 4]  # prompts 0-2 on rank 0 (right-padded there), prompt 3 on rank 1
NEW_TOKENS = 6
JOIN_TIMEOUT_S = 150  # a deadlocked collective would hang: the spawn is killed and the test fails


def _model(lora: bool = False, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    spec = CausalLMSpec(config=CONFIG, lora=LoRASpec(r=4, dropout=0.0) if lora else None)
    return build_causal_lm(spec)


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A global batch: right-padded rows with questions and answers of different lengths (labels only on answers)."""
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.full((ROWS, LENGTH), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for row, (question, answer) in enumerate([(3, 6), (2, 5), (4, 4), (2, 2)]):
        n = question + answer + int(torch.randint(0, 2, (), generator=g))
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
        labels[row, question:n] = ids[row, question:n]
    return ids, mask, labels


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask, _ = _batch(99)
    return ids, mask


def _train(model, optimizer, comm, rows: slice, micro: int, steps: range) -> list[float]:
    """`steps` optimizer steps on this worker's `rows` of each global batch, in `micro` micro-batches, with the loss
    normalised by the global batch's answer-token count. Returns the global token-mean NLL of each step."""
    losses = []
    for step in steps:
        ids, mask, labels = (t[rows] for t in _batch(step))
        count = (labels[:, 1:] != IGNORE_INDEX).sum()
        global_count = comm.all_reduce(count.clone())
        total = torch.zeros(())
        pieces = micro_batches(len(ids), micro)
        for k, piece in enumerate(pieces):
            part = (ids[piece], mask[piece], labels[piece]) if piece.stop > piece.start else filler_row(LENGTH, PAD)
            with gradient_sync(model, k == len(pieces) - 1):
                logits = model(input_ids=part[0], attention_mask=part[1]).logits
                nll = nll_sum(logits, part[2])
                token_mean(nll.total, nll.count, global_count, comm.world_size).backward()
            total += nll.total.detach()
        losses.append(float(comm.all_reduce(total) / global_count))
        optimizer.step()
        optimizer.zero_grad()
    return losses


def _prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """The four prompts, right-padded (synced_greedy re-packs them)."""
    g = torch.Generator().manual_seed(7)
    ids = torch.full((len(PROMPT_LENGTHS), max(PROMPT_LENGTHS)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(PROMPT_LENGTHS):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def _logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


# --- the two workers -------------------------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, folder: str, phase: str, eos: int) -> None:
    torch.set_num_threads(1)
    with gloo_group(rank, world, port):
        comm = TorchDistComm()
        rows = RANK_ROWS[rank]
        seen = _first_job(rank, comm, rows, folder, eos) if phase == "first" else _resumed_job(comm, rows, folder)
        torch.save(seen, Path(folder) / f"{phase}-rank{rank}.pt")


def _first_job(rank: int, comm, rows: slice, folder: str, eos: int) -> dict:
    seen: dict = {}
    probe = _probe()
    # (a) + (e): full training under FSDP2 and DDP; FSDP's reference is made before training
    for strategy in ("fsdp", "ddp"):
        model = wrap_causal_lm(_model(), strategy, "cpu")
        reference = frozen_reference_sharded(model) if strategy == "fsdp" else None
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        seen[strategy] = {"losses": _train(model, optimizer, comm, rows, MICRO, range(STEPS)),
                          "state": gather_full_state(model)}
        if reference is not None:
            with frozen_reference(model, reference) as frozen:
                seen["reference"] = {"logits": _logits(frozen, *probe),
                                     "local": local_parameter_count(reference),
                                     "student_local": local_parameter_count(model),
                                     "requires_grad": any(p.requires_grad for p in reference.parameters()),
                                     "training": reference.training}
            seen["fsdp"]["logits"] = _logits(model, *probe)
    # (b): LoRA under FSDP2; the reference is the student with its adapters disabled
    model = wrap_causal_lm(_model(lora=True), "fsdp", "cpu")
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    seen["lora"] = {"losses": _train(model, optimizer, comm, rows, MICRO, range(STEPS)),
                    "state": gather_full_state(model)}
    with frozen_reference(model, frozen_reference_sharded(model)) as frozen:
        seen["lora"]["reference_logits"] = _logits(frozen, *probe)
    # (c): AdamW under FSDP2, a sharded checkpoint after step 2, then step 3 uninterrupted
    model = wrap_causal_lm(_model(), "fsdp", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, optimizer, comm, rows, MICRO, range(2))
    save_sharded(model, optimizer, Path(folder) / "checkpoint", extra={"step": 2})
    saved = gather_full_state(model)
    seen["checkpoint"] = {"saved": saved, "loss3": _train(model, optimizer, comm, rows, MICRO, range(2, 3)),
                          "state3": gather_full_state(model)}
    # (d): greedy generation, three prompts on rank 0 and one on rank 1
    model = wrap_causal_lm(_model(), "fsdp", "cpu")
    ids, mask = _prompts()
    mine = slice(0, 3) if rank == 0 else slice(3, 4)
    seen["greedy"] = synced_greedy(model, ids[mine], mask[mine], NEW_TOKENS, PAD, eos, comm)
    # and a rank without any prompt (rank 1): it still takes part in every step
    lone = slice(0, 1) if rank == 0 else slice(0, 0)
    seen["greedy_lone"] = synced_greedy(model, ids[lone], mask[lone], NEW_TOKENS, PAD, eos, comm)
    return seen


def _resumed_job(comm, rows: slice, folder: str) -> dict:
    """A restarted group: a fresh model (another seed: the checkpoint must overwrite it), then one more step."""
    model = wrap_causal_lm(_model(seed=1), "fsdp", "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    extra = load_sharded(model, optimizer, Path(folder) / "checkpoint")
    loaded = gather_full_state(model)
    return {"extra": extra, "loaded": loaded, "loss3": _train(model, optimizer, comm, rows, MICRO, range(2, 3)),
            "state3": gather_full_state(model)}


def _spawn(folder: Path, phase: str, eos: int) -> list[dict]:
    """Run `phase` on two gloo workers; fail (and kill them) if they have not finished in JOIN_TIMEOUT_S."""
    spawn(_worker, (2, free_port(), str(folder), phase, eos), nprocs=2, timeout_s=JOIN_TIMEOUT_S, what=phase)
    return [torch.load(folder / f"{phase}-rank{r}.pt", weights_only=False) for r in range(2)]


# --- one process ---------------------------------------------------------------------------------------------------

def _one_process(lora: bool = False, optimizer: str = "sgd", steps: range = range(STEPS),
                 model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, list[float]]:
    model = model if model is not None else _model(lora=lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=0.5, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=1e-2))
    return model, _train(model, opt, LocalComm(), slice(0, ROWS), 1, steps)


def _hf_greedy(model, eos: int | None) -> torch.Tensor:
    """transformers' own greedy search on the four prompts, left-padded, as (4, NEW_TOKENS) with PAD after EOS."""
    ids, mask = _prompts()
    left_ids, left_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for row, n in enumerate(PROMPT_LENGTHS):
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    with torch.no_grad():
        out = model.generate(input_ids=left_ids, attention_mask=left_mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=PAD, eos_token_id=eos)[:, ids.shape[1]:]
    return torch.nn.functional.pad(out, (0, NEW_TOKENS - out.shape[1]), value=PAD)


@pytest.fixture(scope="module")
def eos() -> int:
    """An end token rank 1's prompt emits at its second step (so it finishes long before rank 0's prompts)."""
    return int(_hf_greedy(_model().eval(), None)[3, 1])


@pytest.fixture(scope="module")
def first(tmp_path_factory, eos) -> tuple[list[dict], Path]:
    folder = tmp_path_factory.mktemp("lm_sharding")
    return _spawn(folder, "first", eos), folder


# --- the tests -------------------------------------------------------------------------------------------------------

def test_accumulation_steps_keep_the_global_batch():
    assert accumulation_steps(global_batch=16, world_size=2, micro_batch=4) == 2
    assert accumulation_steps(global_batch=15, world_size=2, micro_batch=4) == 2  # shares 8 and 7
    assert accumulation_steps(global_batch=3, world_size=4, micro_batch=8) == 1
    assert micro_batches(7, 2) == [slice(0, 4), slice(4, 7)]
    assert micro_batches(1, 2) == [slice(0, 1), slice(1, 1)]  # the empty one runs filler_row
    with pytest.raises(ValueError):
        accumulation_steps(0, 2, 4)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["fsdp", "ddp"])
def test_two_workers_match_one_process_on_the_global_batch(first, strategy):
    """Uneven rows and answer tokens per rank, two micro-batches each (a filler on rank 1): the same losses and
    weights as one process stepping on the whole batch."""
    seen, _ = first
    model, losses = _one_process()
    for rank in range(2):
        assert seen[rank][strategy]["losses"] == pytest.approx(losses, rel=1e-5)
    assert seen[1][strategy]["state"] is None  # the full state is gathered on rank 0 only
    torch.testing.assert_close(seen[0][strategy]["state"], model.state_dict(), **TOL)
    assert not torch.equal(seen[0][strategy]["state"]["model.embed_tokens.weight"],
                           _model().state_dict()["model.embed_tokens.weight"])  # it did train


@pytest.mark.timeout(300)
def test_lora_under_fsdp_trains_only_the_adapters_and_matches_one_process(first):
    seen, _ = first
    model, losses = _one_process(lora=True)
    for rank in range(2):
        assert seen[rank]["lora"]["losses"] == pytest.approx(losses, rel=1e-5)
    state, initial = seen[0]["lora"]["state"], _model(lora=True).state_dict()
    torch.testing.assert_close(state, model.state_dict(), **TOL)
    changed = {k for k in state if not torch.equal(state[k], initial[k])}
    assert changed and all("lora_" in k for k in changed)
    assert any("lora_A" in k for k in changed) and any("lora_B" in k for k in changed)
    base = _model().eval()  # the reference (adapters disabled) is the untouched base model
    for rank in range(2):
        torch.testing.assert_close(seen[rank]["lora"]["reference_logits"], _logits(base, *_probe()), **TOL)


@pytest.mark.timeout(300)
def test_sharded_reference_holds_half_and_computes_the_original(first):
    seen, _ = first
    original = _model().eval()
    total = sum(p.numel() for p in original.parameters())
    counts = [seen[r]["reference"]["local"] for r in range(2)]
    assert sum(counts) == total and all(abs(c - total / 2) < 0.02 * total for c in counts)
    assert counts == [seen[r]["reference"]["student_local"] for r in range(2)]
    for rank in range(2):
        ref = seen[rank]["reference"]
        assert not ref["requires_grad"] and not ref["training"]
        # the weights from before training, not the trained student's (a copy, not a view of its shards)
        torch.testing.assert_close(ref["logits"], _logits(original, *_probe()), **TOL)
        assert not torch.allclose(seen[rank]["fsdp"]["logits"], ref["logits"], atol=1e-3)


@pytest.mark.timeout(300)
def test_sharded_checkpoint_resumes_in_a_fresh_process_group(first, eos):
    seen, folder = first
    resumed = _spawn(folder, "resumed", eos)
    assert resumed[0]["extra"] == {"step": 2} and resumed[1]["extra"] == {"step": 2}
    assert len(list((folder / "checkpoint").glob("*.distcp"))) == 2  # one file of shards per rank
    torch.testing.assert_close(resumed[0]["loaded"], seen[0]["checkpoint"]["saved"], rtol=0, atol=0)
    for rank in range(2):  # optimizer state came back too: the next step is the uninterrupted one
        assert resumed[rank]["loss3"] == seen[rank]["checkpoint"]["loss3"]
    torch.testing.assert_close(resumed[0]["state3"], seen[0]["checkpoint"]["state3"], rtol=0, atol=0)
    model, _ = _one_process(optimizer="adamw", steps=range(3))  # and it is the one-process run's third step
    torch.testing.assert_close(resumed[0]["state3"], model.state_dict(), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(300)
def test_synced_greedy_with_uneven_prompts_per_rank(first, eos):
    seen, _ = first
    expected = _hf_greedy(_model().eval(), eos)
    got = torch.cat([seen[0]["greedy"], seen[1]["greedy"]])
    assert torch.equal(got, expected)
    assert torch.equal(synced_greedy(_model(), *_prompts(), NEW_TOKENS, PAD, eos, LocalComm()), expected)
    assert (expected[3, 2:] == PAD).all() and (expected[:3, -1] != PAD).any()  # rank 1 finished first
    assert seen[1]["greedy_lone"].shape == (0, NEW_TOKENS)
    assert torch.equal(seen[0]["greedy_lone"], expected[:1])
