"""Images in class folders (torchvision's ImageFolder layout) from local files; nothing is downloaded.

Layouts (`dataset.root`):
  * `root/<class>/**/<image>`: one subfolder per class, split stratified by class into train and test
    (`dataset.test_fraction`, deterministic from the job seed), as `digits` and `parquet` are;
  * `root/train/<class>/...` and `root/val/<class>/...` (both present): the official parts (ImageNet's
    train and val, with val sorted into class folders), used as train and test.
Images are the files torchvision's ImageFolder reads (.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp, any
case), found recursively under each class folder; hidden files and folders are skipped.

Class ids. Without `dataset.class_index`, the sorted folder names are ids 0..K-1 (with all 1000 ImageNet synset
folders these are ImageNet's standard ids, as torchvision's ImageFolder gives them). `dataset.class_index` names
a JSON file mapping folder name -> id, either `{"n01440764": 0, ...}` or keras' `imagenet_class_index.json`
(`{"0": ["n01440764", "tench"], ...}`, whose second entries become the class names), so that a subset of the
folders keeps its ImageNet ids. `dataset.num_classes` (default: the largest id + 1) sizes the label space to the
pretrained model's: classes without images are allowed; they are never forgotten (a forget class without
training images is refused by `make_splits`) and the diffusion evaluator samples only classes with images.
Each class is its own superclass.

Pixels: each image is opened with PIL, converted to RGB and brought to `dataset.image_size` square by ADM's
`center_crop_arr` (the preprocessing DiT trained on: halve with a box filter while the shorter side is at least
twice the size, bicubic resize of the shorter side to the size, center crop), then scaled to float32 [0, 1].
The whole set is held in memory as float32 (N x 3 x S x S x 4 bytes) while the job's row store is built, so a
set larger than `memory_limit()` (half this machine's memory) is refused before any image is read.

Every problem is one line (BadInput, exit 2): a missing root, no class folders, no images, an unreadable image
(named), a class folder the class index does not map, a bad class index.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unlearn.data.base import ImageDataset, stratified_split
from unlearn.errors import BadInput
from unlearn.spec import DatasetSpec

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's
SPLIT_FOLDERS = ("train", "val")
LAYOUT_HINT = "expected root/<class>/<images> or root/train/<class>/... with root/val/<class>/..."
# Decoding threads: PIL releases the GIL while decoding and resizing, so threads share the cores.
MAX_THREADS = 16


def memory_limit() -> int:
    """The most bytes the decoded float32 set may take: half this machine's memory."""
    import psutil

    return psutil.virtual_memory().total // 2


@dataclass
class Scan:
    """The image files a root holds, per part, with each file's class folder name."""

    root: Path
    split_given: bool  # root/train and root/val: the parts are official; else "all" is split by the loader
    parts: dict[str, list[tuple[Path, str]]]  # "train"/"test" (split_given) or "all" -> [(file, folder)]
    folders: list[str]  # every class folder name, sorted (the union over the parts)

    def files(self) -> list[Path]:
        return [f for part in self.parts.values() for f, _ in part]


def _visible(path: Path) -> bool:
    return not path.name.startswith(".")


def _class_folders(folder: Path) -> list[Path]:
    return sorted((p for p in folder.iterdir() if p.is_dir() and _visible(p)), key=lambda p: p.name)


