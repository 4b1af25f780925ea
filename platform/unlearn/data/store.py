"""The Parquet row store: every dataset on disk as rows a process can read a few of at a time.

A job's driver needs only the labels (to build forget / retain splits) and row ids; each Ray worker
reads the images of its own rows. A store is a folder:

    meta.json       name, class_names, superclass_of, superclass_names, input_shape [C, H, W], dtype
                    (of the stored pixels), num_train, num_test, row_group_rows, format (version)
    train.parquet   columns `row` (int64, 0..n-1), `label` (int64), `x` (C*H*W pixels per row)
    test.parquet    the same for the test part

`x` is a fixed-size list of uint8 when every pixel is exactly k/255 (the images came from 8-bit data:
CIFAR, synthetic, most Parquet sources), else of float32 (digits' k/16, resized images). Rows are
written in id order in row groups of a fixed size per store, so reading a few rows decodes only the
groups that hold them.

`open_store(spec, seed, cache_dir)` builds a job's store once from the dataset's loader and caches it
under `<cache_dir>/data/store-<key>/`; `store_key` says what the key depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from unlearn.data.base import ImageDataset
from unlearn.spec import DatasetSpec

FORMAT_VERSION = 1
PARTS = ("train", "test")
META = "meta.json"
# Rows per row group: at most MAX_GROUP_ROWS, fewer for large images so that one group stays around
# GROUP_BYTES uncompressed (a read fetches and decompresses whole groups: this bounds what a read of a
# few rows costs, in time and in memory).
MAX_GROUP_ROWS = 2048
GROUP_BYTES = 2 << 20
READ_BATCH_BYTES = 1 << 20  # stored pixels decoded at once by `read` (bounds its working memory)
CHECK_ELEMENTS = 1 << 22  # pixels examined at once when testing for 8-bit data (bounds the temporaries)
SCALE = np.float32(255.0)  # the loaders' uint8 -> float32 division, repeated exactly on read

SLOW_BUILD_S = 5.0  # builds at least this long say so on stderr


class RowStore:
    """A store folder opened for reading; holds only meta.json's contents until asked for rows."""

    def __init__(self, folder: str | Path) -> None:
        """Open the store in `folder` (reads meta.json only)."""
        self.folder = Path(folder)
        meta = json.loads((self.folder / META).read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"{self.folder}: store format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        for part in PARTS:
            if not (self.folder / f"{part}.parquet").is_file():
                raise ValueError(f"{self.folder}: {part}.parquet missing")
        self._meta = meta
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._labels: dict[str, np.ndarray] = {}
        self._group_starts: dict[str, np.ndarray] = {}

    # pickling ships the folder and the metadata only: a store goes to every Ray worker, its caches must not
    def __getstate__(self) -> dict:
        return {"folder": str(self.folder), "meta": self._meta}

    def __setstate__(self, state: dict) -> None:
        self.folder = Path(state["folder"])
        self._meta = state["meta"]
        self._reset_caches()

    def __repr__(self) -> str:
        return (f"RowStore({self.name!r}, {self.num_rows('train')} + {self.num_rows('test')} rows of "
                f"{'x'.join(map(str, self.input_shape))} {self._meta['dtype']}, {str(self.folder)!r})")

    @property
    def name(self) -> str:
        """The dataset's name, as the loader gave it."""
        return self._meta["name"]

    @property
    def class_names(self) -> list[str]:
        """One name per class id."""
        return list(self._meta["class_names"])

    @property
    def superclass_of(self) -> np.ndarray:
        """int64 superclass id of each class."""
        return np.asarray(self._meta["superclass_of"], dtype=np.int64)

    @property
    def superclass_names(self) -> list[str]:
        """One name per superclass id."""
        return list(self._meta["superclass_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._meta["class_names"])

    @property
    def num_superclasses(self) -> int:
        """Number of superclasses."""
        return len(self._meta["superclass_names"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self._meta["input_shape"])  # type: ignore[return-value]

    def classes_of(self, superclass: int) -> list[int]:
        """The classes that make up one superclass, in id order."""
        return [int(c) for c in np.flatnonzero(self.superclass_of == superclass)]

    @property
    def backdoor(self) -> dict | None:
        """The planted trigger ({"target", "patch", "value"}), None for clean data (data/backdoor.py)."""
        return self._meta.get("backdoor")

    @property
    def poisoned(self) -> np.ndarray | None:
        """bool per training row: whether it carries the trigger (None for clean data)."""
        if "poisoned" not in self._meta:
            return None
        mask = np.zeros(self.num_rows("train"), dtype=bool)
        mask[np.asarray(self._meta["poisoned"], dtype=np.int64)] = True
        return mask

    def num_rows(self, part: str) -> int:
        """Number of rows in the part ("train" or "test")."""
        return int(self._meta[f"num_{_checked(part)}"])

    def labels(self, part: str) -> np.ndarray:
        """int64 class id of every row of the part, in row order (reads the label column only; cached)."""
        if part not in self._labels:
            import pyarrow.parquet as pq

            with pq.ParquetFile(self._path(part)) as pf:  # not pq.read_table: that loads pyarrow.dataset too
                table = pf.read(columns=["label"])
            y = table.column("label").to_numpy().astype(np.int64, copy=False)
            y.flags.writeable = False  # shared by every caller
            self._labels[part] = y
        return self._labels[part]

    def read(self, part: str, rows: np.ndarray) -> np.ndarray:
        """float32 images (len(rows) x C x H x W, in [0, 1]) of the given row ids, in the order given."""
        import pyarrow.parquet as pq

        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        n = self.num_rows(part)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise IndexError(f"{self.name} {part}: row ids must be in 0..{n - 1}, got {rows.min()}..{rows.max()}")
        dim = int(np.prod(self.input_shape))
        out = np.empty((len(rows), dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        wanted = rows[order]  # ascending, like the rows on disk
        if rows.size:
            with pq.ParquetFile(self._path(part)) as pf:
                starts = self._starts(part, pf)
                groups = np.unique(np.searchsorted(starts, wanted, side="right") - 1)
                itemsize = 1 if self._meta["dtype"] == "uint8" else 4
                batch_rows = max(1, READ_BATCH_BYTES // (dim * itemsize))
                # One group at a time (given several, pyarrow reads them all ahead), decoded in small
                # batches: a list column costs ~12 bytes of decode buffers per pixel (levels and INT32
                # values), so a whole 2048-row group of 32 px images would take ~80 MB at once.
                # (single-threaded: a thread per column only adds allocator arenas, `row` is tiny)
                batches = (batch for g in groups.tolist()
                           for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[g],
                                                        columns=["row", "x"], use_threads=False))
                for batch in batches:
                    ids = batch.column(0).to_numpy()
                    lo = np.searchsorted(wanted, ids[0], side="left")
                    hi = np.searchsorted(wanted, ids[-1], side="right")
                    if lo == hi:
                        continue
                    if ids[-1] - ids[0] != len(ids) - 1:
                        raise ValueError(f"{self._path(part)}: row ids are not consecutive near row {ids[0]}")
                    pixels = batch.column(1).flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
                    out[order[lo:hi]] = pixels[wanted[lo:hi] - ids[0]]
        if self._meta["dtype"] == "uint8":
            out /= SCALE
        return out.reshape(len(rows), *self.input_shape)

    def path(self, part: str) -> Path:
        """The part's Parquet file (what a streaming reader such as Ray Data reads)."""
        return self._path(part)

    def decode(self, pixels) -> np.ndarray:
        """float32 images (N x C x H x W, in [0, 1]) from a batch's `x` column (a pyarrow array), as `read` does."""
        dim = int(np.prod(self.input_shape))
        if hasattr(pixels, "combine_chunks"):  # a table's column: one array first
            pixels = pixels.combine_chunks()
        out = pixels.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
        if self._meta["dtype"] == "uint8":
            out /= SCALE
        return out.reshape(-1, *self.input_shape)

    def _path(self, part: str) -> Path:
        return self.folder / f"{_checked(part)}.parquet"

    def _starts(self, part: str, pf) -> np.ndarray:
        """First row id of each row group (from the file footer, so any group sizes would do)."""
        if part not in self._group_starts:
            sizes = [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)]
            self._group_starts[part] = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        return self._group_starts[part]


def _checked(part: str) -> str:
    if part not in PARTS:
        raise ValueError(f"part must be 'train' or 'test', got {part!r}")
    return part


# ----------------------------------------------------------------------------------------------------
# writing


def build_store(dataset: ImageDataset, folder: str | Path) -> RowStore:
    """Write `dataset` as a store in `folder` (atomically) and open it; a store already there is kept."""
    parts = {"train": (dataset.x_train, dataset.y_train), "test": (dataset.x_test, dataset.y_test)}
    eight_bit = all(_is_8bit(x) for x, _ in parts.values())
    header = _header(dataset.name, dataset.class_names, dataset.superclass_of, dataset.superclass_names,
                     dataset.input_shape)
    if dataset.backdoor is not None:  # which rows carry the trigger travels with the data
        header.update(backdoor=dataset.backdoor, poisoned=[int(r) for r in np.flatnonzero(dataset.poisoned)])
    return _build(Path(folder), header, parts, eight_bit)


def _header(name: str, class_names: list[str], superclass_of: np.ndarray, superclass_names: list[str],
            input_shape: tuple[int, ...]) -> dict:
    return {"name": name, "class_names": [str(c) for c in class_names],
            "superclass_of": [int(s) for s in np.asarray(superclass_of)],
            "superclass_names": [str(s) for s in superclass_names],
            "input_shape": [int(d) for d in input_shape]}


def _build(folder: Path, header: dict, parts: dict[str, tuple[np.ndarray, np.ndarray]], eight_bit: bool) -> RowStore:
    """Write the parts into a temporary sibling folder, then rename it into place.

    The rename is atomic, so a reader sees a whole store or none. When a concurrent builder of the same
    store renamed first, its (identical) store is kept and this one discarded.
    """
    t0 = time.perf_counter()
    shape = tuple(header["input_shape"])
    dim = int(np.prod(shape))
    dtype = "uint8" if eight_bit else "float32"
    group_rows = int(max(1, min(MAX_GROUP_ROWS, GROUP_BYTES // (dim * (1 if eight_bit else 4)))))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would hide the store from other users of a shared cache
        for part, (x, y) in parts.items():
            if tuple(x.shape[1:]) != shape:
                raise ValueError(f"{header['name']}: {part} images are {x.shape[1:]}, expected {shape}")
            _write_part(tmp / f"{part}.parquet", x, y, dim, eight_bit, group_rows)
        meta = {"format": FORMAT_VERSION, **header, "dtype": dtype, "row_group_rows": group_rows,
                **{f"num_{part}": len(parts[part][1]) for part in PARTS}}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / META).is_file():
                raise
            # another builder won the race; its store holds the same data
        else:  # a note for builds long enough to notice; quick ones stay quiet (a spec error stays one line)
            if time.perf_counter() - t0 >= SLOW_BUILD_S:
                print(f"store: wrote {header['name']} ({meta['num_train']} + {meta['num_test']} rows, {dtype}) "
                      f"in {time.perf_counter() - t0:.1f}s to {folder}", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RowStore(folder)


def _write_part(path: Path, x: np.ndarray, y: np.ndarray, dim: int, eight_bit: bool, group_rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    value_type = pa.uint8() if eight_bit else pa.float32()
    # non-nullable throughout: the reader then skips definition levels (a quarter of the decode time)
    pixel_type = pa.list_(pa.field("item", value_type, nullable=False), dim)
    schema = pa.schema([pa.field("row", pa.int64(), nullable=False), pa.field("label", pa.int64(), nullable=False),
                        pa.field("x", pixel_type, nullable=False)])
    y = np.asarray(y, dtype=np.int64)
    # Dictionary-encoded pixels: Parquet stores uint8 as 4-byte INT32, the dictionary indices take one
    # byte (and float32 pixels with few distinct values, like digits' k/16, shrink likewise; writers
    # fall back to plain encoding by themselves when the dictionary grows too large).
    with pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=["label", "x.list.element"],
                          write_statistics=["row", "label"]) as writer:
        for start in range(0, len(y), group_rows):
            block = x[start:start + group_rows].reshape(-1, dim)
            if eight_bit and block.dtype != np.uint8:
                block = np.rint(block * SCALE).astype(np.uint8)
            elif not eight_bit:
                block = np.ascontiguousarray(block, dtype=np.float32)
            pixels = pa.FixedSizeListArray.from_arrays(pa.array(block.reshape(-1), type=value_type), type=pixel_type)
            ids = np.arange(start, start + len(block), dtype=np.int64)
            writer.write_table(pa.table([ids, y[start:start + len(block)], pixels], schema=schema),
                               row_group_size=group_rows)


def _is_8bit(x: np.ndarray) -> bool:
    """Whether every value is bit-exactly what the loaders make of a uint8 pixel (k / 255 in float32)."""
    if x.dtype == np.uint8:
        return True
    step = max(1, CHECK_ELEMENTS // max(1, int(np.prod(x.shape[1:]))))
    for start in range(0, len(x), step):
        chunk = np.ascontiguousarray(x[start:start + step], dtype=np.float32)
        q = np.rint(np.clip(chunk, 0, 1) * SCALE)  # clipped: 2.0 would survive the round trip as 510
        if not np.array_equal((q / SCALE).view(np.uint32), chunk.view(np.uint32)):
            return False
    return True


# ----------------------------------------------------------------------------------------------------
# the store of a job's dataset spec


def store_key(spec: DatasetSpec, seed: int) -> str:
    """Content hash of what a spec's data depends on (see `_key_fields`)."""
    blob = json.dumps({"format": FORMAT_VERSION, **_key_fields(spec, seed)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _key_fields(spec: DatasetSpec, seed: int) -> dict:
    """The spec fields each loader reads, the seed where the train/test split or the pixels depend on it,
    and for local files their paths, sizes and mtimes (an edited or replaced file gives a new key)."""
    fields: dict = {"name": spec.name, "resize": spec.resize}
    if spec.backdoor is not None:  # the poisoned rows are drawn from the seed
        fields.update(backdoor=spec.backdoor.model_dump(mode="json"), backdoor_seed=seed)
    if spec.name == "digits":  # stratified split of sklearn's bundled (fixed) data
        fields.update(test_fraction=spec.test_fraction, seed=seed)
    elif spec.name == "synthetic":  # both parts are generated from the seed
        from unlearn.data.synthetic import GENERATOR_VERSION

        fields.update(num_train=spec.num_train, num_test=spec.num_test, image_size=spec.image_size,
                      seed=seed, generator=GENERATOR_VERSION)
    elif spec.name in ("cifar10", "cifar100"):  # official train / test files
        from unlearn.data.cifar import LAYOUTS, _find_folder

        folder = _find_folder(spec.root, spec.name)  # the loader's own resolution of `root`
        layout = LAYOUTS[spec.name]
        fields["files"] = _fingerprint([folder / f for f in [layout["meta"], *layout["train"], *layout["test"]]])
    elif spec.name == "parquet":
        root = Path(spec.root).expanduser().absolute()  # not resolved: the dataset is named after it
        files, split_given = _parquet_sources(root)
        fields.update(root=str(root), image_column=spec.image_column, label_column=spec.label_column,
                      superclass_column=spec.superclass_column, files=_fingerprint(files))
        if not split_given:  # the loader splits stratified by class
            fields.update(test_fraction=spec.test_fraction, seed=seed)
    elif spec.name == "imagefolder":
        from unlearn.data.imagefolder import scan

        found = scan(spec.root)  # the loader's own listing: its files, and whether root/train + root/val split it
        fields.update(root=str(found.root.absolute()), image_size=spec.image_size, num_classes=spec.num_classes,
                      files=_fingerprint(found.files()),
                      class_index=_fingerprint([Path(spec.class_index).expanduser()]) if spec.class_index else None)
        if not found.split_given:  # the loader splits stratified by class
            fields.update(test_fraction=spec.test_fraction, seed=seed)
    else:  # a dataset registered since: what its loader reads is unknown here, so everything counts
        fields.update(spec=spec.model_dump(mode="json"), seed=seed)
        if spec.root:
            root = Path(spec.root).expanduser()
            files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
            fields["files"] = _fingerprint(files)
    return fields


def _parquet_sources(root: Path) -> tuple[list[Path], bool]:
    """The files the parquet loader reads for `root`, and whether they fix the train/test split.

    Mirrors `load_parquet`'s layouts; only file footers are read (for a `split` column). A path the
    loader would reject is keyed as it stands, so the key misses and the loader reports the problem.
    """
    import pyarrow.parquet as pq

    if root.is_dir() and (root / "train.parquet").is_file() and (root / "test.parquet").is_file():
        return [root / "train.parquet", root / "test.parquet"], True
    files = sorted(p for p in root.glob("*.parquet") if p.is_file()) if root.is_dir() else [root]
    try:
        split_given = any("split" in pq.read_schema(f).names for f in files)
    except Exception:  # noqa: BLE001 - unreadable or missing: keyed as seed-dependent; the loader will say why
        split_given = False
    return files, split_given


def _fingerprint(files: list[Path]) -> list:
    out = []
    for f in files:
        try:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
        except OSError:  # missing: the loader raises the proper error
            out.append([str(f), None, None])
    return out


def open_store(spec: DatasetSpec, seed: int, cache_dir: str | Path = ".cache/unlearn") -> RowStore:
    """The store of a job's dataset: opened from the cache (meta.json only) or built once from the loader."""
    # Absolute: workers open the store by this path, and Ray Train runs them in another working directory
    # (a relative cache_dir such as the default failed every worker of `make run` on a fresh clone).
    folder = Path(cache_dir).resolve() / "data" / f"store-{store_key(spec, seed)}"
    if folder.exists():
        try:
            return RowStore(folder)
        except (OSError, ValueError, KeyError) as exc:  # damaged (e.g. edited by hand): rebuilt
            print(f"store: {folder} unreadable ({exc}); rebuilding", file=sys.stderr, flush=True)
            # moved aside first (atomic), so no reader ever sees it half deleted
            trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".trash", dir=folder.parent))
            try:
                os.replace(folder, trash / "old")
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(trash, ignore_errors=True)
    if spec.name == "synthetic" and not spec.resize and spec.backdoor is None:
        return _build_synthetic(spec, seed, folder)
    from unlearn.data import load_dataset

    return build_store(load_dataset(spec, seed, cache_dir), folder)


def _build_synthetic(spec: DatasetSpec, seed: int, folder: Path) -> RowStore:
    """The synthetic generator's uint8 images written as they are: no float32 copy of the whole set in
    memory, and no second cache file (the loader's own Parquet cache is not needed next to the store)."""
    from unlearn.data import synthetic

    x_tr, y_tr = synthetic.generate(spec.num_train, spec.image_size, seed, stream=0)
    x_te, y_te = synthetic.generate(spec.num_test, spec.image_size, seed, stream=1)
    header = _header("synthetic", synthetic.class_names(), synthetic.superclass_of(), list(synthetic.FAMILIES),
                     x_tr.shape[1:])
    return _build(folder, header, {"train": (x_tr, y_tr), "test": (x_te, y_te)}, eight_bit=True)
