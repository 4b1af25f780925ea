"""Dataset loaders: CIFAR-10/100 pickles, Parquet layouts, and the procedural synthetic dataset."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unlearn.data import load_dataset, synthetic
from unlearn.data.cifar import CIFAR10_CLASSES, CIFAR100_SUPERCLASSES, load_cifar
from unlearn.data.parquet import load_parquet
from unlearn.errors import BadInput
from unlearn.spec import DatasetSpec

# ----------------------------------------------------------------------------------------------------
# CIFAR: tiny folders in torchvision's python-pickle format


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as fh:
        pickle.dump(obj, fh, protocol=2)


def _pixels(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8)


@pytest.fixture
def cifar10_root(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = {}
    for i in range(1, 6):
        x, y = _pixels(rng, 4), [int(v) for v in rng.integers(0, 10, 4)]
        _dump(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": y, "data": x,
                                           "filenames": [f"f{i}_{j}.png" for j in range(4)]})
        data[f"data_batch_{i}"] = (x, y)
    x, y = _pixels(rng, 6), [0, 1, 2, 3, 8, 9]
    _dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": y, "data": x,
                                  "filenames": [f"t{j}.png" for j in range(6)]})
    data["test_batch"] = (x, y)
    _dump(folder / "batches.meta", {"label_names": CIFAR10_CLASSES, "num_cases_per_batch": 4, "num_vis": 3072})
    return tmp_path, data


FINE = sorted(f for fs in CIFAR100_SUPERCLASSES.values() for f in fs)
COARSE = sorted(CIFAR100_SUPERCLASSES)
COARSE_OF = {f: COARSE.index(c) for c, fs in CIFAR100_SUPERCLASSES.items() for f in fs}


@pytest.fixture
def cifar100_root(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data = {}
    for split, n in (("train", 12), ("test", 5)):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        coarse = [COARSE_OF[FINE[f]] for f in fine]
        x = _pixels(rng, n)
        # byte-string keys, as in pickles re-dumped from `pickle.load(..., encoding="bytes")`
        _dump(folder / split, {b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                               b"fine_labels": fine, b"coarse_labels": coarse, b"data": x})
        data[split] = (x, fine, coarse)
    _dump(folder / "meta", {"fine_label_names": FINE, "coarse_label_names": COARSE})
    return tmp_path, data


def test_cifar10_reads_pickles_and_groups_superclasses(cifar10_root):
    root, data = cifar10_root
    ds = load_cifar(str(root), "cifar10")
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    x1, y1 = data["data_batch_1"]
    np.testing.assert_allclose(ds.x_train[:4], x1.reshape(4, 3, 32, 32) / 255.0, atol=1e-7)
    assert ds.y_train[:4].tolist() == y1
    assert ds.y_test.tolist() == data["test_batch"][1] and ds.y_test.dtype == np.int64
    assert ds.class_names == CIFAR10_CLASSES
    assert ds.num_superclasses == 5
    pairs = {tuple(sorted(ds.class_names[c] for c in ds.classes_of(s))) for s in range(5)}
    assert pairs == {("airplane", "ship"), ("automobile", "truck"), ("bird", "frog"), ("cat", "dog"),
                     ("deer", "horse")}
    # the inner folder itself is accepted too, and load_dataset dispatches here
    assert load_cifar(str(root / "cifar-10-batches-py"), "cifar10").x_train.shape[0] == 20
    spec = DatasetSpec(name="cifar10", root=str(root))
    assert load_dataset(spec, seed=0).num_classes == 10


def test_cifar100_coarse_labels_come_through(cifar100_root):
    root, data = cifar100_root
    ds = load_cifar(root, "cifar100")
    assert ds.x_train.shape == (12, 3, 32, 32) and ds.x_test.shape == (5, 3, 32, 32)
    assert ds.num_classes == 100 and ds.num_superclasses == 20
    assert ds.class_names == FINE and ds.superclass_names == COARSE
    x, fine, coarse = data["train"]
    assert ds.y_train.tolist() == fine
    np.testing.assert_allclose(ds.x_train, x.reshape(-1, 3, 32, 32) / 255.0, atol=1e-7)
    assert ds.superclass_of[ds.y_train].tolist() == coarse  # the file's coarse labels
    assert all(ds.superclass_of[i] == COARSE_OF[n] for i, n in enumerate(FINE))  # the official map elsewhere
    assert sorted(len(ds.classes_of(s)) for s in range(20)) == [5] * 20


def test_cifar_missing_folder_or_file_is_bad_input(tmp_path, cifar10_root):
    with pytest.raises(BadInput) as err:
        load_cifar(str(tmp_path / "nowhere"), "cifar10")
    msg = str(err.value)
    assert "nowhere" in msg and "cifar-10-batches-py" in msg and "\n" not in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="cifar-100-python"):
        load_cifar(str(empty), "cifar100")
    root, _ = cifar10_root
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(BadInput, match="data_batch_3"):
        load_cifar(str(root), "cifar10")


# ----------------------------------------------------------------------------------------------------
# Parquet layouts


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _spec(root: Path, **kw) -> DatasetSpec:
    return DatasetSpec(name="parquet", root=str(root), **kw)


def test_parquet_png_bytes_with_split_column(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (10, 6, 5, 3), dtype=np.uint8)  # H x W x C
    split = ["train"] * 7 + ["test"] * 3
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"image": [_png(a) for a in imgs], "label": labels, "split": split}), path)
    ds = load_parquet(_spec(path), seed=0)
    assert ds.x_train.shape == (7, 3, 6, 5) and ds.x_test.shape == (3, 3, 6, 5)
    np.testing.assert_allclose(ds.x_train, imgs[:7].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    np.testing.assert_allclose(ds.x_test, imgs[7:].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)
    assert ds.y_train.tolist() == labels[:7] and ds.y_test.tolist() == labels[7:]
    assert ds.class_names == ["0", "1", "2"] and ds.superclass_of.tolist() == [0, 1, 2]


def test_parquet_grey_png_and_hf_struct(tmp_path):
    imgs = np.arange(4 * 8 * 8, dtype=np.uint8).reshape(4, 8, 8)
    structs = [{"bytes": _png(a), "path": None} for a in imgs]
    path = tmp_path / "g.parquet"
    pq.write_table(pa.table({"img": structs, "y": [0, 1, 0, 1], "split": ["train", "train", "test", "test"]}), path)
    ds = load_parquet(_spec(path, image_column="img", label_column="y"), seed=0)
    assert ds.x_train.shape == (2, 1, 8, 8)
    np.testing.assert_allclose(ds.x_test[:, 0], imgs[2:] / 255.0, atol=1e-7)


def test_parquet_flat_arrays_with_shape_columns_and_train_test_files(tmp_path):
    rng = np.random.default_rng(1)
    c, h, w = 3, 4, 5
    folder = tmp_path / "files"
    folder.mkdir()
    parts = {}
    for name, n in (("train", 8), ("test", 4)):
        x = rng.integers(0, 256, (n, c * h * w), dtype=np.uint8)
        y = np.arange(n) % 2
        flat = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), c * h * w)
        pq.write_table(pa.table({"image": flat, "label": y, "height": [h] * n, "width": [w] * n,
                                 "channels": [c] * n}), folder / f"{name}.parquet")
        parts[name] = (x, y)
    ds = load_parquet(_spec(folder), seed=0)
    assert ds.x_train.shape == (8, 3, 4, 5) and ds.x_test.shape == (4, 3, 4, 5)
    np.testing.assert_allclose(ds.x_train, parts["train"][0].reshape(8, c, h, w) / 255.0, atol=1e-7)
    np.testing.assert_allclose(ds.x_test, parts["test"][0].reshape(4, c, h, w) / 255.0, atol=1e-7)
    assert ds.y_test.tolist() == parts["test"][1].tolist()


def test_parquet_float_lists_square_inference_and_nested_hwc(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.random((6, 3 * 4 * 4)).astype(np.float32)  # flat floats in [0, 1]: kept, 3 x 4 x 4 inferred
    path = tmp_path / "f.parquet"
    pq.write_table(pa.table({"image": list(x), "label": [0, 1, 0, 1, 0, 1],
                             "split": ["train"] * 4 + ["test"] * 2}), path)
    ds = load_parquet(_spec(path), seed=0)
    assert ds.x_train.shape == (4, 3, 4, 4)
    np.testing.assert_allclose(ds.x_train, x[:4].reshape(4, 3, 4, 4), atol=1e-7)

    hwc = rng.integers(0, 256, (4, 5, 6, 3)).astype(np.int64)  # nested H x W x C lists of ints
    path2 = tmp_path / "n.parquet"
    pq.write_table(pa.table({"image": [a.tolist() for a in hwc], "label": [1, 0, 1, 0],
                             "split": ["train", "train", "test", "test"]}), path2)
    ds2 = load_parquet(_spec(path2), seed=0)
    assert ds2.x_train.shape == (2, 3, 5, 6)
    np.testing.assert_allclose(ds2.x_test, hwc[2:].transpose(0, 3, 1, 2) / 255.0, atol=1e-7)


def test_parquet_folder_without_split_string_labels_and_superclasses(tmp_path):
    rng = np.random.default_rng(3)
    names = ["cat", "dog", "car", "bus"]
    group = {"cat": "animal", "dog": "animal", "car": "vehicle", "bus": "vehicle"}
    folder = tmp_path / "parts"
    folder.mkdir()
    rows = []
    for part in range(2):
        labels = [names[i % 4] for i in range(20)]
        x = rng.integers(0, 256, (20, 16), dtype=np.uint8)  # 4 x 4 grey, shape inferred
        rows += labels
        pq.write_table(pa.table({"image": list(x), "label": labels, "kind": [group[n] for n in labels]}),
                       folder / f"part-{part}.parquet")
    spec = _spec(folder, superclass_column="kind", test_fraction=0.3)
    ds = load_parquet(spec, seed=0)
    assert ds.class_names == ["bus", "car", "cat", "dog"]  # sorted unique strings
    assert ds.superclass_names == ["animal", "vehicle"]
    assert ds.superclass_of.tolist() == [1, 1, 0, 0]
    assert ds.x_train.shape == (28, 1, 4, 4) and ds.x_test.shape == (12, 1, 4, 4)
    assert np.bincount(ds.y_test).tolist() == [3, 3, 3, 3]  # stratified: 30% of each class's 10 rows
    again = load_parquet(spec, seed=0)
    np.testing.assert_array_equal(ds.y_train, again.y_train)  # deterministic from the seed
    assert sorted(ds.y_train.tolist() + ds.y_test.tolist()) == sorted(ds.class_names.index(n) for n in rows)


def test_parquet_bad_inputs_are_one_line(tmp_path):
    with pytest.raises(BadInput, match="not found"):
        load_parquet(_spec(tmp_path / "missing.parquet"), seed=0)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"pixels": [[0, 1, 2, 3]] * 4, "label": [0, 1, 0, 1], "sc": [0, 0, 1, 1]}), path)
    with pytest.raises(BadInput) as err:
        load_parquet(_spec(path), seed=0)
    assert "image" in str(err.value) and "pixels" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(BadInput, match="more than one superclass"):
        load_parquet(_spec(path, image_column="pixels", superclass_column="sc"), seed=0)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="no .parquet files"):
        load_parquet(_spec(empty), seed=0)


# ----------------------------------------------------------------------------------------------------
# synthetic


def test_synthetic_deterministic_balanced_two_levels(tmp_path):
    a = synthetic.load_synthetic(200, 100, 32, seed=0, cache_dir=None)
    b = synthetic.load_synthetic(200, 100, 32, seed=0, cache_dir=None)
    c = synthetic.load_synthetic(200, 100, 32, seed=1, cache_dir=None)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert not np.array_equal(a.x_train[:100], a.x_test)  # train and test come from distinct streams
    assert a.x_train.shape == (200, 3, 32, 32) and a.x_test.shape == (100, 3, 32, 32)
    assert a.x_train.dtype == np.float32 and a.x_train.min() >= 0 and a.x_train.max() <= 1
    assert np.bincount(a.y_train, minlength=20).tolist() == [10] * 20
    assert np.bincount(a.y_test, minlength=20).tolist() == [5] * 20
    assert a.num_classes == 20 and a.num_superclasses == 5
    assert a.superclass_of.tolist() == [c // 4 for c in range(20)]
    assert a.superclass_names == ["disc", "square", "triangle", "cross", "star"]
    assert a.class_names[0] == "disc-crimson-solid" and all(n.startswith(a.superclass_names[i // 4])
                                                            for i, n in enumerate(a.class_names))
    small = synthetic.load_synthetic(40, 20, 16, seed=0, cache_dir=None)
    assert small.x_train.shape == (40, 3, 16, 16)


def test_synthetic_cache_hit_returns_same_arrays(tmp_path, monkeypatch):
    spec = DatasetSpec(name="synthetic", num_train=60, num_test=40, image_size=16)
    first = load_dataset(spec, seed=3, cache_dir=tmp_path)
    files = list((tmp_path / "data").glob("*.parquet"))
    assert len(files) == 1 and f"v{synthetic.GENERATOR_VERSION}" in files[0].name
    assert not list((tmp_path / "data").glob("*.tmp"))

    def no_generation(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(synthetic, "generate", no_generation)
    second = load_dataset(spec, seed=3, cache_dir=tmp_path)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
    # the cache file is itself a valid `parquet` dataset
    via_parquet = load_parquet(_spec(files[0], superclass_column="superclass"), seed=0)
    np.testing.assert_array_equal(via_parquet.x_train, first.x_train)
    assert via_parquet.superclass_of.tolist() == first.superclass_of.tolist()


def _hue_histograms(x: np.ndarray, bins: int = 12) -> np.ndarray:
    """Per image: histogram of the hue of its saturated pixels (the object and clutter, not the background)."""
    mx, mn = x.max(1), x.min(1)
    chroma = np.maximum(mx - mn, 1e-6)
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    hue = np.where(mx == r, ((g - b) / chroma) % 6, np.where(mx == g, (b - r) / chroma + 2, (r - g) / chroma + 4)) / 6
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    weight = sat * (sat > 0.45)
    q = np.minimum((hue * bins).astype(np.int64), bins - 1)
    hist = np.stack([np.bincount(qq.ravel(), weights=ww.ravel(), minlength=bins) for qq, ww in zip(q, weight)])
    return hist / np.maximum(hist.sum(1, keepdims=True), 1e-9)


def test_synthetic_classes_of_a_superclass_look_alike():
    """Class centroids of a simple colour feature: each class's nearest other class is in its own superclass,
    and classes of one superclass are much closer to each other than to the classes of other superclasses."""
    ds = synthetic.load_synthetic(600, 20, 32, seed=0, cache_dir=None)
    hist = _hue_histograms(ds.x_train)
    centroids = np.stack([hist[ds.y_train == c].mean(0) for c in range(20)])
    dist = np.linalg.norm(centroids[:, None] - centroids[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    nearest = dist.argmin(1)
    assert (ds.superclass_of[nearest] == ds.superclass_of).all()
    same = ds.superclass_of[:, None] == ds.superclass_of[None]
    within = dist[same & np.isfinite(dist)].mean()
    between = dist[~same].mean()
    assert within < 0.75 * between
