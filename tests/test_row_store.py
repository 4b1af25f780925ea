"""The Parquet row store: exact round trips, reads of a few rows, cache keys, and the driver's memory."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import unlearn.data
from unlearn.data import load_dataset, synthetic
from unlearn.data.base import ImageDataset
from unlearn.data.store import RowStore, build_store, open_store, store_key
from unlearn.spec import DatasetSpec

SMALL_SYNTHETIC = DatasetSpec(name="synthetic", num_train=200, num_test=60, image_size=16)
BIG_SYNTHETIC = DatasetSpec(name="synthetic", num_train=20_000, num_test=20, image_size=32)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype == np.float32 and a.shape == b.shape
            and np.array_equal(a.view(np.uint32), b.view(np.uint32)))


def _assert_matches(store: RowStore, ds: ImageDataset) -> None:
    """The store holds exactly the loader's dataset."""
    assert store.name == ds.name
    assert store.class_names == ds.class_names and store.superclass_names == ds.superclass_names
    assert store.superclass_of.dtype == np.int64 and np.array_equal(store.superclass_of, ds.superclass_of)
    assert (store.num_classes, store.num_superclasses, store.input_shape) == \
        (ds.num_classes, ds.num_superclasses, ds.input_shape)
    assert [store.classes_of(s) for s in range(store.num_superclasses)] == \
        [ds.classes_of(s) for s in range(ds.num_superclasses)]
    for part, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        assert store.num_rows(part) == len(y)
        assert store.labels(part).dtype == np.int64 and np.array_equal(store.labels(part), y)
        assert _same_bits(store.read(part, np.arange(len(y))), x)


