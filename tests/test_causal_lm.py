"""Causal language models (`unlearn.models.causal_lm`): tiny llama / gpt2 from sizes, local folders loaded back
exactly (nothing downloaded), one-line errors before any weights are read, LoRA whose frozen reference is the base
with the adapters disabled (no copy), activation checkpointing that changes memory but not the numbers, bf16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from unlearn.errors import BadInput, SpecError
from unlearn.models.causal_lm import (apply_lora, build_causal_lm, check_causal_lm, enable_activation_checkpointing,
                                      frozen_reference, is_checkpointing, is_peft, load_tokenizer, reference_model,
                                      trainable_parameters)
from unlearn.spec import CausalLMSpec, LMConfigSpec, LoRASpec

TINY = {"layers": 2, "hidden": 32, "heads": 2}
VOCAB = 100


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _spec(family: str = "llama", **changes) -> CausalLMSpec:
    return CausalLMSpec(config={"family": family, **TINY}, **changes)


def _model(family: str = "llama", seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm(_spec(family, **changes), VOCAB)


def _batch(n: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(1))


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """A word-level tokenizer of ~100 tokens trained here (nothing downloaded), as a bare tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = [f"w{i}" for i in range(VOCAB - 3)]
    tok.train_from_iterator([" ".join(words[i:i + 10]) for i in range(0, len(words), 10)],
                            trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "</s>"]))
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, tokenizer_json) -> Path:
    """A tiny llama and its tokenizer saved with save_pretrained into one folder, as a pretrained model ships."""
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama")
    _model().save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return folder


# --- building --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_tiny_model_from_sizes_gives_logits_and_a_loss_and_is_seeded(family):
    model = _model(family)
    ids = _batch()
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (3, 10, VOCAB)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(VOCAB)).item(), rel=0.2)  # about uniform at first
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert torch.equal(_logits(_model(family), ids), _logits(model, ids))  # same seed, same model
    assert not torch.equal(_logits(_model(family, seed=1), ids), _logits(model, ids))


def test_the_sizes_reach_the_model():
    llama = _model()
    assert llama.config.model_type == "llama" and llama.config.num_hidden_layers == 2
    assert llama.config.intermediate_size == 88  # 8/3 x 32, rounded up to a multiple of 8
    gpt2 = _model("gpt2")
    assert gpt2.config.n_inner == 128 and gpt2.config.n_positions == 256
    wider = CausalLMSpec(config={"family": "gpt2", **TINY, "vocab_size": 120})  # room for tokens added later
    assert build_causal_lm(wider, VOCAB).config.vocab_size == 120
    with pytest.raises(SpecError, match="smaller than the tokenizer"):
        build_causal_lm(CausalLMSpec(config={"family": "gpt2", **TINY, "vocab_size": 50}), VOCAB)
    with pytest.raises(SpecError, match="vocab_size"):
        build_causal_lm(_spec())  # neither the spec nor a tokenizer gives the vocabulary


def test_a_saved_folder_loads_back_with_identical_logits_and_its_tokenizer(llama_folder):
    spec = CausalLMSpec(path=str(llama_folder))
    check_causal_lm(spec)
    tokenizer = load_tokenizer(spec)
    assert len(tokenizer) == VOCAB and tokenizer.pad_token == "<pad>"
    loaded = build_causal_lm(spec, len(tokenizer))
    ids = torch.tensor(tokenizer(["w1 w2 w3 w4", "w5 w6 w7 w8"])["input_ids"])
    assert ids.max() < VOCAB and not (ids == tokenizer.unk_token_id).any()
    assert torch.equal(_logits(loaded, ids), _logits(_model(), ids))
    assert loaded.dtype == torch.float32


def test_a_bare_tokenizer_json_gets_its_special_tokens_and_a_pad(tokenizer_json, tmp_path):
    tokenizer = load_tokenizer(_spec(tokenizer=str(tokenizer_json)))
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    batch = tokenizer(["w1 w2", "w3"], padding=True)
    assert batch["input_ids"][1][-1] == tokenizer.pad_token_id and batch["attention_mask"][1] == [1, 0]
    # a folder holding only a tokenizer.json (no tokenizer_config.json) is the same tokenizer
    (tmp_path / "tokenizer.json").write_text(tokenizer_json.read_text())
    assert load_tokenizer(_spec(tokenizer=str(tmp_path)))("w1 w2")["input_ids"] == tokenizer("w1 w2")["input_ids"]


