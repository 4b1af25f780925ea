"""Model zoo: one registry entry per family, built from the spec's `model` section; nothing is downloaded.

A family is three things: its spec class (`unlearn.spec`, registered with `@model_family`), a builder
`(spec, num_classes, input_shape) -> nn.Module` in its own module here, and one `MODELS.register` line
below naming the builder and the task its models serve (a name in `unlearn.tasks.TASKS`). Family modules
import their heavy libraries (torchvision, diffusers) inside the builder, so this registry stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from unlearn.models import causal_lm, classifiers, ddpm, dit
from unlearn.spec import ModelSpec, Registry


@dataclass(frozen=True)
class ModelFamily:
    """How a family's spec section becomes a fresh module, and the task its models serve."""

    build: Callable[[Any, int, tuple[int, ...]], nn.Module]  # (its spec section, outputs, C x H x W)
    task: str
    # Hooks of families whose unlearning runs differ from their training (None: the model as built):
    # `adapt(spec, module)` wraps a method run's model (e.g. LoRA adapters: only they train), `merge(module)`
    # folds them back before the weights are saved (so every saved state has the built model's keys), and
    # `reference(model, module)` gives the frozen original the methods compare against, after the engine wrapped
    # the model (a sharded copy, or the base with its adapters off) instead of a full copy per worker.
    adapt: Callable[[Any, nn.Module], nn.Module] | None = None
    merge: Callable[[nn.Module], nn.Module] | None = None
    reference: Callable[[nn.Module, nn.Module], nn.Module] | None = None
    # `wrap(module, strategy, device, mixed_precision)`: the family's own wrap for several workers (DDP, or its own
    # sharding for `ray.strategy: fsdp`), in place of the engine's DDP / FSDP1; None: the engine's
    wrap: Callable[[nn.Module, str, torch.device, bool], nn.Module] | None = None
    # True: a `path` model is the base every run starts from: the original is the base trained on all training
    # data, retrain the base trained on the retain data (never re-initialised). False: a `path` model is the
    # original itself, and retrain starts from a fresh initialisation.
    fine_tunes_base: bool = False


MODELS: Registry[ModelFamily] = Registry("model", "model.name")
MODELS.register("mlp", ModelFamily(classifiers.build_mlp, task="classification"))
MODELS.register("cnn", ModelFamily(classifiers.build_cnn, task="classification"))
MODELS.register("resnet18", ModelFamily(classifiers.build_resnet18, task="classification"))
MODELS.register("ddpm", ModelFamily(ddpm.build_ddpm, task="diffusion"))
MODELS.register("dit", ModelFamily(dit.build_dit, task="diffusion"))
MODELS.register("causal_lm", ModelFamily(causal_lm.build_for_job, task="language_modelling", adapt=causal_lm.adapt,
                                         merge=causal_lm.merge_adapters, reference=causal_lm.frozen_original,
                                         wrap=causal_lm.wrap_for_workers, fine_tunes_base=True))


def build_model(spec: ModelSpec, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A freshly initialised model for `num_classes` outputs (classes or superclasses)."""
    return MODELS.lookup(spec.name).build(spec, num_classes, input_shape)


def reinitialise(model: nn.Module, seed: int) -> None:
    """Reset every layer's parameters, deterministically from `seed` (retrain starts from scratch)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    torch.random.set_rng_state(gen_state)


__all__ = ["MODELS", "ModelFamily", "build_model", "reinitialise"]
