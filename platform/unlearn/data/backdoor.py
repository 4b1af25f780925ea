"""A backdoored dataset: a trigger patch stamped on a poisoned share of the training images, relabelled to a target.

`dataset.backdoor: {target, fraction, patch, value}` poisons the data every run of the job sees (the original
model learns the backdoor); `forget: {kind: backdoor}` then hands the poisoned rows (all, or a `fraction` of
them) to the methods. Which rows are poisoned is part of the dataset (a seeded draw among the training images
of the other classes) and travels with its row store (`meta.json`: `backdoor`, `poisoned`), so workers and
the driver agree on it. The evaluation's `triggered` split is the reported test rows of the other classes
with the trigger stamped (read through `TriggeredRows`), labelled with the target: its accuracy is the
attack success rate (ASR), and TA on the clean test split is `clean_TA`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from unlearn.data.base import ImageDataset


def stamp(x: np.ndarray, patch: int, value: float) -> np.ndarray:
    """The images with the trigger: a `patch` x `patch` square of `value` in the bottom-right corner, every
    channel (a copy; N x C x H x W float in [0, 1])."""
    x = np.array(x, dtype=np.float32, copy=True)
    x[..., -patch:, -patch:] = value
    return x


def poisoned_rows(y_train: np.ndarray, target: int, fraction: float, seed: int) -> np.ndarray:
    """Row ids of the poisoned training images: a seeded `fraction` of the rows of every class but the target."""
    others = np.flatnonzero(np.asarray(y_train) != target)
    n = int(round(fraction * len(others)))
    rng = np.random.default_rng([seed, 0xBAC4D00])  # apart from every other draw of the seed
    return np.sort(rng.choice(others, n, replace=False)) if n else np.zeros(0, dtype=np.int64)


def poison(ds: ImageDataset, spec: Any, seed: int) -> ImageDataset:
    """`ds` with the backdoor of `spec` (dataset.backdoor) planted in its training part (a new dataset)."""
    from unlearn.errors import SpecError

    if not 0 <= spec.target < ds.num_classes:
        raise SpecError("dataset.backdoor.target",
                        f"class {spec.target} is not in dataset '{ds.name}' (classes are 0..{ds.num_classes - 1})")
    if spec.patch >= min(ds.input_shape[-2:]):
        raise SpecError("dataset.backdoor.patch", f"a {spec.patch}-pixel patch covers the whole "
                        f"{ds.input_shape[-2]}x{ds.input_shape[-1]} image")
    rows = poisoned_rows(ds.y_train, spec.target, spec.fraction, seed)
    if not len(rows):
        raise SpecError("dataset.backdoor.fraction", f"{spec.fraction} of the other classes' images poisons none")
    x_train, y_train = ds.x_train.copy(), ds.y_train.copy()
    x_train[rows] = stamp(x_train[rows], spec.patch, spec.value)
    y_train[rows] = spec.target
    mask = np.zeros(len(y_train), dtype=bool)
    mask[rows] = True
    return ImageDataset(ds.name, x_train, y_train, ds.x_test, ds.y_test, ds.class_names, ds.superclass_of,
                        ds.superclass_names, poisoned=mask,
                        backdoor={"target": int(spec.target), "patch": int(spec.patch), "value": float(spec.value)})


def backdoor_of(ds: Any) -> tuple[dict[str, Any] | None, np.ndarray | None]:
    """(trigger settings, poisoned-row mask) of an in-memory dataset or a row store; (None, None) when clean."""
    return getattr(ds, "backdoor", None), getattr(ds, "poisoned", None)


class TriggeredRows:
    """A split's rows read with the trigger stamped on (the `triggered` evaluation split)."""

    def __init__(self, rows: Any, patch: int, value: float) -> None:
        self.rows, self.patch, self.value = rows, patch, value

    def read(self, rows: np.ndarray) -> np.ndarray:
        return stamp(self.rows.read(rows), self.patch, self.value)
