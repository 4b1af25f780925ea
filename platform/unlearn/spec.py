"""The job spec: one YAML per experiment, validated before any work starts.

The schema follows ARCHITECTURE.md. Every `name:` is resolved by a registry of its axis (`Registry`):
dataset names in `DATASET_KINDS`, model sections in `MODEL_SPECS` (one spec class per family, the `model`
section a union keyed on `name`). Method parameters are checked against each method's declared parameter
model by `unlearn.methods.validate_methods` (this module must not import torch or ray).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from unlearn.errors import BadInput, SpecError

T = TypeVar("T")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Registry(dict[str, T]):
    """The entries of one axis (datasets, models, tasks, evaluators) under the names a spec gives them.

    Every axis is a dict filled by one `register` line per entry; `lookup` of a name nobody registered is a
    spec error naming the field and the registered names (exit code 2).
    """

    def __init__(self, axis: str, field: str) -> None:
        super().__init__()
        self.axis, self.field = axis, field

    def register(self, name: str, entry: T) -> T:
        """Make `entry` available under `name` (a second entry under one name is a programming error)."""
        if name in self:
            raise ValueError(f"{self.axis} {name!r} registered twice")
        self[name] = entry
        return entry

    def lookup(self, name: str) -> T:
        """The entry registered under `name`."""
        if name not in self:
            raise SpecError(self.field, self.unknown(name))
        return self[name]

    def choices(self) -> str:
        """The registered names, as error messages list them."""
        return ", ".join(repr(n) for n in sorted(self))

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered."""
        return f"unknown {self.axis} {name!r}; registered: {self.choices()}"


@dataclass(frozen=True)
class DatasetKind:
    """What a spec must give for one dataset beyond its name."""

    needs_root: bool = False  # reads local files: `dataset.root` is required


# The datasets a spec may name. Their loaders are registered under the same names in `unlearn.data`
# (this module must stay free of torch and the loaders' libraries).
DATASET_KINDS: Registry[DatasetKind] = Registry("dataset", "dataset.name")
DATASET_KINDS.register("digits", DatasetKind())
DATASET_KINDS.register("cifar10", DatasetKind(needs_root=True))
DATASET_KINDS.register("cifar100", DatasetKind(needs_root=True))
DATASET_KINDS.register("parquet", DatasetKind(needs_root=True))
DATASET_KINDS.register("imagefolder", DatasetKind(needs_root=True))
DATASET_KINDS.register("synthetic", DatasetKind())
DATASET_KINDS.register("facts", DatasetKind())


class BackdoorSpec(Strict):
    """A trigger patch planted in the training data (data/backdoor.py): the original learns the backdoor."""

    target: int = Field(ge=0)  # the class every triggered image is relabelled to
    fraction: float = Field(0.1, gt=0, lt=1)  # share of the other classes' training images poisoned
    patch: int = Field(3, ge=1, le=64)  # side of the square trigger, in pixels (bottom-right corner)
    value: float = Field(1.0, ge=0, le=1)  # the trigger's pixel value


class FactsSpec(Strict):
    """The shape of the procedurally generated `facts` QA corpus (data/facts.py); with the job's seed it fixes
    every entity, fact and the corpus tokenizer."""

    num_entities: int = Field(200, ge=2, le=1_000_000)
    attributes: int = Field(8, ge=1, le=8)  # facts per entity (TOFU-like: 8 attribute slots)
    phrasings: int = Field(3, ge=1, le=3)  # question wordings per fact
    perturbed: int = Field(3, ge=1, le=8)  # wrong answers per fact (truth ratio)
    held_out_fraction: float = Field(0.1, gt=0, lt=1)  # entities never trained: the membership non-members
    vocab_size: int = Field(1024, ge=8, le=1_000_000)  # the corpus BPE tokenizer's target size


