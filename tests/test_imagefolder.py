"""The `imagefolder` dataset (class folders of local images), diffusion judges from local torchvision weights
(`eval.judge`), and a tiny DiT job on a tiny ImageFolder judged by one.

Every image is a few-pixel PNG written here with PIL; every judge a randomly initialised torchvision state dict
saved here (nothing is downloaded). The class-index tests map three folders to ids 2, 5 and 7 of 10 classes, the
way an ImageNet subset keeps its ids under a 1000-class model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from unlearn.data import imagefolder, load_dataset
from unlearn.data.scenarios import make_splits
from unlearn.errors import BadInput, SpecError
from unlearn.spec import DatasetSpec, ForgetSpec, JudgeSpec

SUBSET_IDS = {"cat": 2, "fox": 5, "dog": 7}  # three folders kept at their ids among 10 classes


def write_images(folder: Path, count: int, size: tuple[int, int] = (12, 10), seed: int = 0) -> list[Path]:
    """`count` random RGB PNGs of size (width, height) in `folder`."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def write_folder(root: Path, classes=("cat", "dog", "fox"), per_class: int = 4) -> Path:
    for k, name in enumerate(classes):
        write_images(root / name, per_class, seed=k)
    return root


def spec(root: Path, **fields) -> DatasetSpec:
    return DatasetSpec(name="imagefolder", root=str(root), image_size=fields.pop("image_size", 8), **fields)


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# --- the dataset -----------------------------------------------------------------------------------------


def test_sorted_folder_names_are_the_class_ids_split_stratified_by_class(tmp_path):
    ds = load_dataset(spec(write_folder(tmp_path / "data"), test_fraction=0.25), seed=0, cache_dir=tmp_path)
    assert ds.class_names == ["cat", "dog", "fox"] and ds.num_classes == 3
    assert np.bincount(ds.y_train).tolist() == [3, 3, 3] and np.bincount(ds.y_test).tolist() == [1, 1, 1]
    assert ds.x_train.shape == (9, 3, 8, 8) and ds.x_train.dtype == np.float32
    assert 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    assert ds.superclass_of.tolist() == [0, 1, 2] and ds.superclass_names == ds.class_names
    again = load_dataset(spec(tmp_path / "data", test_fraction=0.25), seed=0, cache_dir=tmp_path)
    assert np.array_equal(again.x_test, ds.x_test)  # deterministic from the seed


def test_images_are_resized_on_the_shorter_side_and_center_cropped_as_adm_does(tmp_path):
    """A 48x16 image of red | green | blue thirds at size 8: halved to 24x8 (box), then the center 8 columns:
    pure green. A grey image becomes three equal channels."""
    root = tmp_path / "data"
    stripes = np.zeros((16, 48, 3), dtype=np.uint8)
    stripes[:, :16, 0], stripes[:, 16:32, 1], stripes[:, 32:, 2] = 255, 255, 255
    (root / "a").mkdir(parents=True)
    Image.fromarray(stripes).save(root / "a" / "stripes.png")
    Image.fromarray(stripes).save(root / "a" / "stripes2.PNG")  # extensions in any case, as ImageFolder
    (root / "b").mkdir()
    Image.fromarray(np.full((30, 20), 128, dtype=np.uint8), mode="L").save(root / "b" / "grey.png")
    Image.fromarray(np.full((30, 20), 128, dtype=np.uint8), mode="L").save(root / "b" / "grey2.jpg")
    ds = load_dataset(spec(root, test_fraction=0.5), seed=0, cache_dir=tmp_path)
    x = np.concatenate([ds.x_train, ds.x_test])
    y = np.concatenate([ds.y_train, ds.y_test])
    assert x.shape == (4, 3, 8, 8)
    green = x[y == 0]
    assert np.all(green[:, 1] == 1.0) and np.all(green[:, [0, 2]] == 0.0)
    grey = x[y == 1]
    assert np.allclose(grey[:, 0], grey[:, 1]) and np.allclose(grey[:, 1], grey[:, 2])
    assert np.allclose(grey[0], 128 / 255)  # the PNG exactly (the JPEG is lossy)