def test_bf16_precision_builds_and_loads_in_bfloat16(llama_folder):
    assert _model(precision="bf16").dtype == torch.bfloat16
    loaded = build_causal_lm(CausalLMSpec(path=str(llama_folder), precision="bf16"), VOCAB)
    assert loaded.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    ids = _batch()
    assert torch.allclose(_logits(loaded, ids), _logits(_model(), ids), atol=0.05)  # bf16 rounding only


# --- bad inputs: one line each, before any weights are read ---------------------------------------------------

def _one_line(call) -> str:
    with pytest.raises(BadInput) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_folders_and_tokenizers_are_one_line(tmp_path, llama_folder):
    build = lambda **spec: build_causal_lm(CausalLMSpec(**spec), VOCAB)  # noqa: E731
    assert "not a folder" in _one_line(lambda: build(path=str(tmp_path / "absent")))
    assert "no config.json" in _one_line(lambda: build(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert "not a causal LM" in _one_line(lambda: build(path=str(tmp_path)))
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))  # a diffusers folder
    assert "no model_type" in _one_line(lambda: build(path=str(tmp_path)))
    (tmp_path / "config.json").write_text((llama_folder / "config.json").read_text())
    assert "no weights" in _one_line(lambda: build(path=str(tmp_path)))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "cannot load a causal LM" in _one_line(lambda: build(path=str(tmp_path)))
    # a model folder without tokenizer files, and no model.tokenizer
    assert "no tokenizer files" in _one_line(lambda: check_causal_lm(CausalLMSpec(path=str(tmp_path))))
    assert "no tokenizer files" in _one_line(lambda: load_tokenizer(CausalLMSpec(path=str(tmp_path))))
    assert "required for a model built from model.config" in _one_line(lambda: load_tokenizer(_spec()))
    assert "no such file" in _one_line(lambda: load_tokenizer(_spec(tokenizer=str(tmp_path / "nope.json"))))
    (tmp_path / "tokenizer.json").write_text("{ not json")
    assert "cannot load a tokenizer" in _one_line(lambda: load_tokenizer(_spec(tokenizer=str(tmp_path))))


def test_lora_on_modules_the_model_lacks_is_one_line_before_the_weights(tmp_path, llama_folder):
    nope = LoRASpec(target_modules=["nope", "q_proj"])
    message = _one_line(lambda: apply_lora(_model(), nope))
    assert "'nope'" in message and "'q_proj'" not in message and "q_proj" in message  # names the linear layers
    assert "c_attn" in _one_line(lambda: check_causal_lm(_spec("gpt2", lora={"target_modules": ["q_proj"]})))
    # the folder's weights are unreadable: the LoRA error still comes first (from a weightless skeleton)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_text((llama_folder / name).read_text())
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    spec = CausalLMSpec(path=str(tmp_path), lora={"target_modules": ["nope"]})
    assert "'nope'" in _one_line(lambda: check_causal_lm(spec))
    assert "'nope'" in _one_line(lambda: build_causal_lm(spec, VOCAB))


# --- LoRA and the frozen reference ----------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_trains_only_adapters_and_the_reference_is_the_base_without_a_copy(family):
    ids = _batch()
    before = _logits(_model(family), ids)
    model = _model(family, lora={"r": 4, "dropout": 0.0})
    assert is_peft(model)
    assert torch.equal(_logits(model, ids), before)  # adapters start at zero
    trainable, total = trainable_parameters(model)
    assert 0 < trainable < total / 10
    assert all(("lora_" in name) == p.requires_grad for name, p in model.named_parameters())
    assert reference_model(model) is model  # no second model in memory

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert not torch.allclose(_logits(model, ids), before)  # the student moved
    with frozen_reference(model) as reference:
        assert not any(m.training for m in reference.modules())
        logits = reference(input_ids=ids).logits
        assert not logits.requires_grad
        assert torch.allclose(logits, before, atol=1e-6)  # the reference did not
    assert model.training  # the student's mode and adapters are back
    assert not torch.allclose(_logits(model, ids), before)


