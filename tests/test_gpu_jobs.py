"""GPU jobs that need local files this machine does not have: run where a GPU and the folders are given."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not (os.environ.get("UNLEARN_DDPM_CIFAR10") and os.environ.get("UNLEARN_CIFAR10_ROOT")),
                    reason="set UNLEARN_DDPM_CIFAR10 (a class-conditional diffusers DDPM folder) and UNLEARN_CIFAR10_ROOT")
def test_sfr_on_forgets_cat_of_a_pretrained_cifar10_ddpm(tmp_path):
    from unlearn import spec as spec_mod
    from unlearn.job import run_job

    spec = spec_mod.load(ROOT / "jobs" / "ddpm-cifar10-pretrained.yaml", [
        f"model.path={os.environ['UNLEARN_DDPM_CIFAR10']}", f"dataset.root={os.environ['UNLEARN_CIFAR10_ROOT']}",
        "methods=[{name: sfr_on, params: {optimizer: adam, lr: 1.0e-4, weight_decay: 0.0, clip_grad: 1.0, steps: 150, "
        "batch_size: 128, forget_every: 1, forget_weight: 10.0, lam: 0.5, gamma: 1.0}}]",
        f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false"])
    methods = run_job(spec, tmp_path / "out", progress="quiet")["methods"]
    assert methods["original"]["FA"] >= 50 and methods["sfr_on"]["FA"] <= 10
    assert methods["sfr_on"]["FD"] <= 1.5 * methods["original"]["FD"]


DIT_IMAGENET_ENV = ("UNLEARN_DIT_IMAGENET", "UNLEARN_IMAGENET_ROOT", "UNLEARN_IMAGENET_CLASS_INDEX",
                    "UNLEARN_RESNET50_WEIGHTS")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not all(os.environ.get(k) for k in DIT_IMAGENET_ENV),
                    reason="set UNLEARN_DIT_IMAGENET (a DiT-XL-2-256 diffusers pipeline folder), "
                           "UNLEARN_IMAGENET_ROOT (an ImageFolder of ImageNet synsets with n02099601), "
                           "UNLEARN_IMAGENET_CLASS_INDEX (ImageNet's class index JSON) and UNLEARN_RESNET50_WEIGHTS "
                           "(a torchvision resnet50 state dict)")
def test_sfr_on_forgets_golden_retriever_of_a_pretrained_imagenet_dit(tmp_path):
    from unlearn import spec as spec_mod
    from unlearn.job import run_job

    spec = spec_mod.load(ROOT / "jobs" / "dit-imagenet-pretrained.yaml", [
        f"model.path={os.environ['UNLEARN_DIT_IMAGENET']}", f"dataset.root={os.environ['UNLEARN_IMAGENET_ROOT']}",
        f"dataset.class_index={os.environ['UNLEARN_IMAGENET_CLASS_INDEX']}",
        f"eval.judge.weights={os.environ['UNLEARN_RESNET50_WEIGHTS']}",
        "methods=[{name: sfr_on, params: {optimizer: adamw, lr: 1.0e-4, weight_decay: 0.0, clip_grad: 1.0, steps: 600, "
        "batch_size: 32, forget_every: 1, forget_weight: 10.0, lam: 0.5, gamma: 1.0}}]",
        "eval.samples_per_class=20", f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false"])
    methods = run_job(spec, tmp_path / "out", progress="quiet")["methods"]
    # The pretrained DiT draws golden retrievers the ImageNet judge recognises; SFR-on stops that and keeps the rest.
    assert methods["original"]["FA"] >= 50 and methods["sfr_on"]["FA"] <= 20
    assert methods["sfr_on"]["CA"] >= methods["original"]["CA"] - 15
    assert methods["sfr_on"]["FD"] <= 1.5 * methods["original"]["FD"]


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not os.environ.get("UNLEARN_LLAMA_1B"),
                    reason="set UNLEARN_LLAMA_1B (a local Llama-3.2-1B folder: config, weights, tokenizer)")
def test_npo_and_grogu_unlearn_facts_on_a_1b_llama_with_fsdp_and_lora(tmp_path):
    from unlearn import spec as spec_mod
    from unlearn.job import run_job

    spec = spec_mod.load(ROOT / "jobs" / "llm-llama-1b.yaml", [
        f"model.path={os.environ['UNLEARN_LLAMA_1B']}", f"ray.num_workers={max(1, torch.cuda.device_count())}",
        f"cache_dir={tmp_path / 'cache'}", "tracking.enabled=false"])
    methods = run_job(spec, tmp_path / "out", progress="quiet")["methods"]
    # The fine-tuned original knows its facts; retrain never saw the forget people; the methods move towards it.
    assert methods["original"]["forget_ROUGE"] >= 0.9 and methods["original"]["forget_quality"] <= 0.01
    assert methods["retrain"]["forget_ROUGE"] <= 0.5
    for name in ("npo", "grogu"):
        assert methods[name]["forget_ROUGE"] < methods["original"]["forget_ROUGE"]
        assert methods[name]["model_utility"] >= 0.5 * methods["retrain"]["model_utility"]