class DatasetSpec(Strict):
    name: str  # a name in DATASET_KINDS
    root: str | None = None  # folder (cifar10/cifar100, imagefolder) or file/folder (parquet)
    test_fraction: float = Field(0.25, gt=0, lt=1)  # datasets without an official test split
    # synthetic only: sizes (defaults: the cnn trains in a few minutes on 2 cores)
    num_train: int = Field(8000, ge=20, le=1_000_000)
    num_test: int = Field(2000, ge=20, le=1_000_000)
    # synthetic: the drawn images' side; imagefolder: the side every image is resized and center-cropped to
    # (512 admits DiT-XL-2-512's data)
    image_size: int = Field(32, ge=8, le=512)
    # parquet only: column names
    image_column: str = "image"
    label_column: str = "label"
    superclass_column: str | None = None
    # imagefolder only: a JSON file mapping class folder names to class ids ({"n01440764": 0, ...} or keras'
    # {"0": ["n01440764", "tench"], ...}), so that a subset of ImageNet's folders keeps ImageNet's ids; null: the
    # sorted folder names are the ids 0..K-1
    class_index: str | None = None
    # imagefolder only: how many classes the dataset has (classes without images allowed, e.g. 1000 for an
    # ImageNet-pretrained model fed a subset); null: the largest id + 1
    num_classes: int | None = Field(None, ge=1, le=1_000_000)
    # optional resize of every image (e.g. digits 8x8 -> 16x16 for diffusion models)
    resize: int | None = Field(None, ge=4, le=512)
    backdoor: BackdoorSpec | None = None  # plant a trigger (forget kind `backdoor` then forgets the poisoned rows)
    # facts only: the corpus shape (null: FactsSpec's defaults, 200 entities x 8 attributes x 3 phrasings)
    facts: FactsSpec | None = None
    # text datasets (facts): the tokenizer the QA rows are encoded with (a tokenizer.json or tokenizer folder);
    # null: the corpus's own. A job fills it from a `model.path` model's folder (the model's own tokenizer).
    tokenizer: str | None = None

    @field_validator("name")
    @classmethod
    def _registered(cls, name: str) -> str:
        DATASET_KINDS.lookup(name)  # a SpecError is no ValueError: pydantic lets it through as it is
        return name

    @model_validator(mode="after")
    def _root_needed(self) -> "DatasetSpec":
        if DATASET_KINDS[self.name].needs_root and not self.root:
            raise ValueError(f"dataset.root is required for dataset '{self.name}' (a local folder or file)")
        return self


# --- model families: each its own section, chosen by `name` ----------------------------------------------
# A family is a spec class here (its `name` a one-value Literal, registered by `@model_family`) and a builder
# registered under the same name in `unlearn.models`, which also says the family's task.
MODEL_SPECS: Registry[type[Strict]] = Registry("model", "model.name")
Family = TypeVar("Family", bound=type[Strict])


def model_family(cls: Family) -> Family:
    """Class decorator: a model section a spec may give, under the default of its `name` Literal."""
    return MODEL_SPECS.register(cls.model_fields["name"].default, cls)


@model_family
class MLPSpec(Strict):
    """Flattened image -> hidden ReLU layers -> logits."""

    name: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.0, ge=0, lt=1)


@model_family
class CNNSpec(Strict):
    """Conv-BN-ReLU blocks (one per width, halving the resolution above 4 px), global pool, linear."""

    name: Literal["cnn"] = "cnn"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])
    dropout: float = Field(0.0, ge=0, lt=1)


@model_family
class ResNet18Spec(Strict):
    """torchvision's ResNet-18 with a small-image stem; its architecture is fixed, so only the name."""

    name: Literal["resnet18"] = "resnet18"


@model_family
class DDPMSpec(Strict):
    """Class-conditional DDPM: a UNet of `channels` block widths and its noise schedule."""

    name: Literal["ddpm"] = "ddpm"
    channels: list[int] = Field(default_factory=lambda: [32, 64, 128])  # UNet block widths
    layers_per_block: int = Field(1, ge=1, le=4)
    dropout: float = Field(0.0, ge=0, lt=1)
    train_timesteps: int = Field(1000, ge=10, le=4000)
    sample_steps: int = Field(50, ge=5, le=1000)  # DDIM steps at evaluation
    guidance_scale: float = Field(1.0, ge=0, le=20)  # classifier-free guidance (1: off)
    cond_dropout: float = Field(0.1, ge=0, lt=1)  # label dropout while training, enables guidance
    # A local pretrained class-conditional UNet: a diffusers pipeline folder (model_index.json, unet/, scheduler/)
    # or a bare UNet2DModel folder; its config replaces the size fields above (loaded with local_files_only)
    path: str | None = None


