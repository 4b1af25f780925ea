"""Causal language models (the `causal_lm` family): any Hugging Face `AutoModelForCausalLM` from a local folder, or
a small llama / gpt2 built from sizes, with optional LoRA adapters, bf16 weights and activation checkpointing.

Nothing is downloaded: folders load with `local_files_only=True`. Every problem the user can fix (a path that is
no model folder, a folder that is no causal LM, a missing tokenizer, LoRA on modules the model lacks) is one line
(BadInput: exit 2), found from the files and a weightless (meta-device) skeleton before any weights are read;
`check_causal_lm` runs those checks alone, for a job's validation before any work.

The frozen reference that DELETE/NPO compare the student against must not cost a second full copy where it can
be avoided: under LoRA it is the same model with its adapters disabled (`frozen_reference`); only a fully trained
model needs a frozen copy (`reference_model`, which the engine shards like the student).

transformers and peft are imported inside the functions, so importing this module (and the model registry) stays
cheap.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from unlearn.errors import BadInput, SpecError
from unlearn.spec import CausalLMSpec, LMConfigSpec, LoRASpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# What save_pretrained writes for the weights (one file, or an index of shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone holds none).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
# The family's usual LoRA targets: the attention projections (what the LoRA paper adapts).
DEFAULT_TARGETS = {"llama": ["q_proj", "v_proj"], "gpt2": ["c_attn"]}
# Special tokens of a bare tokenizer.json are found by their usual spellings (the file does not say their roles).
_ROLES = {
    "pad_token": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>"),
    "eos_token": ("</s>", "<|endoftext|>", "<eos>", "[EOS]", "<|eos|>", "<|end_of_text|>"),
    "bos_token": ("<s>", "<bos>", "[BOS]", "<|bos|>", "<|startoftext|>", "<|begin_of_text|>"),
    "unk_token": ("<unk>", "[UNK]", "<|unk|>"),
}


# --- cheap checks: files and configs, no weights ------------------------------------------------------------

def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def model_folder(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """The folder of a saved causal LM and its config.json, or one line saying why it is not one."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInput(f"model.path: not a folder: {root}")
    config_file = root / "config.json"
    if not config_file.is_file():
        raise BadInput(f"model.path: {root} is not a transformers model folder (no config.json)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"model.path: cannot read {config_file}: {_one_line(err)}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not model_type:
        raise BadInput(f"model.path: {config_file} has no model_type (not a transformers model; a diffusers "
                       "folder belongs to the ddpm or dit family)")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise BadInput(f"model.path: {root} holds a {model_type!r} model, which is not a causal LM "
                       "(AutoModelForCausalLM has no class for it)")
    if not any((root / name).is_file() for name in WEIGHT_FILES):
        raise BadInput(f"model.path: {root} has no weights ({', '.join(WEIGHT_FILES)})")
    return root, config


def tokenizer_location(spec: CausalLMSpec) -> Path:
    """Where the spec's tokenizer is: `model.tokenizer` (a tokenizer.json file or a folder), else the model folder."""
    if spec.tokenizer is not None:
        where = Path(spec.tokenizer).expanduser()
        if where.is_file():
            return where
        if not where.is_dir():
            raise BadInput(f"model.tokenizer: no such file or folder: {where}")
        if not any((where / name).is_file() for name in TOKENIZER_FILES):
            raise BadInput(f"model.tokenizer: {where} has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        return where
    if spec.path is None:
        raise BadInput("model.tokenizer: required for a model built from model.config (a tokenizer.json file or "
                       "a tokenizer folder)")
    root = Path(spec.path).expanduser()
    if not any((root / name).is_file() for name in TOKENIZER_FILES):
        raise BadInput(f"model.tokenizer: {root} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                       "tokenizer into the model folder or give model.tokenizer")
    return root


def check_causal_lm(spec: CausalLMSpec) -> None:
    """Every check that needs no weights: the model folder, the tokenizer's files (where the spec has one: a
    `config` model's tokenizer is the dataset's to require) and the LoRA targets, on a meta-device skeleton."""
    if spec.path is not None:
        model_folder(spec.path)
    if spec.path is not None or spec.tokenizer is not None:
        tokenizer_location(spec)
    if spec.lora is not None:
        with torch.device("meta"):  # no memory, no initialisation: only the module tree
            skeleton = _from_config(_hf_config(spec, vocab_size=spec.config.vocab_size if spec.config else None))
        lora_targets(skeleton, spec.lora)


# --- tokenizer -----------------------------------------------------------------------------------------------

def load_tokenizer(spec: CausalLMSpec) -> "PreTrainedTokenizerBase":
    """The spec's tokenizer (see `tokenizer_location`), always with a pad token (batches of unequal lengths)."""
    return tokenizer_at(tokenizer_location(spec), "model.tokenizer")


def tokenizer_at(where: Path, field: str = "tokenizer") -> "PreTrainedTokenizerBase":
    """The tokenizer in `where` (a tokenizer.json file or a tokenizer folder), with a pad token; BadInput naming
    `field` when it cannot be read."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where = Path(where).expanduser()
    if not where.exists():
        raise BadInput(f"{field}: no such file or folder: {where}")
    bare = where / "tokenizer.json" if where.is_dir() and _only_tokenizer_json(where) else where
    try:
        if bare.is_file():
            tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bare), **_special_tokens(bare))
        else:
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True)
    except Exception as err:  # tokenizers and transformers raise OSError, ValueError, Exception... for bad files
        raise BadInput(f"{field}: cannot load a tokenizer from {where}: {_one_line(err)}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked out of the loss and attention, so any existing token serves; a new one
        # would grow the vocabulary past a pretrained model's embedding.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    return tokenizer


def _only_tokenizer_json(folder: Path) -> bool:
    """A folder with a tokenizer.json and no tokenizer_config.json: AutoTokenizer would not know its class."""
    return (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file()


def _special_tokens(tokenizer_json: Path) -> dict[str, str]:
    """The roles (pad, eos, bos, unk) of a bare tokenizer.json's special tokens, by their usual spellings."""
    try:
        added = json.loads(tokenizer_json.read_text()).get("added_tokens") or []
    except (OSError, ValueError, AttributeError):
        return {}  # the tokenizer's own loader then says what is wrong with the file
    special = {t.get("content") for t in added if isinstance(t, dict) and t.get("special")}
    roles = {}
    for role, spellings in _ROLES.items():
        found = next((s for s in spellings if s in special), None)
        if found is not None:
            roles[role] = found
    return roles


# --- model ---------------------------------------------------------------------------------------------------

def intermediate_size(config: LMConfigSpec) -> int:
    """The MLP width: the spec's, else 4 x hidden (gpt2) or 8/3 x hidden rounded up to a multiple of 8 (llama's
    gated MLP has three matrices where gpt2's has two: the same parameter count)."""
    if config.intermediate is not None:
        return config.intermediate
    if config.family == "gpt2":
        return 4 * config.hidden
    return 8 * math.ceil(config.hidden * 8 / 3 / 8)


def _hf_config(spec: CausalLMSpec, vocab_size: int | None) -> Any:
    """The transformers config of the spec's model: the folder's, or one built from `spec.config`."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    if spec.path is not None:
        root, _ = model_folder(spec.path)
        try:
            return AutoConfig.from_pretrained(root, local_files_only=True)
        except Exception as err:
            raise BadInput(f"model.path: cannot read the model config in {root}: {_one_line(err)}") from None
    c = spec.config
    vocab = vocab_size or 2  # only a skeleton for the LoRA check has no vocabulary yet; its module names are alike
    # No bos/eos/pad ids: a fresh model has no vocabulary of its own, the tokenizer's special tokens are the truth.
    if c.family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_positions=c.max_positions, n_embd=c.hidden, n_layer=c.layers,
                          n_head=c.heads, n_inner=intermediate_size(c), resid_pdrop=c.dropout, embd_pdrop=c.dropout,
                          attn_pdrop=c.dropout, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaConfig(vocab_size=vocab, hidden_size=c.hidden, intermediate_size=intermediate_size(c),
                       num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.heads,
                       max_position_embeddings=c.max_positions, attention_dropout=c.dropout,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _from_config(config: Any) -> "PreTrainedModel":
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(config)


def build_causal_lm(spec: CausalLMSpec, vocab_size: int | None = None) -> nn.Module:
    """The spec's model, ready to train: the folder's weights or a fresh one from `spec.config` (deterministic
    under `torch.manual_seed`), in the spec's precision, with its LoRA adapters and activation checkpointing.

    `vocab_size` is the tokenizer's (`len(tokenizer)`): a `config` model's vocabulary when the spec gives none; a
    folder's embedding must hold that many tokens.
    """
    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    if spec.config is not None:
        vocab = spec.config.vocab_size or vocab_size
        if vocab is None:
            raise SpecError("model.config.vocab_size", "required when no tokenizer gives the vocabulary")
        if vocab_size is not None and vocab < vocab_size:
            raise SpecError("model.config.vocab_size", f"{vocab} is smaller than the tokenizer's {vocab_size} tokens")
        model = _from_config(_hf_config(spec, vocab)).to(dtype)
    else:
        from transformers import AutoModelForCausalLM

        config = _hf_config(spec, None)  # the folder's checks, before any weights are read
        held = getattr(config, "vocab_size", None)
        if vocab_size is not None and held is not None and held < vocab_size:
            raise BadInput(f"model.tokenizer: has {vocab_size} tokens, the model in {spec.path} embeds only {held}")
        if spec.lora is not None:
            with torch.device("meta"):
                lora_targets(_from_config(config), spec.lora)
        try:
            model = AutoModelForCausalLM.from_pretrained(Path(spec.path).expanduser(), local_files_only=True,
                                                         dtype=dtype)
        except Exception as err:  # a broken weights file, a shard missing: one line
            raise BadInput(f"model.path: cannot load a causal LM from {spec.path}: {_one_line(err)}") from None
    if spec.lora is not None:
        model = apply_lora(model, spec.lora)
    if spec.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def build_for_job(spec: CausalLMSpec, num_outputs: int = 0, input_shape: tuple[int, ...] = ()) -> nn.Module:
    """The model family's builder (`unlearn.models.MODELS`): the spec's model with its tokenizer's vocabulary and
    WITHOUT adapters. A job's original and retrain train every weight; `adapt` adds the LoRA adapters to the method
    runs only, and `merge_adapters` folds them back, so every saved state has this model's keys. (`num_outputs`
    and `input_shape` are the dataset's labels and packed rows: a language model's outputs are its vocabulary.)"""
    vocab = len(load_tokenizer(spec)) if (spec.path is not None or spec.tokenizer is not None) else None
    return build_causal_lm(spec.model_copy(update={"lora": None}), vocab_size=vocab)


def adapt(spec: CausalLMSpec, model: nn.Module) -> nn.Module:
    """A method run's model: with the spec's LoRA adapters (zero-initialised: it computes what `model` did), else
    `model` itself."""
    if spec.lora is None:
        return model
    model = apply_lora(model, spec.lora)
    if spec.activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    """The model with any LoRA adapters folded into its weights (peft's merge_and_unload): the built model again."""
    return model.merge_and_unload() if is_peft(model) else model


class AdaptersOff(nn.Module):
    """The frozen original of a LoRA run without a copy: the student's own modules with the adapters disabled,
    without gradients, in eval mode (`frozen_reference`). The student is held outside the module tree, so this
    module has no parameters of its own and is never saved or moved."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self._student = (student,)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with frozen_reference(self._student[0]) as reference:
            return reference(*args, **kwargs)


def frozen_original(model: nn.Module, module: nn.Module) -> nn.Module:
    """The frozen original the methods compare against, once the engine wrapped `module` into `model`: under LoRA
    the base with its adapters off (no copy); under FSDP a copy sharded like the student (`lm_sharding`); else a
    frozen full copy (one process, DDP)."""
    if is_peft(module):
        return AdaptersOff(module)
    from unlearn.lm_sharding import frozen_reference_sharded, is_fully_sharded

    if is_fully_sharded(model):
        return frozen_reference_sharded(model)
    return reference_model(module)


def wrap_for_workers(module: nn.Module, strategy: str, device: torch.device, mixed_precision: bool) -> nn.Module:
    """The family's wrap on several workers (`ModelFamily.wrap`): `lm_sharding.wrap_causal_lm`, DDP or FSDP2 per
    decoder layer (bf16 compute with fp32 reduction where `mixed_precision`)."""
    from unlearn.lm_sharding import wrap_causal_lm

    return wrap_causal_lm(module, strategy, device, mixed_precision=mixed_precision)


# --- LoRA ----------------------------------------------------------------------------------------------------

def _adaptable(module: nn.Module) -> bool:
    """Layers peft's LoRA can wrap (transformers' Conv1D is gpt2's transposed linear)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, Conv1D))


def lora_targets(model: nn.Module, lora: LoRASpec) -> list[str]:
    """The target module names for `model` (the spec's, or the family's default), each checked to name at least one
    layer LoRA can wrap; else one line naming the missing ones and the model's linear layers."""
    targets = lora.target_modules
    if targets is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        model_type = getattr(getattr(model, "config", None), "model_type", None)
        targets = DEFAULT_TARGETS.get(model_type) or PEFT_DEFAULTS.get(model_type)
        if not targets:
            raise BadInput(f"model.lora.target_modules: no default for {model_type!r} models; name the modules "
                           f"(linear layers: {', '.join(linear_names(model)) or 'none'})")
        targets = list(targets)
    names = [name for name, module in model.named_modules() if _adaptable(module)]
    # peft's rule for a list of names: a module matches when its dotted name is the target or ends in ".target"
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise BadInput(f"model.lora.target_modules: {', '.join(map(repr, missing))} match no linear layer of this "
                       f"model (its linear layers: {', '.join(linear_names(model)) or 'none'})")
    return targets


def linear_names(model: nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what `target_modules` can name)."""
    from transformers.pytorch_utils import Conv1D

    found = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and isinstance(module, (nn.Linear, Conv1D))}
    return sorted(found)


def apply_lora(model: nn.Module, lora: LoRASpec) -> nn.Module:
    """`model` wrapped by peft with LoRA adapters on the target modules: only the adapters train (the base weights
    are frozen), and the adapters start at zero, so the wrapped model computes exactly what `model` did."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = lora_targets(model, lora)
    # gpt2's Conv1D stores its weight transposed (in x out): peft must know, or the adapter's product is wrong
    transposed = any(isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
                     for n, m in model.named_modules())
    config = LoraConfig(task_type="CAUSAL_LM", r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=targets, fan_in_fan_out=transposed)
    return get_peft_model(model, config)


def is_peft(model: nn.Module) -> bool:
    """Whether `model` is a peft model (adapters over a frozen base), seen through a DDP wrapper. peft is only asked
    when already imported: a model can only be one if peft made it."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(_unwrap_ddp(model), peft.PeftModel)


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (FSDP2 shards in place: its model is the module)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters that train, all parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


# --- frozen reference ----------------------------------------------------------------------------------------

def reference_model(model: nn.Module) -> nn.Module:
    """What `frozen_reference` evaluates: a peft model itself (its base with the adapters disabled: no copy); for a
    fully trained model, a frozen copy of it as it is now (make it once, before training; requires_grad off, eval
    mode). That copy costs one more model's memory: the engine shards it like the student."""
    if is_peft(model):
        return model
    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


@contextmanager
def frozen_reference(model: nn.Module, reference: nn.Module | None = None) -> Iterator[nn.Module]:
    """Within the block, a module whose forward gives the frozen original's logits, without gradients and in eval
    mode (no dropout). A peft `model`: the model itself with its adapters disabled (the base the adapters were added
    to never changes); a full `model`: `reference`, its copy from `reference_model` made before training.

    The student's own forward must stay outside the block (inside it, a peft model's adapters are off)."""
    model = _unwrap_ddp(model)  # a DDP wrapper would run the adapters' forward through its own hooks
    if is_peft(model):
        target = model
    elif reference is None or reference is model:
        raise ValueError("a fully trained model's reference is a frozen copy: pass reference_model(model), made "
                         "before training")
    else:
        target = reference
    modes = {module: module.training for module in target.modules()}
    target.eval()
    try:
        with torch.no_grad():
            if is_peft(model):
                with model.disable_adapter():
                    yield target
            else:
                yield target
    finally:
        for module, training in modes.items():
            module.training = training


# --- memory ----------------------------------------------------------------------------------------------------

def base_model(model: nn.Module) -> nn.Module:
    """The transformers model under any peft wrapper."""
    return model.get_base_model() if is_peft(model) else model


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward instead of keeping them (training mode only):
    memory per layer drops to its input, for about one more forward of compute. Non-reentrant checkpointing,
    which needs no input that requires grad (a LoRA model's embeddings are frozen) and works under FSDP; the
    key/value cache is off, since checkpointing recomputes what it would hold."""
    hf = base_model(model)
    kwargs = {"use_reentrant": False}
    if hasattr(hf, "activation_checkpointing_enable"):  # transformers' name from 5.x on (the old one warns)
        hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    hf.config.use_cache = False


def is_checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (some decoder layer recomputes in backward)."""
    return any(getattr(m, "gradient_checkpointing", False) for m in base_model(model).modules())
