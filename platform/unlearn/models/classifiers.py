"""Classifier zoo: an MLP, a small CNN for CPU work, and ResNet-18 adapted to 32x32 inputs.

Each family has a `build_<name>(spec, num_classes, input_shape)` that `unlearn.models` registers.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from unlearn.spec import CNNSpec, MLPSpec, ResNet18Spec


class MLP(nn.Module):
    """Flatten -> hidden layers with ReLU -> logits."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, hidden: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(input_shape)
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Conv-BN-ReLU blocks, each halving the resolution while it is above 4 px; global pool; linear."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, channels: list[int], dropout: float = 0.0) -> None:
        super().__init__()
        in_ch, size = input_shape[0], input_shape[-1]
        blocks: list[nn.Module] = []
        for ch in channels:
            blocks += [nn.Conv2d(in_ch, ch, 3, padding=1, bias=False), nn.BatchNorm2d(ch), nn.ReLU(inplace=True)]
            if size > 4:
                blocks.append(nn.MaxPool2d(2))
                size //= 2
            in_ch = ch
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_ch, num_classes)) if dropout else nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_mlp(spec: MLPSpec, num_classes: int, input_shape: tuple[int, ...]) -> MLP:
    """A fresh MLP with the spec's hidden widths and dropout."""
    return MLP(input_shape, num_classes, spec.hidden, spec.dropout)


def build_cnn(spec: CNNSpec, num_classes: int, input_shape: tuple[int, ...]) -> SmallCNN:
    """A fresh SmallCNN with the spec's block widths and dropout."""
    return SmallCNN(input_shape, num_classes, spec.channels, spec.dropout)


def build_resnet18(spec: ResNet18Spec, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module:
    """torchvision ResNet-18 for small images: 3x3 stride-1 stem, no max-pool (as in the seeds' CIFAR code)."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