@model_family
class DiTSpec(Strict):
    """Class-conditional diffusion transformer (diffusers' DiTTransformer2DModel) and its noise schedule."""

    name: Literal["dit"] = "dit"
    layers: int = Field(4, ge=1, le=64)
    hidden: int = Field(128, ge=8, le=8192)  # width: heads x head dimension
    heads: int = Field(4, ge=1, le=128)
    patch: int = Field(4, ge=1, le=16)  # patch side in pixels (or latent cells)
    dropout: float = Field(0.0, ge=0, lt=1)
    learn_sigma: bool = False  # DiT-XL/2 style: the output holds a variance beside the noise (loss reads the noise)
    train_timesteps: int = Field(1000, ge=10, le=4000)
    sample_steps: int = Field(50, ge=5, le=1000)  # DDIM steps at evaluation
    guidance_scale: float = Field(1.0, ge=0, le=20)  # classifier-free guidance (1: off)
    cond_dropout: float = Field(0.1, ge=0, lt=1)  # label dropout while training (the task's; the model's is off)
    # A local pretrained DiT: a diffusers pipeline folder (model_index.json, transformer/, scheduler/) or a bare
    # DiTTransformer2DModel folder; its config replaces the size fields above (loaded with local_files_only)
    path: str | None = None

    @model_validator(mode="after")
    def _heads_divide(self) -> "DiTSpec":
        if self.path is None and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        return self


# --- causal language models (unlearn.models.causal_lm) ----------------------------------------------------

class LoRASpec(Strict):
    """Low-rank adapters (peft's LoRA) on the named modules; only the adapters train, the base stays frozen (and,
    with the adapters disabled, is the frozen reference that DELETE/NPO compare against: no second copy)."""

    r: int = Field(8, ge=1, le=4096)  # adapter rank
    alpha: float = Field(16.0, gt=0, le=65536)  # scale alpha / r on the adapters' output
    dropout: float = Field(0.05, ge=0, lt=1)  # on the adapters' input
    # module names (a name matches a module whose dotted name ends in it); null: the family's usual attention
    # projections (q_proj/v_proj for llama, c_attn for gpt2; peft's table for other folders)
    target_modules: list[str] | None = Field(None, min_length=1)


