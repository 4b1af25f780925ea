"""Datasets and forget scenarios.

`load_dataset(spec, seed, cache_dir)` returns an `ImageDataset`; `make_splits` (scenarios.py) turns
it and a forget spec into the forget / retain / test splits every method and metric uses.
"""

from __future__ import annotations

from pathlib import Path

from unlearn.data.base import ImageDataset, resize
from unlearn.spec import DatasetSpec


def load_dataset(spec: DatasetSpec, seed: int, cache_dir: str | Path = ".cache/unlearn") -> ImageDataset:
    """Load the dataset a spec names (each loader imported only when used)."""
    if spec.name == "digits":
        from unlearn.data.digits import load_digits_dataset

        ds = load_digits_dataset(spec.test_fraction, seed)
    elif spec.name in ("cifar10", "cifar100"):
        from unlearn.data.cifar import load_cifar

        ds = load_cifar(spec.root, spec.name)
    elif spec.name == "parquet":
        from unlearn.data.parquet import load_parquet

        ds = load_parquet(spec, seed)
    else:
        from unlearn.data.synthetic import load_synthetic

        ds = load_synthetic(spec.num_train, spec.num_test, spec.image_size, seed, Path(cache_dir) / "data")
    if spec.resize:
        ds.x_train, ds.x_test = resize(ds.x_train, spec.resize), resize(ds.x_test, spec.resize)
    return ds


__all__ = ["ImageDataset", "load_dataset"]
