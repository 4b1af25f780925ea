"""Image classification data from Parquet files (read with pyarrow; nothing is downloaded).

Layouts (`dataset.root`):
  * a folder with `train.parquet` and `test.parquet`;
  * one `.parquet` file, or a folder of `.parquet` files read as one table, with an optional `split`
    column ("train" / "test"); without it the rows are split stratified by class
    (`dataset.test_fraction`, deterministic from the job seed).

Image column (`dataset.image_column`), one of:
  * encoded image bytes (PNG, JPEG, ... decoded with PIL), also as the `{bytes, path}` struct that
    Hugging Face `datasets` writes; grey images give 1 channel, anything else RGB;
  * a flat list of numbers per row, in C x H x W order, with optional `height`, `width`, `channels`
    columns (without them: H x W square grey, or 3 x S x S RGB when the length is 3 * S * S);
  * a nested list per row: H x W, C x H x W, or H x W x C (C in 1, 3, 4 as the last axis).
Integer pixel values (uint8) are scaled by 1/255; float values already in [0, 1] are kept, floats up
to 255 are scaled by 1/255.

Labels (`dataset.label_column`): non-negative integers (class names "0", "1", ...) or strings (sorted
unique values become ids 0..K-1 and the class names). `dataset.superclass_column` (optional) gives
each row's superclass, which must be the same for every row of a class; without it each class is
its own superclass.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np

from unlearn.data.base import ImageDataset, stratified_split
from unlearn.errors import BadInput
from unlearn.spec import DatasetSpec

LAYOUT_HINT = ("expected a .parquet file, a folder of .parquet files, or a folder with train.parquet and "
               "test.parquet")
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


def load_parquet(spec: DatasetSpec, seed: int) -> ImageDataset:
    """Read the table(s) `spec.root` names into an `ImageDataset` (see the module docstring)."""
    import pyarrow as pa

    if not spec.root:
        raise BadInput(f"dataset.root is required for parquet ({LAYOUT_HINT})")
    root = Path(spec.root).expanduser()
    if not root.exists():
        raise BadInput(f"parquet path not found: {root} ({LAYOUT_HINT})")

    if root.is_dir() and (root / "train.parquet").is_file() and (root / "test.parquet").is_file():
        train_t, test_t = _read(root / "train.parquet"), _read(root / "test.parquet")
        for path, t in ((root / "train.parquet", train_t), (root / "test.parquet", test_t)):
            _check_columns(t, spec, path)
        table = pa.concat_tables([train_t, test_t], promote_options="default")
        is_test = np.r_[np.zeros(train_t.num_rows, bool), np.ones(test_t.num_rows, bool)]
    else:
        if root.is_dir():
            files = sorted(p for p in root.glob("*.parquet") if p.is_file())
            if not files:
                raise BadInput(f"no .parquet files in folder: {root} ({LAYOUT_HINT})")
            tables = [_read(f) for f in files]
            for f, t in zip(files, tables):
                _check_columns(t, spec, f)
            table = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
        else:
            table = _read(root)
            _check_columns(table, spec, root)
        is_test = None
        if "split" in table.column_names:
            is_test = _split_column(table.column("split"), root)

    if table.num_rows == 0:
        raise BadInput(f"parquet data is empty: {root}")
    x = _images(table.column(spec.image_column), table, spec.image_column, root)
    y, class_names = _labels(table.column(spec.label_column), spec.label_column, root)
    superclass_of, superclass_names = _superclasses(table, spec, y, class_names, root)

    if is_test is None:
        tr, te = stratified_split(y, spec.test_fraction, seed)
    else:
        tr, te = np.flatnonzero(~is_test), np.flatnonzero(is_test)
        if len(tr) == 0 or len(te) == 0:
            raise BadInput(f"parquet split leaves no {'train' if len(tr) == 0 else 'test'} rows: {root}")
    return ImageDataset(
        name=f"parquet:{root.name}", x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
        class_names=class_names, superclass_of=superclass_of, superclass_names=superclass_names,
    )


def _read(path: Path):
    import pyarrow.parquet as pq

    if not path.is_file():
        raise BadInput(f"parquet file not found: {path} ({LAYOUT_HINT})")
    try:
        return pq.read_table(path)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is the user's input
        raise BadInput(f"parquet file unreadable: {path} ({type(exc).__name__}: {exc})") from exc


def _check_columns(table, spec: DatasetSpec, path: Path) -> None:
    needed = [("dataset.image_column", spec.image_column), ("dataset.label_column", spec.label_column)]
    if spec.superclass_column:
        needed.append(("dataset.superclass_column", spec.superclass_column))
    for field, col in needed:
        if col not in table.column_names:
            raise BadInput(f"{field}: column '{col}' not in {path} (columns: {', '.join(table.column_names)})")


def _split_column(col, root: Path) -> np.ndarray:
    values = np.array([str(v).strip().lower() if v is not None else "" for v in col.to_pylist()])
    bad = sorted(set(values.tolist()) - {"train", "test"})
    if bad:
        raise BadInput(f"parquet column 'split' in {root} has values {bad[:5]} (allowed: train, test)")
    return values == "test"


def _images(col, table, name: str, root: Path) -> np.ndarray:
    import pyarrow as pa
    import pyarrow.types as pat

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise BadInput(f"parquet column '{name}' in {root} has {arr.null_count} empty images")
    t = arr.type
    if pat.is_struct(t) and t.get_field_index("bytes") >= 0:  # Hugging Face datasets' Image feature
        arr, t = arr.field("bytes"), arr.field("bytes").type
    if pat.is_binary(t) or pat.is_large_binary(t) or pat.is_fixed_size_binary(t):
        return _decode(arr.to_pylist(), name, root)
    if pat.is_list(t) or pat.is_large_list(t) or pat.is_fixed_size_list(t):
        x = _list_to_ndarray(arr, name, root)
        if x.ndim == 2:
            x = _reshape_flat(x, table, name, root)
        elif x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4:
            if x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
                x = x.transpose(0, 3, 1, 2)
        else:
            raise BadInput(f"parquet column '{name}' in {root}: nested lists of depth {x.ndim - 1} (allowed 1 to 3)")
        if x.shape[1] == 4:  # RGBA -> RGB
            x = x[:, :3]
        return _to_unit(x, name, root)
    raise BadInput(f"parquet column '{name}' in {root} has type {t} "
                   "(allowed: encoded image bytes, a flat list of pixels, or a nested list)")


def _decode(blobs: list[bytes], name: str, root: Path) -> np.ndarray:
    from PIL import Image

    images = []
    for i, b in enumerate(blobs):
        try:
            img = Image.open(io.BytesIO(b))
            img.load()
        except Exception as exc:  # noqa: BLE001
            raise BadInput(f"parquet column '{name}' in {root}: row {i} is not a readable image ({exc})") from exc
        images.append(img)
    grey = all(img.mode in GREY_MODES for img in images)
    arrays = [np.asarray(img.convert("L" if grey else "RGB"), dtype=np.uint8) for img in images]
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise BadInput(f"parquet column '{name}' in {root}: images differ in size ({sorted(shapes)[:3]}...); "
                       "all images must have the same height and width")
    x = np.stack(arrays)
    x = x[:, None] if grey else x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32) / np.float32(255.0)


def _list_to_ndarray(arr, name: str, root: Path) -> np.ndarray:
    import pyarrow.types as pat

    shape = [len(arr)]
    while pat.is_list(arr.type) or pat.is_large_list(arr.type) or pat.is_fixed_size_list(arr.type):
        if arr.null_count:
            raise BadInput(f"parquet column '{name}' in {root} has empty (null) pixel lists")
        lengths = np.asarray(arr.value_lengths().to_numpy(zero_copy_only=False))
        if len(lengths) == 0:
            raise BadInput(f"parquet column '{name}' in {root} is empty")
        if (lengths != lengths[0]).any():
            raise BadInput(f"parquet column '{name}' in {root}: rows have different numbers of pixels "
                           f"({int(lengths.min())} to {int(lengths.max())})")
        shape.append(int(lengths[0]))
        arr = arr.flatten()
    if arr.null_count:
        raise BadInput(f"parquet column '{name}' in {root} has null pixel values")
    values = arr.to_numpy(zero_copy_only=False)
    if not np.issubdtype(values.dtype, np.number):
        raise BadInput(f"parquet column '{name}' in {root}: pixel values must be numbers, got {arr.type}")
    return values.reshape(shape)


def _constant(table, col: str, root: Path) -> int | None:
    if col not in table.column_names:
        return None
    vals = list(dict.fromkeys(table.column(col).to_pylist()))
    if len(vals) != 1 or vals[0] is None:
        raise BadInput(f"parquet column '{col}' in {root} must hold one value for all rows, got {vals[:5]}")
    try:
        return int(vals[0])
    except (TypeError, ValueError) as exc:
        raise BadInput(f"parquet column '{col}' in {root} must be an integer, got {vals[0]!r}") from exc


def _reshape_flat(x: np.ndarray, table, name: str, root: Path) -> np.ndarray:
    n, length = x.shape
    h, w, c = (_constant(table, k, root) for k in ("height", "width", "channels"))
    if h is None and w is None:
        if c is None:
            c = 1 if math.isqrt(length) ** 2 == length else 3
        side = math.isqrt(length // c) if length % c == 0 else 0
        if side == 0 or c * side * side != length:
            raise BadInput(f"parquet column '{name}' in {root}: {length} pixels per row is not a square image; "
                           "add height, width (and channels) columns")
        h = w = side
    else:
        if h is None:
            h = length // ((c or 1) * w)  # type: ignore[operator]
        if w is None:
            w = length // ((c or 1) * h)
        if c is None:
            c = length // (h * w) if h * w and length % (h * w) == 0 else 0
        if c * h * w != length:
            raise BadInput(f"parquet column '{name}' in {root}: {length} pixels per row does not match "
                           f"channels x height x width = {c} x {h} x {w}")
    return x.reshape(n, c, h, w)


def _to_unit(x: np.ndarray, name: str, root: Path) -> np.ndarray:
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise BadInput(f"parquet column '{name}' in {root}: integer pixels must be in 0..255, got {lo}..{hi}")
        return x.astype(np.float32) / np.float32(255.0)
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise BadInput(f"parquet column '{name}' in {root} has NaN or infinite pixel values")
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if lo < 0 or hi > 255:
        raise BadInput(f"parquet column '{name}' in {root}: pixel values must be in [0, 1] or 0..255, got {lo}..{hi}")
    return x / np.float32(255.0) if hi > 1.0 else x


def _ids(col, field: str, name: str, root: Path) -> tuple[np.ndarray, list[str] | None]:
    """Integer ids of a label-like column, plus names when the values are strings."""
    import pyarrow as pa
    import pyarrow.types as pat

    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if arr.null_count:
        raise BadInput(f"{field}: column '{name}' in {root} has {arr.null_count} empty values")
    if pat.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    if pat.is_string(arr.type) or pat.is_large_string(arr.type):
        values = np.asarray(arr.to_pylist(), dtype=object)
        names, ids = np.unique(values.astype(str), return_inverse=True)
        return ids.astype(np.int64), [str(v) for v in names]
    if pat.is_integer(arr.type) or pat.is_boolean(arr.type):
        ids = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    elif pat.is_floating(arr.type):
        vals = arr.to_numpy(zero_copy_only=False)
        if not np.all(np.isfinite(vals)) or not np.all(vals == np.round(vals)):
            raise BadInput(f"{field}: column '{name}' in {root} must hold whole numbers or strings")
        ids = vals.astype(np.int64)
    else:
        raise BadInput(f"{field}: column '{name}' in {root} has type {arr.type} (allowed: integers or strings)")
    if len(ids) and ids.min() < 0:
        raise BadInput(f"{field}: column '{name}' in {root} has negative ids (min {int(ids.min())})")
    return ids, None


def _labels(col, name: str, root: Path) -> tuple[np.ndarray, list[str]]:
    y, names = _ids(col, "dataset.label_column", name, root)
    if names is None:
        names = [str(c) for c in range(int(y.max()) + 1)]
    return y, names


def _superclasses(table, spec: DatasetSpec, y: np.ndarray, class_names: list[str],
                  root: Path) -> tuple[np.ndarray, list[str]]:
    k = len(class_names)
    if not spec.superclass_column:
        return np.arange(k, dtype=np.int64), list(class_names)
    s, names = _ids(table.column(spec.superclass_column), "dataset.superclass_column", spec.superclass_column, root)
    if names is None:
        names = [str(i) for i in range(int(s.max()) + 1)]
    superclass_of = np.full(k, -1, dtype=np.int64)
    pairs = np.unique(np.stack([y, s], axis=1), axis=0)
    classes, counts = np.unique(pairs[:, 0], return_counts=True)
    if (counts > 1).any():
        c = int(classes[np.argmax(counts > 1)])
        found = [names[i] for i in pairs[pairs[:, 0] == c, 1]]
        raise BadInput(f"dataset.superclass_column: class '{class_names[c]}' has more than one superclass "
                       f"in column '{spec.superclass_column}' ({', '.join(found[:5])}); it must be constant per class")
    superclass_of[pairs[:, 0]] = pairs[:, 1]
    if (superclass_of < 0).any():  # class ids with no rows (gaps in integer labels)
        names = names + ["unassigned"]
        superclass_of[superclass_of < 0] = len(names) - 1
    return superclass_of, names
