"""The in-memory image dataset every loader returns, with its two label levels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class ImageDataset:
    """Train and test images (float32, N x C x H x W, values in [0, 1]) with class labels.

    `superclass_of[c]` is the superclass (concept family) of class `c`: CIFAR-100's official 20
    superclasses, fixed groupings for CIFAR-10 and digits, the shape families of `synthetic`.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray  # int64 class ids
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    superclass_of: np.ndarray  # int64, one entry per class
    superclass_names: list[str]
    poisoned: np.ndarray | None = None  # dataset.backdoor: bool per training row (see data/backdoor.py)
    backdoor: dict[str, Any] | None = None  # the trigger: {"target", "patch", "value"}

    def __post_init__(self) -> None:
        self.y_train = np.asarray(self.y_train, dtype=np.int64)
        self.y_test = np.asarray(self.y_test, dtype=np.int64)
        self.superclass_of = np.asarray(self.superclass_of, dtype=np.int64)
        if len(self.x_train) != len(self.y_train) or len(self.x_test) != len(self.y_test):
            raise ValueError(f"{self.name}: images and labels differ in length")
        if self.x_train.ndim != 4:
            raise ValueError(f"{self.name}: images must be N x C x H x W, got shape {self.x_train.shape}")
        if len(self.superclass_of) != self.num_classes:
            raise ValueError(f"{self.name}: superclass map has {len(self.superclass_of)} entries for {self.num_classes} classes")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_superclasses(self) -> int:
        return len(self.superclass_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def classes_of(self, superclass: int) -> list[int]:
        """The classes that make up one superclass, in id order."""
        return [int(c) for c in np.flatnonzero(self.superclass_of == superclass)]


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with every class split in the same proportion; deterministic from seed."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of N x C x H x W float images to size x size."""
    import torch
    import torch.nn.functional as F

    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    return out.clamp_(0, 1).numpy()