class LMConfigSpec(Strict):
    """A decoder built from sizes (tests, CPU benchmarks): freshly initialised, deterministic under a seed."""

    family: Literal["llama", "gpt2"]
    layers: int = Field(2, ge=1, le=256)
    hidden: int = Field(64, ge=8, le=65536)  # width: heads x head dimension
    heads: int = Field(2, ge=1, le=256)
    # MLP width; null: 4 x hidden for gpt2, 8/3 x hidden (rounded up to a multiple of 8) for llama's gated MLP,
    # which keeps the two families' MLP parameter counts alike
    intermediate: int | None = Field(None, ge=1, le=1_048_576)
    max_positions: int = Field(256, ge=8, le=1_048_576)  # longest sequence (gpt2's position table, llama's RoPE)
    vocab_size: int | None = Field(None, ge=2, le=4_194_304)  # null: the tokenizer's
    dropout: float = Field(0.0, ge=0, lt=1)  # attention (and gpt2's residual/embedding) dropout; 0: deterministic

    @model_validator(mode="after")
    def _heads_divide(self) -> "LMConfigSpec":
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.family == "llama" and (self.hidden // self.heads) % 2:
            raise ValueError(f"llama's rotary embedding needs an even head dimension, hidden / heads is "
                             f"{self.hidden // self.heads}")
        return self


@model_family
class CausalLMSpec(Strict):
    """Any Hugging Face causal LM from a local folder (`path`, loaded with local_files_only: nothing is
    downloaded), or one built from `config`; optionally with LoRA adapters."""

    name: Literal["causal_lm"] = "causal_lm"
    path: str | None = None  # a save_pretrained folder: config.json + weights (+ its tokenizer)
    config: LMConfigSpec | None = None
    # a tokenizer.json file or a tokenizer folder; null: the model folder's own (`path`); a `config` model needs one
    tokenizer: str | None = None
    lora: LoRASpec | None = None  # null: every weight trains
    precision: Literal["fp32", "bf16"] = "fp32"  # the weights' dtype
    activation_checkpointing: bool = False  # recompute activations in backward: less memory, ~1/3 more compute

    @model_validator(mode="after")
    def _one_source(self) -> "CausalLMSpec":
        if (self.path is None) == (self.config is None):
            raise ValueError("give exactly one of model.path (a local model folder) and model.config (sizes)")
        return self


# The `model` section: whichever family its `name` says (every family is registered above this line).
ModelSpec = Annotated[Union[tuple(MODEL_SPECS.values())], Field(discriminator="name")]

# JobSpec fields whose value is a class chosen by its `name`, with the registry of those classes.
_KEYED_BY_NAME: dict[str, Registry[type[Strict]]] = {"model": MODEL_SPECS}


class OptimizerSpec(Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)


class TrainSpec(Strict):
    """The recipe of the original model; retrain uses the same recipe on the retain data."""

    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    lr_schedule: Literal["constant", "cosine"] = "cosine"


class ForgetSpec(Strict):
    kind: Literal["class", "random", "concept", "backdoor"]
    # kind class: the classes to forget, or `fraction` of all classes drawn at random from the seed (TOFU's
    # forget01 / 05 / 10 over the facts entities; the draws of one seed are nested)
    classes: list[int] | None = None
    fraction: float | None = Field(None, gt=0, lt=1)
    mismatch: Literal["all_matched", "target", "model", "data"] = "all_matched"
    target: int | str | None = None  # a class or superclass id, or its name (e.g. a facts category)
    given: list[int] | None = None
    # concept: hand over this seeded share of the target's classes (at least one) instead of listing `given`
    given_fraction: float | None = Field(None, gt=0, le=1)
    # What the methods are told about a concept target: false, only the forget set (the given classes); true,
    # methods that can use it (CURE's gsr/ghr/grogu: `mask_classes`) are handed the whole concept's classes.
    # A method entry's own `concept_known` overrides it (one table can show both).
    concept_known: bool = False

    @model_validator(mode="after")
    def _kind_fields(self) -> "ForgetSpec":
        if self.kind == "class" and self.fraction is not None:
            if self.classes is not None:
                raise ValueError("forget: give classes or fraction for kind 'class', not both")
        elif self.kind == "class":
            if not self.classes:
                raise ValueError("forget.classes must list at least one class for kind 'class' (empty forget set)")
            if len(set(self.classes)) != len(self.classes):
                raise ValueError("forget.classes has duplicates")
        if self.kind == "random" and self.fraction is None:
            raise ValueError("forget.fraction is required for kind 'random' (a number in (0, 1))")
        if self.kind == "concept" and self.target is None:
            raise ValueError("forget.target is required for kind 'concept'")
        if isinstance(self.target, int) and self.target < 0:
            raise ValueError("forget.target must be >= 0")
        if self.given is not None and self.given_fraction is not None:
            raise ValueError("forget: give `given` or `given_fraction`, not both")
        return self


class MethodSpec(Strict):
    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    label: str | None = None  # run name when one method appears twice (e.g. two settings)
    concept_known: bool | None = None  # None: the job's forget.concept_known

    @property
    def run_name(self) -> str:
        return self.label or self.name


class RaySpec(Strict):
    enabled: bool = True  # false: run every method in this process (tests, laptops without Ray)
    num_workers: int = Field(2, ge=1, le=4096)
    use_gpu: bool = False
    address: str | None = None  # null: start Ray locally
    strategy: Literal["ddp", "fsdp"] = "ddp"
    max_failures: int = Field(2, ge=0, le=100)  # group restarts after a lost worker (a failing method costs none)
    cpus_per_worker: float = Field(1.0, gt=0, le=256)
    groups: int = Field(1, ge=1, le=1024)  # worker groups sharing the job's queue of runs (concurrent on a cluster)
    storage: str | None = None  # results and checkpoints (shared storage for multi-node); null: <out>/engine
    # exact: each worker holds the rows its slices of every global batch touch (steps equal one process's);
    # streaming: workers stream their shard of the training table through Ray Data (bounded memory, not step-exact)
    data: Literal["exact", "streaming"] = "exact"
    # Seconds to wait, before any work, for a joined cluster to have room for one worker group: a busy cluster
    # (free resources below the group's) or an autoscaling one still growing; then the job stops with one line
    # (Ray itself would queue the group silently, forever when it never fits). The embedded session never waits.
    resource_wait_s: float = Field(60.0, ge=0, le=86_400)


class TrackingSpec(Strict):
    enabled: bool = True
    uri: str | None = None  # null: MLFLOW_TRACKING_URI, else sqlite:///./mlruns.db + ./mlartifacts
    experiment: str | None = None  # null: the job name
    # each method run's unlearned model as an MLflow LoggedModel (`models:/<id>`): the whole model, only its
    # adapter weights (models that expose adapters, e.g. LoRA; others log none and say so once), or none
    log_models: Literal["full", "adapter", "none"] = "full"


class TuneSpec(Strict):
    """`unlearn tune` settings; the search space is checked against the method's declared ranges."""

    method: str | None = None
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = Field(12, ge=1, le=100_000)
    max_concurrent: int = Field(2, ge=1, le=4096)
    metric: Literal["gap", "proxy"] = "gap"
    mode: Literal["min", "max"] = "min"
    search: Literal["optuna", "random"] = "optuna"
    scheduler: Literal["asha", "fifo"] = "asha"
    in_process: bool = False  # run each trial in the Tune actor (tiny models) instead of a TorchTrainer
    reports: int = Field(4, ge=1, le=1000)  # per-trial progress reports ASHA can act on


class JudgeSpec(Strict):
    """A diffusion judge from a local torchvision classifier state dict (evaluation/judges.py): nothing is trained
    or downloaded. Its classes must be the job's (e.g. an ImageNet classifier for ImageNet class ids)."""

    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "wide_resnet50_2",
                  "wide_resnet101_2", "vit_b_16", "vit_b_32", "vit_l_16"]
    weights: str  # a torchvision state dict of that architecture (torch.save(model.state_dict(), FILE))
    image_size: int = Field(224, ge=32, le=1024)  # generated and real images are resized to this before the judge