def test_a_train_and_val_layout_gives_the_official_parts(tmp_path):
    root = tmp_path / "data"
    for name, k in (("cat", 0), ("dog", 1)):
        write_images(root / "train" / name, 3, seed=k)
        write_images(root / "val" / name, 2, seed=10 + k)
    (root / "val" / "fox").mkdir()  # a class with no images: a class all the same
    write_images(root / "val" / "fox", 1, seed=20)
    ds = load_dataset(spec(root), seed=0, cache_dir=tmp_path)
    assert ds.class_names == ["cat", "dog", "fox"]
    assert ds.y_train.tolist() == [0, 0, 0, 1, 1, 1] and ds.y_test.tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("index", [
    {"cat": 2, "fox": 5, "dog": 7, "owl": 9},
    {"2": ["cat", "tabby"], "5": ["fox", "red_fox"], "7": ["dog", "golden_retriever"], "9": ["owl", "great_owl"]},
], ids=["folder-to-id", "keras"])
def test_a_class_index_keeps_the_ids_of_a_subset_of_folders(tmp_path, index):
    root = write_folder(tmp_path / "data")
    (tmp_path / "index.json").write_text(json.dumps(index))
    ds = load_dataset(spec(root, class_index=str(tmp_path / "index.json")), seed=0, cache_dir=tmp_path)
    assert ds.num_classes == 10  # the largest id + 1: owl (9) has no folder, yet is a class
    assert sorted(set(ds.y_train.tolist())) == [2, 5, 7] and sorted(set(ds.y_test.tolist())) == [2, 5, 7]
    names = {"cat": "tabby", "dog": "golden_retriever"} if "2" in index else {"cat": "cat", "dog": "dog"}
    assert ds.class_names[2] == names["cat"] and ds.class_names[7] == names["dog"] and ds.class_names[0] == "0"
    wider = load_dataset(spec(root, class_index=str(tmp_path / "index.json"), num_classes=1000), seed=0,
                         cache_dir=tmp_path)
    assert wider.num_classes == 1000 and np.array_equal(wider.y_train, ds.y_train)


def test_a_forget_class_without_training_images_is_one_line(tmp_path):
    root = write_folder(tmp_path / "data")
    (tmp_path / "index.json").write_text(json.dumps(SUBSET_IDS))
    ds = load_dataset(spec(root, class_index=str(tmp_path / "index.json"), num_classes=10), 0, tmp_path)
    with pytest.raises(SpecError) as err:
        make_splits(ds, ForgetSpec(kind="class", classes=[7, 3]), seed=0)
    assert one_line(err) == "forget.classes: class 3 has no training images in dataset 'imagefolder:data'"
    splits = make_splits(ds, ForgetSpec(kind="class", classes=[7]), seed=0)
    assert splits.num_outputs == 10 and set(splits.forget.y.tolist()) == {7}


def _garbage_png(root: Path) -> None:
    write_folder(root)
    (root / "dog" / "broken.png").write_bytes(b"not a png")


def _unmapped(root: Path) -> None:
    write_folder(root)
    (root.parent / "index.json").write_text(json.dumps({"cat": 2, "dog": 7}))


def _bad_index(root: Path) -> None:
    write_folder(root)
    (root.parent / "index.json").write_text(json.dumps({"cat": "two"}))


@pytest.mark.parametrize("make, fields, message", [
    (lambda root: None, {}, "imagefolder root not found: "),
    (lambda root: root.mkdir(), {}, "imagefolder: no class folders in "),
    (lambda root: (root / "cat").mkdir(parents=True) or (root / "cat" / "notes.txt").write_text("x"), {},
     "imagefolder: no images (.jpg"),
    (_garbage_png, {}, "imagefolder: unreadable image "),
    (_unmapped, {"class_index": "index.json"}, "dataset.class_index: class folder 'fox' in "),
    (_bad_index, {"class_index": "index.json"}, "dataset.class_index: "),
    (lambda root: write_folder(root), {"class_index": "missing.json"}, "dataset.class_index: file not found: "),
    (lambda root: write_folder(root), {"num_classes": 2}, "dataset.num_classes: 2 is too few, folder 'fox'"),
    (lambda root: (root / "train" / "a").mkdir(parents=True) or (root / "val").mkdir() or
     write_images(root / "train" / "a", 2), {}, "imagefolder: no class folders in "),
], ids=["no-root", "no-class-folders", "no-images", "unreadable-image", "unmapped-folder", "bad-index",
        "index-missing", "too-few-classes", "val-without-class-folders"])
