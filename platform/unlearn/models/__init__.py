"""Model zoo: built from the spec's `model` section; nothing is downloaded."""

from __future__ import annotations

from torch import nn

from unlearn.spec import ModelSpec


def build_model(spec: ModelSpec, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """A freshly initialised model for `num_classes` outputs (classes or superclasses)."""
    from unlearn.models import classifiers

    if spec.name == "mlp":
        return classifiers.MLP(input_shape, num_classes, spec.hidden, spec.dropout)
    if spec.name == "cnn":
        return classifiers.SmallCNN(input_shape, num_classes, spec.channels, spec.dropout)
    if spec.name == "resnet18":
        return classifiers.resnet18(input_shape, num_classes)
    from unlearn.models.ddpm import build_ddpm

    return build_ddpm(spec, num_classes, input_shape)


def reinitialise(model: nn.Module, seed: int) -> None:
    """Reset every layer's parameters, deterministically from `seed` (retrain starts from scratch)."""
    import torch

    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for module in model.modules():
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    torch.random.set_rng_state(gen_state)


__all__ = ["build_model", "reinitialise"]