class EvalSpec(Strict):
    mia: bool = True
    # Share of the test part held out as the validation split: the non-members (TA, MIA) that `unlearn tune`
    # selects on; reported tables use the rest of the test part and never see it. 0: no validation split
    # (then `unlearn tune` refuses to run).
    validation_fraction: float = Field(0.2, ge=0.0, le=0.9)
    samples_per_class: int = Field(64, ge=1, le=100_000)  # diffusion: generated images per class
    grid_per_class: int = Field(8, ge=1, le=64)
    # diffusion: a local torchvision inception_v3 state dict; when given, FID is reported beside FD (never downloaded)
    inception_weights: str | None = None
    # diffusion: the judge of FA / CA / FD; null: the platform's cnn trained on the job's training images (cached)
    judge: JudgeSpec | None = None
    # Per-example privacy (U-LiRA, evaluation/ulira.py): this many shadow originals (>= 4), each then unlearned by
    # every method of the job and retrained; classification only. 0: off (it costs K trainings plus K runs per
    # method, in parallel on Ray). Hayes et al. use 16 or more.
    shadow_models: int = Field(0, ge=0, le=1024)
    # Share of the training rows each shadow original trains on (each row in exactly that share of the shadows).
    # 1: the job's own training data, so shadows differ from the attacked models by seed alone (calibrated: the
    # attacked models train on all of it); 0.5: the paper's random halves, whose models are less confident than
    # a full-data model under attack, which biases the test (benchmarks/results/ulira.md measures both).
    shadow_share: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _enough_shadows(self) -> "EvalSpec":
        if self.shadow_models and (self.shadow_models < 4 or round(self.shadow_share * self.shadow_models) < 2):
            raise ValueError("shadow_models must be 0 (off) or >= 4, with at least 2 shadows holding each row "
                             "(shadow_share x shadow_models >= 2)")
        return self


class JobSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    # Run the whole job once per seed (its own original, retrain and splits) and report mean ± std;
    # null: the one `seed`.
    seeds: list[int] | None = Field(None, min_length=1, max_length=100)
    dataset: DatasetSpec
    model: ModelSpec
    train: TrainSpec = Field(default_factory=TrainSpec)
    forget: ForgetSpec
    methods: list[MethodSpec] = Field(min_length=1)
    ray: RaySpec = Field(default_factory=RaySpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    tune: TuneSpec = Field(default_factory=TuneSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    cache_dir: str = ".cache/unlearn"

    @model_validator(mode="after")
    def _distinct_seeds(self) -> "JobSpec":
        if self.seeds is not None and len(set(self.seeds)) != len(self.seeds):
            raise ValueError("seeds has duplicates")
        return self

    @model_validator(mode="after")
    def _unique_runs(self) -> "JobSpec":
        names = [m.run_name for m in self.methods]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"methods: run names must be unique, {dup} repeats (give one a 'label')")
        return self


def _format_error(err: ValidationError) -> SpecError:
    """The first validation error as one line naming the field and what is allowed."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    msg = first["msg"]
    by_name = _KEYED_BY_NAME.get(loc[0]) if loc else None
    if by_name is not None and first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        tag = first.get("ctx", {}).get("tag")
        return SpecError(f"{loc[0]}.name", by_name.unknown(tag) if tag is not None else
                         f"required; registered: {by_name.choices()}")
    chosen = loc.pop(1) if by_name is not None and len(loc) > 1 else None  # pydantic puts the chosen name here
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
        if chosen is not None:
            keys = [k for k in by_name[chosen].model_fields if k != "name"]
            msg += f"; {chosen} takes: {', '.join(keys) or 'only name'}"
    elif "input" in first and first["type"] not in ("missing",) and not isinstance(first["input"], (dict, list)):
        msg = f"{msg} (got {first['input']!r})"
    msg = msg.removeprefix("Value error, ")
    return SpecError(".".join(loc), msg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.0.c=value` -> (['a','b','0','c'], value parsed as YAML)."""
    if "=" not in text:
        raise BadInput(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    if not key:
        raise BadInput(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set` overrides to raw spec data (before validation), creating mappings as needed."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node: Any = data
        for i, part in enumerate(path):
            last = i == len(path) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise BadInput(f"--set {text!r}: '{part}' is not an index of a {len(node)}-item list")
                idx = int(part)
                if last:
                    node[idx] = value
                else:
                    node = node[idx]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    node = node.setdefault(part, {})
            else:
                raise BadInput(f"--set {text!r}: '{'.'.join(path[:i])}' is not a mapping")
    return data


def validate(data: Any) -> JobSpec:
    """Raw data -> JobSpec, or SpecError naming the field."""
    if not isinstance(data, dict):
        raise SpecError("", "the job spec must be a YAML mapping")
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise _format_error(err) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with one-line errors for a missing file or bad YAML."""
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"job spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise BadInput(f"{path}: invalid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise SpecError("", f"{path}: the job spec must be a YAML mapping")
    return data


def load(path: str | Path, overrides: list[str] | None = None) -> JobSpec:
    """Load, override and validate a job spec file."""
    return validate(apply_overrides(read_yaml(path), overrides or []))


def dump(spec: JobSpec) -> str:
    """The resolved spec as YAML (every default filled in)."""
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
