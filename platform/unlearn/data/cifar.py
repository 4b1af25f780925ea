"""CIFAR-10 / CIFAR-100 from local files in torchvision's python-pickle layout (nothing is downloaded).

`root` may be the folder that holds `cifar-10-batches-py/` (or `cifar-100-python/`) or that folder
itself. The pickles are read directly (torchvision's md5 check would reject small test fixtures).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from unlearn.data.base import ImageDataset
from unlearn.errors import BadInput

LAYOUTS = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "expected": "cifar-10-batches-py/ with data_batch_1..5, test_batch and batches.meta",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "expected": "cifar-100-python/ with train, test and meta",
    },
}

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# Fixed grouping of CIFAR-10 into 5 superclasses of 2 classes (shared appearance), for concept scenarios.
CIFAR10_SUPERCLASSES: list[tuple[str, list[str]]] = [
    ("air-water-vehicle", ["airplane", "ship"]),
    ("road-vehicle", ["automobile", "truck"]),
    ("small-animal", ["bird", "frog"]),
    ("pet", ["cat", "dog"]),
    ("hoofed-animal", ["deer", "horse"]),
]


# CIFAR-100's published coarse -> fine table (used only for classes absent from the files, e.g. fixtures).
CIFAR100_SUPERCLASSES: dict[str, list[str]] = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


def _hint(name: str) -> str:
    return f"expected {LAYOUTS[name]['expected']}, torchvision format; nothing is downloaded"


def _find_folder(root: str | Path | None, name: str) -> Path:
    if not root:
        raise BadInput(f"dataset.root is required for {name} ({_hint(name)})")
    base = Path(root).expanduser()
    layout = LAYOUTS[name]
    if not base.is_dir():
        raise BadInput(f"{name} folder not found: {base} ({_hint(name)})")
    if (base / layout["folder"]).is_dir():
        return base / layout["folder"]
    if base.name == layout["folder"] or (base / layout["meta"]).exists() or (base / layout["test"][0]).exists():
        return base
    raise BadInput(f"{name} folder not found: {base / layout['folder']} ({_hint(name)})")


def _unpickle(path: Path, name: str) -> dict[str, Any]:
    if not path.is_file():
        raise BadInput(f"{name} file missing: {path} ({_hint(name)})")
    try:
        with open(path, "rb") as fh:
            obj = pickle.load(fh, encoding="latin1")
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's input
        raise BadInput(f"{name} file unreadable: {path} ({type(exc).__name__}: {exc}; {_hint(name)})") from exc
    if not isinstance(obj, dict):
        raise BadInput(f"{name} file has an unexpected format: {path} (a pickled dict; {_hint(name)})")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _read_batches(folder: Path, files: list[str], label_key: str, name: str,
                  extra_key: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    xs, ys, extras = [], [], []
    for f in files:
        entry = _unpickle(folder / f, name)
        if "data" not in entry or label_key not in entry:
            raise BadInput(f"{name} file {folder / f} lacks 'data' or '{label_key}' ({_hint(name)})")
        data = np.asarray(entry["data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise BadInput(f"{name} file {folder / f}: 'data' must be N x 3072 uint8, got shape {data.shape}")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry[label_key], dtype=np.int64))
        if extra_key is not None:
            if extra_key not in entry:
                raise BadInput(f"{name} file {folder / f} lacks '{extra_key}' ({_hint(name)})")
            extras.append(np.asarray(entry[extra_key], dtype=np.int64))
    x = np.concatenate(xs).astype(np.float32) / 255.0
    y = np.concatenate(ys)
    return x, y, (np.concatenate(extras) if extra_key is not None else None)


def load_cifar(root: str | Path | None, name: str) -> ImageDataset:
    """CIFAR-10 (5 fixed superclasses of 2) or CIFAR-100 (the official 20 superclasses) as N x 3 x 32 x 32."""
    if name not in LAYOUTS:
        raise BadInput(f"dataset.name: unknown CIFAR variant '{name}' (allowed: cifar10, cifar100)")
    layout = LAYOUTS[name]
    folder = _find_folder(root, name)
    meta = _unpickle(folder / layout["meta"], name)

    if name == "cifar10":
        x_tr, y_tr, _ = _read_batches(folder, layout["train"], "labels", name)
        x_te, y_te, _ = _read_batches(folder, layout["test"], "labels", name)
        class_names = [str(c) for c in meta.get("label_names", CIFAR10_CLASSES)]
        index = {c: i for i, c in enumerate(class_names)}
        superclass_of = np.zeros(len(class_names), dtype=np.int64)
        if set(index) == set(CIFAR10_CLASSES):
            for s, (_, members) in enumerate(CIFAR10_SUPERCLASSES):
                superclass_of[[index[m] for m in members]] = s
            superclass_names = [s for s, _ in CIFAR10_SUPERCLASSES]
        else:  # non-standard label names: each class its own superclass
            superclass_of = np.arange(len(class_names), dtype=np.int64)
            superclass_names = list(class_names)
    else:
        x_tr, y_tr, c_tr = _read_batches(folder, layout["train"], "fine_labels", name, "coarse_labels")
        x_te, y_te, c_te = _read_batches(folder, layout["test"], "fine_labels", name, "coarse_labels")
        if "fine_label_names" not in meta or "coarse_label_names" not in meta:
            raise BadInput(f"{name} meta file {folder / layout['meta']} lacks fine_label_names/coarse_label_names")
        class_names = [str(c) for c in meta["fine_label_names"]]
        superclass_names = [str(c) for c in meta["coarse_label_names"]]
        superclass_of = np.full(len(class_names), -1, dtype=np.int64)
        fine = np.concatenate([y_tr, y_te])
        coarse = np.concatenate([c_tr, c_te])  # type: ignore[list-item]
        for f_id, c_id in set(zip(fine.tolist(), coarse.tolist())):
            if superclass_of[f_id] not in (-1, c_id):
                raise BadInput(f"{name}: class {class_names[f_id]} has more than one coarse label in {folder}")
            superclass_of[f_id] = c_id
        missing = np.flatnonzero(superclass_of < 0)
        if len(missing):  # classes absent from the files (only in fixtures): fall back to the official map
            from_official = _official_cifar100_coarse(class_names, superclass_names)
            superclass_of[missing] = from_official[missing]

    num_classes = len(class_names)
    for split, y in (("train", y_tr), ("test", y_te)):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise BadInput(f"{name}: {split} labels outside 0..{num_classes - 1} in {folder}")
    return ImageDataset(
        name=name, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
        class_names=class_names, superclass_of=superclass_of, superclass_names=superclass_names,
    )


def _official_cifar100_coarse(class_names: list[str], superclass_names: list[str]) -> np.ndarray:
    """Coarse id of each fine class from CIFAR-100's published table (used only for classes absent from the files)."""
    coarse_index = {n: i for i, n in enumerate(superclass_names)}
    fine_to_coarse = {f: coarse_index.get(c, -1) for c, fs in CIFAR100_SUPERCLASSES.items() for f in fs}
    out = np.array([fine_to_coarse.get(n, -1) for n in class_names], dtype=np.int64)
    if (out < 0).any():
        bad = [class_names[i] for i in np.flatnonzero(out < 0)]
        raise BadInput(f"cifar100: no coarse label for classes {bad[:5]} (absent from the files and not standard names)")
    return out