def test_the_reference_of_a_ddp_wrapped_lora_model_is_its_base(tmp_path):
    """Handed the DDP wrapper (as a training loop holds it), the reference still switches the adapters off."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ids = _batch()
        before = _logits(_model(), ids)
        wrapped = DistributedDataParallel(_model(lora={"r": 4, "dropout": 0.0}))
        assert is_peft(wrapped)
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=0.05)
        wrapped(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        assert not torch.allclose(wrapped(input_ids=ids).logits.detach(), before)
        with frozen_reference(wrapped) as reference:
            assert torch.allclose(reference(input_ids=ids).logits, before, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_a_fully_trained_model_keeps_a_frozen_copy_as_its_reference():
    ids = _batch()
    model = _model().train()
    before = _logits(model, ids)
    reference = reference_model(model)
    assert reference is not model and not any(p.requires_grad for p in reference.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    with frozen_reference(model, reference) as frozen:
        assert torch.equal(frozen(input_ids=ids).logits, before)
    assert not torch.allclose(_logits(model, ids), before)
    with pytest.raises(ValueError, match="reference_model"):
        with frozen_reference(model):
            pass


# --- activation checkpointing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("lora", [None, {"r": 4, "dropout": 0.0}])
def test_activation_checkpointing_recomputes_with_the_same_loss_and_gradients(lora):
    ids = _batch()
    runs = []
    for checkpointing in (False, True):
        model = _model(lora=lora, activation_checkpointing=checkpointing).train()
        calls = []
        hf = model.get_base_model() if lora else model
        hf.model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((loss.detach(), grads, len(calls), hf.config.use_cache))
    (loss, grads, calls, cache), (loss_ckpt, grads_ckpt, calls_ckpt, cache_ckpt) = runs
    assert (calls, calls_ckpt) == (1, 2)  # the layer really ran again in backward
    assert cache_ckpt is False
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 0
    for name in grads:
        assert torch.allclose(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-4), name


def test_checkpointing_can_be_switched_on_after_building():
    model = _model()
    assert not is_checkpointing(model)
    enable_activation_checkpointing(model)
    assert is_checkpointing(model) and model.config.use_cache is False


# --- the spec -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data", [
    {},  # neither path nor config
    {"path": "/m", "config": {"family": "llama"}},  # both
    {"config": {"family": "bert"}},
    {"config": {"family": "llama", "hidden": 32, "heads": 3}},  # heads must divide hidden
    {"config": {"family": "llama", "hidden": 48, "heads": 16}},  # llama's RoPE needs an even head dimension
    {"config": {"family": "gpt2", "layers": 0}},
    {"config": {"family": "gpt2", "vocab_size": 1}},
    {"config": {"family": "gpt2"}, "lora": {"r": 0}},
    {"config": {"family": "gpt2"}, "lora": {"dropout": 1.5}},
    {"config": {"family": "gpt2"}, "lora": {"target_modules": []}},
    {"config": {"family": "gpt2"}, "precision": "fp16"},
    {"config": {"family": "gpt2"}, "lorra": {}},  # unknown key
])
def test_the_spec_refuses(data):
    with pytest.raises(ValidationError):
        CausalLMSpec(**data)


def test_the_spec_defaults():
    spec = CausalLMSpec(config={"family": "gpt2"}, lora={})
    assert (spec.name, spec.precision, spec.activation_checkpointing) == ("causal_lm", "fp32", False)
    assert spec.tokenizer is None
    assert (spec.lora.r, spec.lora.alpha, spec.lora.dropout, spec.lora.target_modules) == (8, 16.0, 0.05, None)
    assert (spec.config.max_positions, spec.config.vocab_size, spec.config.intermediate) == (256, None, None)
    assert LMConfigSpec(family="gpt2", hidden=48, heads=16).hidden == 48  # gpt2 has no rotary constraint
