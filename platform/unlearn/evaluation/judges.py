"""Diffusion judges from local torchvision classifier weights (`eval.judge`): nothing is trained or downloaded.

A pretrained classifier (e.g. an ImageNet ResNet-50 for a DiT forgetting ImageNet classes) reads the generated
and real images in place of the platform's cnn trained on the job's data, which at ImageNet scale would be
neither cheap nor good. `load_classifier` builds `torchvision.models.<arch>(weights=None, num_classes=...)`, loads
the state dict file into it and wraps it as `LocalClassifier`, whose `forward` (logits) and `features` are what
the diffusion evaluator's `Judge` calls, so FA / CA / FD are computed as with the trained judge.

Inputs: images in [0, 1] (grey ones repeated to 3 channels) are resized to `image_size` (bilinear, antialiased,
the whole image: the samples and the data are already square center crops) and normalised with ImageNet's
mean and std, as torchvision's classifiers were trained.

Features (FD) are the penultimate layer, per architecture:
  * resnet18 / resnet34: the 512 pooled features (the input of `fc`);
  * resnet50 / 101 / 152, wide_resnet50_2 / 101_2: the 2048 pooled features (the input of `fc`);
  * vit_b_16 / vit_b_32 (768) and vit_l_16 (1024): the class token after the encoder's final LayerNorm (the
    input of `heads`); a ViT is built for `image_size`, so weights trained at 224 need image_size 224.
The weights' classes must be the job's label ids (an ImageNet classifier reads ImageNet ids, e.g. an
imagefolder dataset with an ImageNet class index and num_classes 1000): a different count is one line.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from unlearn.errors import BadInput
from unlearn.spec import JudgeSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HEADS = {"resnet": "fc", "wide_resnet": "fc", "vit": "heads"}  # the attribute holding each family's classifier


def _head_attr(arch: str) -> str:
    return HEADS[next(family for family in sorted(HEADS, key=len, reverse=True) if arch.startswith(family))]


class LocalClassifier(nn.Module):
    """A torchvision classifier split at its penultimate layer: `features` (backbone) then `head`."""

    def __init__(self, backbone: nn.Module, head: nn.Module, image_size: int) -> None:
        super().__init__()
        self.backbone, self.head, self.image_size = backbone, head, image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = (self.image_size, self.image_size)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (see the module docstring), N x D."""
        return self.backbone(self._inputs(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a state dict file (also one saved as {"state_dict": ...} / {"model": ...}, or from DDP)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - an unreadable file is the user's input
        detail = str(err).splitlines()[0] if str(err) else ""
        raise BadInput(f"eval.judge.weights: cannot read {path} as a state dict ({type(err).__name__}: {detail})") \
            from None
    for key in ("state_dict", "model"):  # training scripts' checkpoints wrap the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadInput(f"eval.judge.weights: {path} is not a state dict (a mapping of names to tensors, as "
                       "torch.save(model.state_dict(), FILE) writes)")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_classifier(spec: JudgeSpec, num_classes: int) -> LocalClassifier:
    """`torchvision.models.<arch>` with the weights of `spec.weights`, as a `LocalClassifier` (eval mode, CPU)."""
    import torchvision.models as tvm

    path = Path(spec.weights).expanduser()
    if not path.is_file():
        raise BadInput(f"eval.judge.weights: file not found: {path} (it is never downloaded)")
    state = _state_dict(path)
    head = _head_attr(spec.arch)
    extra = {"image_size": spec.image_size} if spec.arch.startswith("vit") else {}
    model = getattr(tvm, spec.arch)(weights=None, num_classes=num_classes, **extra)
    expected = model.state_dict()
    weight = f"{head}.weight" if head == "fc" else f"{head}.head.weight"
    if weight in state and weight in expected and state[weight].shape[0] != num_classes:
        raise BadInput(f"eval.judge.weights: {path} classifies {state[weight].shape[0]} classes, the job's model "
                       f"has {num_classes} (the judge must read the job's class ids)")
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BadInput(f"eval.judge.weights: {path} is not a torchvision {spec.arch} state dict: {len(missing)} "
                       f"keys missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise BadInput(f"eval.judge.weights: {path}: {key} has shape {tuple(state[key].shape)}, {spec.arch} "
                           f"(eval.judge.image_size {spec.image_size}) expects {tuple(value.shape)}")
    model.load_state_dict(state)
    classifier = getattr(model, head)
    setattr(model, head, nn.Identity())  # the backbone now ends at the penultimate layer
    return LocalClassifier(model, classifier, spec.image_size).eval()


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "LocalClassifier", "load_classifier"]
