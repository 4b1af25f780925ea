"""One registry per axis (datasets, models, tasks, evaluators) resolves every `name:` in a spec.

Each is a dict filled by `register` lines; an unknown name is a one-line spec error naming the field and the
registered names; the spec side (names, model spec classes) stays free of torch; the model spec is a union of
one class per family, each taking only its own keys.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from pydantic import ValidationError

from unlearn import batch
from unlearn import spec as spec_mod
from unlearn.data import DATASETS, ImageDataset, load_dataset
from unlearn.data.scenarios import make_splits
from unlearn.errors import SpecError
from unlearn.evaluation import EVALUATORS, ClassificationEvaluator, build_evaluator
from unlearn.models import MODELS, ModelFamily, build_model
from unlearn.spec import (DATASET_KINDS, MODEL_SPECS, CNNSpec, DatasetSpec, DDPMSpec, DiTSpec, ForgetSpec, MLPSpec, Registry,
                          ResNet18Spec)
from unlearn.tasks import TASKS, Task, classification_loss, get_task, loss_for, relabel_for, task_of

JOBS = sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml"))
MINIMAL = {"name": "registries", "dataset": {"name": "digits"}, "model": {"name": "mlp"},
           "forget": {"kind": "class", "classes": [3]}, "methods": [{"name": "ft"}]}


def with_model(**model) -> dict:
    data = copy.deepcopy(MINIMAL)
    data["model"] = model
    return data


# --- the registry itself ----------------------------------------------------------------------------

def test_a_registry_looks_names_up_and_refuses_unknown_ones_naming_the_field_and_the_registered_names():
    colours: Registry[int] = Registry("colour", "paint.colour")
    assert colours.register("red", 1) == 1 and colours.lookup("red") == 1
    colours.register("blue", 2)
    with pytest.raises(SpecError) as unknown:
        colours.lookup("green")
    assert str(unknown.value) == "paint.colour: unknown colour 'green'; registered: 'blue', 'red'"
    assert unknown.value.field == "paint.colour"


def test_registering_a_name_twice_is_refused():
    colours: Registry[int] = Registry("colour", "paint.colour")
    colours.register("red", 1)
    with pytest.raises(ValueError, match="colour 'red' registered twice"):
        colours.register("red", 2)


@pytest.mark.parametrize("registry, field", [(DATASETS, "dataset.name"), (DATASET_KINDS, "dataset.name"),
                                             (MODELS, "model.name"), (MODEL_SPECS, "model.name"),
                                             (TASKS, "task"), (EVALUATORS, "task")])
def test_every_axis_refuses_an_unknown_name_with_one_line_naming_the_field(registry, field):
    with pytest.raises(SpecError) as unknown:
        registry.lookup("nonesuch")
    message = str(unknown.value)
    assert message.startswith(f"{field}: unknown ") and "'nonesuch'" in message and "\n" not in message
    assert all(repr(name) in message for name in registry)


# --- the axes agree with each other -------------------------------------------------------------------

def test_every_dataset_the_spec_accepts_has_a_loader_and_every_model_family_a_builder():
    assert set(DATASETS) == set(DATASET_KINDS)
    assert set(MODELS) == set(MODEL_SPECS)


def test_every_model_family_declares_a_registered_task_and_every_task_has_an_evaluator():
    assert {family.task for family in MODELS.values()} <= set(TASKS)
    assert set(TASKS) == set(EVALUATORS)
    assert all(task.name == name for name, task in TASKS.items())


def test_the_model_spec_is_the_union_of_the_registered_family_classes():
    from unlearn.spec import CausalLMSpec

    assert MODEL_SPECS == {"mlp": MLPSpec, "cnn": CNNSpec, "resnet18": ResNet18Spec, "ddpm": DDPMSpec, "dit": DiTSpec,
                           "causal_lm": CausalLMSpec}
    for name, cls in MODEL_SPECS.items():
        assert cls.model_fields["name"].default == name


# --- tasks ----------------------------------------------------------------------------------------------

def test_a_task_bundles_its_loss_relabelling_and_evaluator_and_is_frozen():
    from unlearn.models.ddpm import diffusion_loss, pseudo_label_loss

    classification, diffusion = get_task("classification"), get_task("diffusion")
    assert (classification.loss, classification.relabel) == (classification_loss, None)
    assert (diffusion.loss, diffusion.relabel) == (diffusion_loss, pseudo_label_loss)
    assert loss_for("diffusion") is diffusion_loss and relabel_for("diffusion") is pseudo_label_loss
    with pytest.raises(dataclasses.FrozenInstanceError):
        classification.loss = diffusion_loss  # type: ignore[misc]


def test_task_of_reads_the_task_each_model_family_declares(monkeypatch):
    assert {name: task_of(name) for name in MODELS} == {"mlp": "classification", "cnn": "classification",
                                                        "resnet18": "classification", "ddpm": "diffusion",
                                                        "dit": "diffusion", "causal_lm": "language_modelling"}
    monkeypatch.setitem(MODELS, "toy_lm", ModelFamily(build=lambda spec, n, shape: torch.nn.Identity(),
                                                      task="language_modelling"))
    assert task_of("toy_lm") == "language_modelling"
    with pytest.raises(SpecError, match="^model.name: unknown model 'vit'"):
        task_of("vit")


def test_the_classification_task_judges_with_the_job_spec_settings():
    ds = _tiny_dataset()
    splits = make_splits(ds, ForgetSpec(kind="class", classes=[1]), 0)
    spec = spec_mod.validate({**MINIMAL, "seed": 7, "eval": {"mia": False}})
    evaluator = get_task("classification").evaluator(splits, spec, ds)
    assert isinstance(evaluator, ClassificationEvaluator) and (evaluator.mia, evaluator.seed) == (False, 7)
    metrics, _ = evaluator.evaluate(build_model(MLPSpec(hidden=[4]), splits.num_outputs, ds.input_shape))
    assert set(metrics) == {"FA", "RA", "TA"}


def test_build_evaluator_uses_the_evaluator_registered_under_the_task(monkeypatch):
    asked = []

    def factory(splits, spec, dataset):
        asked.append(spec)
        return "an evaluator"

    monkeypatch.setitem(EVALUATORS, "classification", factory)
    assert build_evaluator("classification", None, "first", None) == "an evaluator"
    assert Task("classification", classification_loss, None).evaluator(None, "second", None) == "an evaluator"
    assert asked == ["first", "second"]


# --- models ---------------------------------------------------------------------------------------------

def test_each_family_is_built_from_its_own_spec_fields():
    mlp = build_model(MLPSpec(hidden=[7, 5]), 3, (1, 4, 4))
    assert [m.out_features for m in mlp.modules() if isinstance(m, torch.nn.Linear)] == [7, 5, 3]
    cnn = build_model(CNNSpec(channels=[4, 6]), 3, (1, 8, 8))
    assert [m.out_channels for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)] == [4, 6]
    resnet = build_model(ResNet18Spec(), 3, (1, 8, 8))
    assert resnet(torch.zeros(2, 1, 8, 8)).shape == (2, 3)
    ddpm = build_model(DDPMSpec(channels=[8, 16], train_timesteps=20), 3, (1, 8, 8))
    assert ddpm.unet.config.block_out_channels == (8, 16) and ddpm.scheduler.config.num_train_timesteps == 20


def test_build_model_dispatches_through_the_registry(monkeypatch):
    built = torch.nn.Linear(2, 2)
    monkeypatch.setitem(MODELS, "mlp", ModelFamily(build=lambda spec, n, shape: built, task="classification"))
    assert build_model(MLPSpec(), 2, (1, 2, 2)) is built


# --- datasets -------------------------------------------------------------------------------------------

def _tiny_dataset() -> ImageDataset:
    rng = np.random.default_rng(0)
    return ImageDataset(name="tiny", x_train=rng.random((12, 1, 4, 4), dtype=np.float32), y_train=np.arange(12) % 3,
                        x_test=rng.random((6, 1, 4, 4), dtype=np.float32), y_test=np.arange(6) % 3,
                        class_names=["a", "b", "c"], superclass_of=[0, 0, 1], superclass_names=["ab", "c"])


def test_load_dataset_calls_the_loader_registered_under_the_name_and_resizes(monkeypatch, tmp_path):
    calls = []

    def loader(spec: DatasetSpec, seed: int, cache: Path) -> ImageDataset:
        calls.append((spec.name, seed, cache))
        return _tiny_dataset()

    monkeypatch.setitem(DATASETS, "digits", loader)
    ds = load_dataset(DatasetSpec(name="digits", resize=8), seed=5, cache_dir=str(tmp_path))
    assert calls == [("digits", 5, tmp_path)] and ds.input_shape == (1, 8, 8)


def test_a_dataset_that_reads_files_needs_a_root():
    with pytest.raises(ValidationError, match="dataset.root is required for dataset 'parquet'"):
        DatasetSpec(name="parquet")
    assert DatasetSpec(name="parquet", root="rows.parquet").root == "rows.parquet"


# --- the spec -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, line", [
    ({"name": "vit"}, "model.name: unknown model 'vit'; registered: 'causal_lm', 'cnn', 'ddpm', 'dit', 'mlp', 'resnet18'"),
    ({"hidden": [8]}, "model.name: required; registered: 'causal_lm', 'cnn', 'ddpm', 'dit', 'mlp', 'resnet18'"),
    ({"name": "cnn", "hidden": [8]}, "model.hidden: unknown key; cnn takes: channels, dropout"),
    ({"name": "mlp", "layers_per_block": 2}, "model.layers_per_block: unknown key; mlp takes: hidden, dropout"),
    ({"name": "resnet18", "dropout": 0.1}, "model.dropout: unknown key; resnet18 takes: only name"),
    ({"name": "ddpm", "sample_steps": 2}, "model.sample_steps: Input should be greater than or equal to 5 (got 2)"),
])
def test_a_bad_model_section_is_one_line_naming_the_field(model, line):
    with pytest.raises(SpecError) as bad:
        spec_mod.validate(with_model(**model))
    assert str(bad.value) == line


def test_the_model_section_becomes_its_family_class_and_round_trips_through_yaml():
    job = spec_mod.validate(with_model(name="ddpm", channels=[16, 32], guidance_scale=2.0))
    assert isinstance(job.model, DDPMSpec) and job.model.channels == [16, 32] and job.model.cond_dropout == 0.1
    dumped = yaml.safe_load(spec_mod.dump(job))
    assert "hidden" not in dumped["model"] and spec_mod.validate(dumped) == job


def test_an_unknown_dataset_is_one_line_naming_the_field():
    data = {**MINIMAL, "dataset": {"name": "mnist"}}
    with pytest.raises(SpecError) as bad:
        spec_mod.validate(data)
    assert str(bad.value) == ("dataset.name: unknown dataset 'mnist'; "
                              "registered: 'cifar10', 'cifar100', 'digits', 'facts', 'imagefolder', 'parquet', 'synthetic'")


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_every_job_file_validates(path):
    job = spec_mod.load(path)
    assert isinstance(job.model, MODEL_SPECS[job.model.name]) and job.dataset.name in DATASET_KINDS


def test_the_spec_and_its_registries_load_without_torch_or_ray():
    probe = ("import sys, unlearn.spec as s; s.validate(" + repr(MINIMAL) + "); "
             "print(sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_methods_base_still_exports_the_batch_types():
    from unlearn.methods import base

    assert (base.Batch, base.LossFn, base.RelabelFn) == (batch.Batch, batch.LossFn, batch.RelabelFn)
