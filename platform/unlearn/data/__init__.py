"""Datasets and forget scenarios.

`load_dataset(spec, seed, cache_dir)` returns an `ImageDataset` from the loader registered under the spec's
`dataset.name`; `make_splits` (scenarios.py) turns it and a forget spec into the forget / retain / test splits
every method and metric uses. A dataset is one loader module here, one `DATASETS.register` line below and its
name in `unlearn.spec.DATASET_KINDS` (what the spec must give for it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from unlearn.data import cifar, digits, facts_rows, imagefolder, parquet, synthetic
from unlearn.data.base import ImageDataset, resize
from unlearn.data.store import RowStore, open_store
from unlearn.spec import DatasetSpec, Registry

Loader = Callable[[DatasetSpec, int, Path], ImageDataset]  # (spec, seed, cache folder) -> dataset

# Each loader takes only what it reads; these lines say which spec fields feed it. The loader modules import
# their libraries (scikit-learn, pyarrow, PIL) when they load, so registering them costs nothing.
DATASETS: Registry[Loader] = Registry("dataset", "dataset.name")
DATASETS.register("digits", lambda spec, seed, cache: digits.load_digits_dataset(spec.test_fraction, seed))
DATASETS.register("cifar10", lambda spec, seed, cache: cifar.load_cifar(spec.root, spec.name))
DATASETS.register("cifar100", lambda spec, seed, cache: cifar.load_cifar(spec.root, spec.name))
DATASETS.register("parquet", lambda spec, seed, cache: parquet.load_parquet(spec, seed))
DATASETS.register("imagefolder", lambda spec, seed, cache: imagefolder.load_imagefolder(spec, seed))
DATASETS.register("facts", lambda spec, seed, cache: facts_rows.load_facts_dataset(spec, seed, cache))
DATASETS.register("synthetic", lambda spec, seed, cache: synthetic.load_synthetic(
    spec.num_train, spec.num_test, spec.image_size, seed, cache / "data"))


def load_dataset(spec: DatasetSpec, seed: int, cache_dir: str | Path = ".cache/unlearn") -> ImageDataset:
    """Load the dataset a spec names, resized when the spec asks."""
    ds = DATASETS.lookup(spec.name)(spec, seed, Path(cache_dir))
    if spec.resize:
        ds.x_train, ds.x_test = resize(ds.x_train, spec.resize), resize(ds.x_test, spec.resize)
    if spec.backdoor is not None:  # planted after any resize: the trigger is in the images the model sees
        from unlearn.data.backdoor import poison

        ds = poison(ds, spec.backdoor, seed)
    return ds


__all__ = ["DATASETS", "ImageDataset", "Loader", "RowStore", "load_dataset", "open_store"]