def _images_in(folder: Path) -> list[Path]:
    """The image files under a class folder, recursively (as ImageFolder's os.walk), in sorted path order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # prune hidden folders in place
        out.extend(Path(dirpath) / f for f in filenames
                   if not f.startswith(".") and f.lower().endswith(IMG_EXTENSIONS))
    return sorted(out)


def _part(folder: Path, where: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """The images of one part, with their class folder names, and every class folder name (empty ones too)."""
    classes = _class_folders(folder)
    if not classes:
        raise BadInput(f"imagefolder: no class folders in {folder} ({where}; {LAYOUT_HINT})")
    files = [(f, c.name) for c in classes for f in _images_in(c)]
    if not files:
        raise BadInput(f"imagefolder: no images ({' '.join(IMG_EXTENSIONS)}) in the class folders of {folder}")
    return files, [c.name for c in classes]


def scan(root: str | Path | None) -> Scan:
    """The files the loader reads under `root` (also what the row store's cache key fingerprints)."""
    if not root:
        raise BadInput(f"dataset.root is required for imagefolder ({LAYOUT_HINT})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise BadInput(f"imagefolder root not found: {base} ({LAYOUT_HINT})")
    if all((base / s).is_dir() for s in SPLIT_FOLDERS):
        (train, a), (test, b) = _part(base / "train", "the train part"), _part(base / "val", "the val part")
        return Scan(base, True, {"train": train, "test": test}, sorted(set(a) | set(b)))
    files, folders = _part(base, "one folder per class")
    return Scan(base, False, {"all": files}, folders)


def read_class_index(path: str | Path) -> tuple[dict[str, int], dict[int, str]]:
    """(folder -> id, id -> class name) from a class index JSON file (see the module docstring)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise BadInput(f"dataset.class_index: file not found: {file}")
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"dataset.class_index: cannot read {file} ({type(err).__name__}: "
                       f"{str(err).splitlines()[0] if str(err) else ''})") from None
    shape = 'expected {"<folder>": <id>, ...} or keras\' {"<id>": ["<folder>", "<name>"], ...}'
    if not isinstance(data, dict) or not data:
        raise BadInput(f"dataset.class_index: {file} is not a non-empty JSON object ({shape})")
    values = list(data.values())
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):  # {folder: id}
        id_of = dict(data)
        names = {i: f for f, i in id_of.items()}
    elif all(isinstance(k, str) and k.strip().isdigit() for k in data) and \
            all(isinstance(v, list) and v and all(isinstance(e, str) for e in v) for v in values):  # keras
        id_of, names = {}, {}
        for k, v in data.items():
            if v[0] in id_of:
                raise BadInput(f"dataset.class_index: {file} maps folder '{v[0]}' twice")
            id_of[v[0]] = int(k)
            names[int(k)] = v[1] if len(v) > 1 else v[0]
    else:
        raise BadInput(f"dataset.class_index: {file} has an unexpected format ({shape})")
    ids = list(id_of.values())
    if min(ids) < 0:
        raise BadInput(f"dataset.class_index: {file} has a negative id ({min(ids)})")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise BadInput(f"dataset.class_index: {file} gives id {dup} to more than one folder")
    return id_of, names


def class_ids(folders: list[str], class_index: str | None, num_classes: int | None,
              root: Path) -> tuple[dict[str, int], list[str]]:
    """Each folder's class id and the dataset's class names (one per id, 0..num_classes-1)."""
    if class_index:
        id_of, names = read_class_index(class_index)
        unknown = [f for f in folders if f not in id_of]
        if unknown:
            raise BadInput(f"dataset.class_index: class folder '{unknown[0]}' in {root} is not in {class_index} "
                           f"({len(unknown)} of {len(folders)} folders unmapped; the index maps {len(id_of)})")
        id_of = {f: id_of[f] for f in folders}
    else:
        id_of, names = {f: i for i, f in enumerate(folders)}, {i: f for i, f in enumerate(folders)}
    if num_classes is None:  # the largest id the index (or the folder list) gives, + 1
        num_classes = max(names) + 1
    elif num_classes < max(id_of.values()) + 1:
        top = max(id_of, key=id_of.get)
        raise BadInput(f"dataset.num_classes: {num_classes} is too few, folder '{top}' has class id {id_of[top]} "
                       f"(at least {id_of[top] + 1})")
    return id_of, [names.get(i, str(i)) for i in range(num_classes)]


def center_crop_arr(image, size: int) -> np.ndarray:
    """ADM's preprocessing (guided-diffusion, used by DiT's training): box-halve while the shorter side is at
    least 2 x size, bicubic resize of the shorter side to `size`, center crop; uint8 size x size x 3."""
    from PIL import Image

    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _read(path: Path, size: int, out: np.ndarray) -> None:
    """Decode one image into `out` (3 x size x size float32)."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = center_crop_arr(img.convert("RGB"), size)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input
        detail = str(err).splitlines()[0] if str(err) else ""
        raise BadInput(f"imagefolder: unreadable image {path} ({type(err).__name__}: {detail})") from None
    out[:] = arr.transpose(2, 0, 1)
    out /= np.float32(255.0)  # the other loaders' k / 255 exactly: the row store then keeps it as uint8


def _fill(files: list[Path], size: int) -> np.ndarray:
    """The decoded images of `files`, in order, as one preallocated float32 array (no second copy)."""
    x = np.empty((len(files), 3, size, size), dtype=np.float32)
    threads = max(1, min(MAX_THREADS, os.cpu_count() or 1, len(files)))
    with ThreadPoolExecutor(threads) as pool:
        # map yields in order, so the first unreadable file (in path order) is the one reported
        for _ in pool.map(lambda i: _read(files[i], size, x[i]), range(len(files))):
            pass
    return x


def load_imagefolder(spec: DatasetSpec, seed: int) -> ImageDataset:
    """Read the class folders under `spec.root` into an `ImageDataset` (see the module docstring)."""
    found = scan(spec.root)
    id_of, class_names = class_ids(found.folders, spec.class_index, spec.num_classes, found.root)
    size = spec.image_size
    total = sum(len(p) for p in found.parts.values())
    need, limit = total * 3 * size * size * 4, memory_limit()
    if need > limit:
        raise BadInput(f"imagefolder: {total} images of 3x{size}x{size} take {need / 2**30:.1f} GiB as float32, "
                       f"over the limit of {limit / 2**30:.1f} GiB (half this machine's memory); use fewer images "
                       f"per class (a root holding a subset) or a smaller dataset.image_size")

    def labels(part: list[tuple[Path, str]]) -> np.ndarray:
        return np.array([id_of[c] for _, c in part], dtype=np.int64)

    if found.split_given:
        train, test = found.parts["train"], found.parts["test"]
    else:  # the split needs labels only: each part is decoded straight into its own array
        every = found.parts["all"]
        tr, te = stratified_split(labels(every), spec.test_fraction, seed)
        train, test = [every[i] for i in tr], [every[i] for i in te]
        if not test:
            raise BadInput(f"imagefolder: dataset.test_fraction {spec.test_fraction} of {len(every)} images in "
                           f"{found.root} leaves no test images (FD and the judge's accuracy read them)")
    return ImageDataset(
        name=f"imagefolder:{found.root.name}",
        x_train=_fill([f for f, _ in train], size), y_train=labels(train),
        x_test=_fill([f for f, _ in test], size), y_test=labels(test),
        class_names=class_names, superclass_of=np.arange(len(class_names), dtype=np.int64),
        superclass_names=list(class_names),
    )