def test_each_bad_input_is_one_line(tmp_path, make, fields, message):
    root = tmp_path / "data"
    make(root)
    fields = {k: (str(tmp_path / v) if k == "class_index" else v) for k, v in fields.items()}
    with pytest.raises(BadInput) as err:
        load_dataset(spec(root, **fields), seed=0, cache_dir=tmp_path)
    assert one_line(err).startswith(message)
    if "unreadable" in message:
        assert "broken.png" in str(err.value)


def test_a_set_too_large_for_memory_is_refused_before_any_image_is_read(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data")
    monkeypatch.setattr(imagefolder, "memory_limit", lambda: 12 * 3 * 8 * 8 * 4 - 1)  # one byte short

    def never(*args):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(imagefolder, "_read", never)
    with pytest.raises(BadInput) as err:
        load_dataset(spec(root), seed=0, cache_dir=tmp_path)
    assert "12 images of 3x8x8" in one_line(err) and "use fewer images per class" in str(err.value)


def test_the_row_store_is_keyed_on_the_files_and_the_class_index(tmp_path):
    from unlearn.data.store import open_store, store_key

    root = write_folder(tmp_path / "data")
    index = tmp_path / "index.json"
    index.write_text(json.dumps(SUBSET_IDS))
    data = spec(root, class_index=str(index), num_classes=10)
    store = open_store(data, 0, tmp_path / "cache")
    assert store._meta["dtype"] == "uint8" and store.num_classes == 10  # k/255 pixels are stored as bytes
    key = store_key(data, 0)
    index.write_text(json.dumps({"cat": 1, "fox": 5, "dog": 7}))
    assert store_key(data, 0) != key
    key = store_key(data, 0)
    write_images(root / "cat", 5, seed=9)
    assert store_key(data, 0) != key


# --- judges from local weights ---------------------------------------------------------------------------


def save_resnet(path: Path, arch: str = "resnet18", num_classes: int = 10) -> Path:
    import torchvision.models as tvm

    torch.manual_seed(0)
    torch.save(getattr(tvm, arch)(weights=None, num_classes=num_classes).state_dict(), path)
    return path


def test_a_local_resnet_judge_predicts_and_gives_penultimate_features(tmp_path):
    from unlearn.evaluation.diffusion import Judge
    from unlearn.evaluation.judges import load_classifier

    weights = save_resnet(tmp_path / "r18.pt")
    model = load_classifier(JudgeSpec(arch="resnet18", weights=str(weights), image_size=32), 10)
    judge = Judge(model, 0.0)
    x = torch.rand(5, 3, 8, 8)
    assert judge.predict(x).shape == (5,) and judge.features(x).shape == (5, 512)
    assert judge.features(torch.rand(3, 1, 8, 8)).shape == (3, 512)  # grey images are repeated to RGB
    with torch.no_grad():  # the head reads exactly the features
        assert torch.allclose(model.head(model.features(x)), model(x))


@pytest.mark.parametrize("make, message", [
    (lambda p: None, "eval.judge.weights: file not found: "),
    (lambda p: p.write_bytes(b"junk"), "eval.judge.weights: cannot read "),
    (lambda p: save_resnet(p, num_classes=5), "classifies 5 classes, the job's model has 10"),
    (lambda p: save_resnet(p, arch="resnet34"), "is not a torchvision resnet18 state dict: 0 keys missing"),
    (lambda p: torch.save({"fc.weight": torch.zeros(10, 512)}, p), "is not a torchvision resnet18 state dict: "),
], ids=["missing", "not-a-state-dict", "other-classes", "other-arch", "partial"])
def test_mismatched_judge_weights_are_one_line(tmp_path, make, message):
    from unlearn.evaluation.judges import load_classifier

    path = tmp_path / "judge.pt"
    make(path)
    with pytest.raises(BadInput) as err:
        load_classifier(JudgeSpec(arch="resnet18", weights=str(path)), 10)
    assert message in one_line(err)


def test_an_unknown_judge_architecture_is_a_spec_error():
    from unlearn import spec as spec_mod

    data = {"name": "j", "dataset": {"name": "digits"}, "model": {"name": "dit"}, "forget": {"kind": "class",
            "classes": [0]}, "methods": [{"name": "ga"}], "eval": {"judge": {"arch": "alexnet", "weights": "w.pt"}}}
    with pytest.raises(SpecError) as err:
        spec_mod.validate(data)
    assert one_line(err).startswith("eval.judge.arch: ")


# --- a tiny DiT job on a tiny ImageFolder, judged by a local resnet18 ----------------------------------------


def tiny_job(tmp_path: Path) -> dict:
    root = write_folder(tmp_path / "data", per_class=8)
    (tmp_path / "index.json").write_text(json.dumps(SUBSET_IDS))
    weights = save_resnet(tmp_path / "judge.pt")
    return {
        "name": "dit-imagefolder-tiny", "seed": 0,
        "dataset": {"name": "imagefolder", "root": str(root), "image_size": 8,
                    "class_index": str(tmp_path / "index.json"), "num_classes": 10, "test_fraction": 0.25},
        "model": {"name": "dit", "layers": 1, "hidden": 32, "heads": 2, "patch": 2, "train_timesteps": 100,
                  "sample_steps": 5, "guidance_scale": 2.0},
        "train": {"epochs": 2, "batch_size": 32, "optimizer": {"name": "adam", "lr": 2e-3, "weight_decay": 0.0}},
        "forget": {"kind": "class", "classes": [7]},
        "methods": [{"name": "sfr_on", "params": {"steps": 3, "batch_size": 8}},
                    {"name": "salun", "params": {"steps": 2, "batch_size": 8}}],
        "eval": {"samples_per_class": 4, "grid_per_class": 2, "judge": {"arch": "resnet18", "weights": str(weights),
                                                                          "image_size": 32}},
        "ray": {"enabled": False}, "tracking": {"enabled": False}, "cache_dir": str(tmp_path / "cache"),
    }


def test_the_evaluator_samples_only_classes_with_images_and_reports_the_judge_accuracy(tmp_path):
    from unlearn.evaluation.diffusion import DiffusionEvaluator
    from unlearn.job import prepare
    from unlearn.models import build_model
    from unlearn.spec import validate

    job = validate(tiny_job(tmp_path))
    prep = prepare(job)
    evaluator = DiffusionEvaluator(prep.splits, job, prep.dataset)
    assert evaluator.classes == [2, 5, 7] and evaluator.kept == [2, 5] and evaluator.forgotten == [7]
    assert 0 <= evaluator.judge.test_accuracy <= 100
    torch.manual_seed(0)
    model = build_model(job.model, 10, (3, 8, 8))
    images, labels = evaluator.generate(model, 2, seed=0)
    assert labels.tolist() == [2, 2, 5, 5, 7, 7] and images.shape == (6, 3, 8, 8)


def test_a_tiny_dit_job_on_an_imagefolder_with_a_local_judge_reports_fa_ca_fd(tmp_path):
    from unlearn.job import run_job
    from unlearn.spec import validate

    methods = run_job(validate(tiny_job(tmp_path)), tmp_path / "out", progress="quiet")["methods"]
    for name in ("original", "sfr_on", "salun"):
        assert "error" not in methods[name], methods[name]
        assert 0 <= methods[name]["FA"] <= 100 and 0 <= methods[name]["CA"] <= 100
        assert np.isfinite(methods[name]["FD"])
    assert (tmp_path / "out" / "grid_sfr_on.png").is_file()