def _rchar() -> int:
    """Bytes this process has read through read() calls so far (Linux)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("store-cache")


@pytest.fixture(scope="module")
def digits_store(cache) -> RowStore:
    return open_store(DatasetSpec(name="digits"), 3, cache)


@pytest.fixture(scope="module")
def small_store(cache) -> RowStore:
    return open_store(SMALL_SYNTHETIC, 3, cache)


@pytest.fixture(scope="module")
def big_store(cache) -> RowStore:
    return open_store(BIG_SYNTHETIC, 0, cache)


# ----------------------------------------------------------------------------------------------------
# round trips


def test_digits_round_trip_is_exact_and_stored_as_float32(digits_store, cache):
    _assert_matches(digits_store, load_dataset(DatasetSpec(name="digits"), 3, cache))
    meta = json.loads((digits_store.folder / "meta.json").read_text())
    assert meta["dtype"] == "float32"  # k/16 pixels are not 8-bit values
    assert (meta["num_train"], meta["num_test"], meta["input_shape"], meta["format"]) == (1347, 450, [1, 8, 8], 1)


def test_synthetic_round_trip_is_exact_and_stored_as_uint8(small_store, tmp_path):
    _assert_matches(small_store, load_dataset(SMALL_SYNTHETIC, 3, tmp_path))
    assert json.loads((small_store.folder / "meta.json").read_text())["dtype"] == "uint8"
    column = pq.ParquetFile(small_store.folder / "train.parquet").schema_arrow.field("x").type
    assert column == pa.list_(pa.field("item", pa.uint8(), nullable=False), 3 * 16 * 16)


def test_resized_dataset_round_trip(tmp_path):
    spec = DatasetSpec(name="synthetic", num_train=40, num_test=20, image_size=8, resize=12)
    store = open_store(spec, 1, tmp_path)
    _assert_matches(store, load_dataset(spec, 1, tmp_path))
    assert json.loads((store.folder / "meta.json").read_text())["dtype"] == "float32"


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _parquet_sources(root: Path) -> dict[str, DatasetSpec]:
    """Three of the parquet loader's layouts, 60 rows of 6 x 6 images each."""
    rng = np.random.default_rng(7)
    n = 60
    labels = np.array(["cat", "dog", "eel", "fox"])[np.arange(n) % 4]
    kinds = np.array(["mammal", "mammal", "fish", "mammal"])[np.arange(n) % 4]

    # train.parquet + test.parquet, flat uint8 C x H x W lists with height / width / channels columns
    flat = root / "flat"
    flat.mkdir()
    x = rng.integers(0, 256, (n, 3 * 6 * 6), dtype=np.uint8)
    for part, sl in (("train", slice(0, 45)), ("test", slice(45, n))):
        m = len(labels[sl])
        pq.write_table(pa.table({"pixels": pa.array(list(x[sl]), type=pa.list_(pa.uint8())),
                                 "label": labels[sl], "kind": kinds[sl],
                                 "channels": np.full(m, 3), "height": np.full(m, 6), "width": np.full(m, 6)}),
                       flat / f"{part}.parquet")

    # one file of PNG bytes (Hugging Face's {bytes, path} struct), no split column: split by seed
    grey = rng.integers(0, 256, (n, 6, 6), dtype=np.uint8)
    images = pa.array([{"bytes": _png(g), "path": None} for g in grey],
                      type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": images, "label": np.arange(n) % 3}), root / "pngs.parquet")

    # a folder of two files with a split column, nested H x W x C float lists in [0, 1]
    nested = root / "nested"
    nested.mkdir()
    xf = rng.random((n, 6, 6, 3), dtype=np.float32)
    split = np.where(np.arange(n) % 5 == 0, "test", "train")
    for i, sl in enumerate((slice(0, 30), slice(30, n))):
        pq.write_table(pa.table({"image": [a.tolist() for a in xf[sl]], "label": np.arange(n)[sl] % 4,
                                 "split": split[sl]}), nested / f"part{i}.parquet")

    return {"flat": DatasetSpec(name="parquet", root=str(flat), image_column="pixels", superclass_column="kind"),
            "pngs": DatasetSpec(name="parquet", root=str(root / "pngs.parquet")),
            "nested": DatasetSpec(name="parquet", root=str(nested))}


def test_parquet_round_trips_and_keys(tmp_path):
    specs = _parquet_sources(tmp_path)
    for layout, spec in specs.items():
        store = open_store(spec, 5, tmp_path / "cache")
        _assert_matches(store, load_dataset(spec, 5, tmp_path / "cache"))
        dtype = json.loads((store.folder / "meta.json").read_text())["dtype"]
        assert dtype == ("float32" if layout == "nested" else "uint8"), layout
    # the seed matters only where the loader splits by it
    assert store_key(specs["pngs"], 5) != store_key(specs["pngs"], 6)
    assert store_key(specs["flat"], 5) == store_key(specs["flat"], 6)
    assert store_key(specs["nested"], 5) == store_key(specs["nested"], 6)
    assert store_key(specs["pngs"], 5) != store_key(specs["pngs"].model_copy(update={"test_fraction": 0.5}), 5)
    assert store_key(specs["flat"], 5) != store_key(specs["flat"].model_copy(update={"superclass_column": None}), 5)


def test_editing_a_parquet_source_invalidates_the_store(tmp_path):
    spec = _parquet_sources(tmp_path)["flat"]
    first = open_store(spec, 0, tmp_path / "cache")
    before = store_key(spec, 0)
    path = Path(spec.root) / "test.parquet"
    table = pq.read_table(path)
    pixels = [[255 - v for v in row] for row in table.column("pixels").to_pylist()]  # same size, new content
    pq.write_table(table.set_column(0, "pixels", pa.array(pixels, type=pa.list_(pa.uint8()))), path)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime file systems: a visible change
    assert store_key(spec, 0) != before
    second = open_store(spec, 0, tmp_path / "cache")
    assert second.folder != first.folder
    _assert_matches(second, load_dataset(spec, 0, tmp_path / "cache"))


def _cifar10_folder(root: Path) -> Path:
    import pickle as pkl

    from unlearn.data.cifar import CIFAR10_CLASSES

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pkl.dump({"labels": [int(v) for v in rng.integers(0, 10, 3)],
                      "data": rng.integers(0, 256, (3, 3072), dtype=np.uint8)}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pkl.dump({"label_names": CIFAR10_CLASSES}, fh)
    return folder


def test_cifar_round_trip_and_key(tmp_path):
    _cifar10_folder(tmp_path / "src")
    spec = DatasetSpec(name="cifar10", root=str(tmp_path / "src"))
    store = open_store(spec, 0, tmp_path / "cache")
    _assert_matches(store, load_dataset(spec, 0, tmp_path / "cache"))
    assert store_key(spec, 0) == store_key(spec, 1)  # official split: no seed
    assert store_key(spec, 0) == store_key(spec.model_copy(update={"test_fraction": 0.5}), 0)
    assert store.folder.name == f"store-{store_key(spec, 0)}"
    batch = tmp_path / "src" / "cifar-10-batches-py" / "data_batch_3"
    st = batch.stat()
    os.utime(batch, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: maybe edited
    assert store.folder.name != f"store-{store_key(spec, 0)}"


def test_key_rules_for_generated_and_bundled_data():
    digits, synth = DatasetSpec(name="digits"), SMALL_SYNTHETIC
    assert store_key(digits, 0) != store_key(digits, 1)  # stratified split by seed
    assert store_key(digits, 0) != store_key(digits.model_copy(update={"test_fraction": 0.3}), 0)
    assert store_key(digits, 0) == store_key(digits.model_copy(update={"num_train": 50, "image_size": 8}), 0)
    assert store_key(digits, 0) != store_key(digits.model_copy(update={"resize": 16}), 0)
    assert store_key(synth, 0) != store_key(synth, 1)  # both parts generated from the seed
    assert store_key(synth, 0) != store_key(synth.model_copy(update={"image_size": 24}), 0)
    assert store_key(synth, 0) == store_key(synth.model_copy(update={"test_fraction": 0.4}), 0)


# ----------------------------------------------------------------------------------------------------
# reading rows


def test_read_returns_the_rows_asked_for_in_order_with_duplicates(big_store, small_store, tmp_path):
    ds = load_dataset(SMALL_SYNTHETIC, 3, tmp_path)
    rng = np.random.default_rng(0)
    rows = np.concatenate([rng.permutation(200)[:50], [7, 7, 199, 0, 7]])
    assert _same_bits(small_store.read("train", rows), ds.x_train[rows])
    assert _same_bits(small_store.read("test", [59, 0, 59]), ds.x_test[[59, 0, 59]])
    assert small_store.read("train", np.array([], dtype=np.int64)).shape == (0, 3, 16, 16)
    # across row groups of the 20k store: the same pixels as reading everything and indexing
    rows = np.concatenate([rng.integers(0, 20_000, 300), [19_999, 0, 19_999]])
    everything = big_store.read("train", np.arange(20_000))
    assert _same_bits(big_store.read("train", rows), everything[rows])
    with pytest.raises(IndexError):
        small_store.read("train", [200])
    with pytest.raises(IndexError):
        small_store.read("train", [-1])
    with pytest.raises(ValueError):
        small_store.read("val", [0])


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_labels_and_reads_touch_only_what_they_need(big_store):
    path = big_store.folder / "train.parquet"
    meta = pq.ParquetFile(path).metadata
    x_bytes = sum(meta.row_group(g).column(2).total_compressed_size for g in range(meta.num_row_groups))
    group_bytes = max(meta.row_group(g).column(2).total_compressed_size for g in range(meta.num_row_groups))
    assert meta.num_row_groups >= 10 and meta.row_group(0).column(2).has_dictionary_page

    fresh = RowStore(big_store.folder)
    start = _rchar()
    y = fresh.labels("train")
    label_read = _rchar() - start
    assert len(y) == 20_000 and label_read < x_bytes / 50  # no pixels read
    assert fresh.labels("train") is y  # cached

    start = _rchar()
    fresh.read("train", [5, 3, 5, 1])  # all in the first group
    assert _rchar() - start < 1.5 * group_bytes
    start = _rchar()
    fresh.read("train", [0, 19_999])  # first and last groups
    assert _rchar() - start < 2.5 * group_bytes


def test_driver_memory_stays_far_below_the_image_array(big_store, small_store):
    """Labels of 20,000 images plus 500 of their images: the peak RSS grows by far less than the
    245 MB float32 array (measured in a fresh process; a tiny store is read first so that loading
    pyarrow's libraries does not count)."""
    script = (
        "import resource, sys, numpy as np, pyarrow as pa\n"
        "from unlearn.data.store import RowStore\n"
        "warm = RowStore(sys.argv[2]); warm.labels('train'); warm.read('train', [0, 1])\n"
        "store = RowStore(sys.argv[1])\n"
        "before, pool = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, pa.total_allocated_bytes()\n"
        "y = store.labels('train')\n"
        "x = store.read('train', np.random.default_rng(0).choice(len(y), 500, replace=False))\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) * 1024, pa.default_memory_pool().max_memory() - pool, x.nbytes)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    out = subprocess.run([sys.executable, "-c", script, str(big_store.folder), str(small_store.folder)],
                         capture_output=True, text=True, env=env, timeout=60, check=True).stdout
    rss_growth, arrow_peak, x_bytes = (int(v) for v in out.split())
    full = 20_000 * 3 * 32 * 32 * 4
    assert x_bytes == 500 * 3 * 32 * 32 * 4
    assert rss_growth < full / 4, f"peak RSS grew {rss_growth / 2**20:.0f} MB"
    assert arrow_peak < full / 10, f"pyarrow peaked at {arrow_peak / 2**20:.0f} MB"


# ----------------------------------------------------------------------------------------------------
# cache, pickling, concurrent builders


def test_second_open_is_a_cache_hit_without_loader_or_images(digits_store, small_store, cache, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a cache hit must not load data")

    monkeypatch.setattr(unlearn.data, "load_dataset", refuse)
    monkeypatch.setattr(synthetic, "generate", refuse)
    monkeypatch.setattr(pq, "ParquetFile", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    again = open_store(DatasetSpec(name="digits"), 3, cache)
    assert again.folder == digits_store.folder and again.class_names == digits_store.class_names
    again = open_store(SMALL_SYNTHETIC, 3, cache)
    assert again.folder == small_store.folder and again.input_shape == (3, 16, 16)


def test_pickled_store_is_small_and_carries_no_data(big_store):
    big_store.labels("train")
    big_store.read("train", np.arange(100))
    blob = pickle.dumps(big_store)
    assert len(blob) < 10_000
    clone = pickle.loads(blob)
    assert clone.folder == big_store.folder and clone.name == "synthetic"
    assert _same_bits(clone.read("train", [3, 2_500]), big_store.read("train", [3, 2_500]))
    assert np.array_equal(clone.labels("train"), big_store.labels("train"))


def test_concurrent_builders_of_one_store_do_not_collide(tmp_path):
    ds = load_dataset(DatasetSpec(name="digits"), 0, tmp_path)
    folder = tmp_path / "data" / "store-same"
    results, errors = [], []

    def build():
        try:
            results.append(build_store(ds, folder))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 3
    for store in results:
        _assert_matches(store, ds)
    assert [p.name for p in folder.parent.iterdir()] == ["store-same"]  # no temporary folders left


def test_a_damaged_store_is_rebuilt(tmp_path):
    store = open_store(SMALL_SYNTHETIC, 4, tmp_path)
    (store.folder / "train.parquet").unlink()
    rebuilt = open_store(SMALL_SYNTHETIC, 4, tmp_path)
    assert rebuilt.folder == store.folder
    _assert_matches(rebuilt, load_dataset(SMALL_SYNTHETIC, 4, tmp_path))


def test_8bit_detection_is_exact(tmp_path):
    rng = np.random.default_rng(1)
    x = (rng.integers(0, 256, (30, 1, 4, 4)).astype(np.float32) / np.float32(255.0))
    y = np.arange(30) % 3

    def dataset(images):
        return ImageDataset("t", images[:20], y[:20], images[20:], y[20:], ["a", "b", "c"], [0, 0, 1], ["s", "t"])

    nudged = x.copy()
    nudged[25, 0, 1, 2] = np.nextafter(nudged[25, 0, 1, 2], np.float32(2))  # off the k/255 grid by one ulp
    for name, images, dtype in (("grid", x, "uint8"), ("nudged", nudged, "float32")):
        store = build_store(dataset(images), tmp_path / name)
        assert json.loads((store.folder / "meta.json").read_text())["dtype"] == dtype
        _assert_matches(store, dataset(images))


def test_a_dataset_registered_later_is_keyed_on_everything(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.bin").write_bytes(b"123")
    spec = DatasetSpec.model_construct(name="toy", root=str(tmp_path / "src"))  # a name this module never saw
    key = store_key(spec, 0)
    assert key != store_key(spec, 1)
    assert key != store_key(DatasetSpec.model_construct(name="toy", root=str(tmp_path / "src"), num_train=99), 0)
    (tmp_path / "src" / "b.bin").write_bytes(b"4")
    assert key != store_key(spec, 0)


def test_a_store_opened_from_a_relative_cache_dir_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """Ray Train runs workers in another working directory: the store they are handed must not be relative."""
    monkeypatch.chdir(tmp_path)
    store = open_store(DatasetSpec(name="digits"), 3, ".cache/unlearn")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    shipped = pickle.loads(pickle.dumps(store))
    assert shipped.path("train").is_absolute() and shipped.num_rows("train") == store.num_rows("train") > 0
    assert len(pq.read_table(shipped.path("train"), columns=["row"])) == store.num_rows("train")
