"""Latent diffusion from a local pipeline folder (`model: {name: dit, path: DIR}` with a `vae/`): a tiny DiT over a
tiny AutoencoderKL's latents, written by diffusers' own `DiTPipeline.save_pretrained` (nothing downloaded).

The images are 3 x 8 x 8 (the synthetic dataset at 8 px, 20 classes); the VAE's two blocks halve them once, so the
transformer denoises 4 x 4 x 4 latents.
"""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn.batch import Batch
from unlearn.errors import BadInput
from unlearn.models import build_model
from unlearn.models.ddpm import diffusion_loss, pseudo_label_loss, sample
from unlearn.spec import DiTSpec

CLASSES, IMAGES, LATENTS = 20, (3, 8, 8), (4, 4, 4)


def _components():
    from diffusers import AutoencoderKL, DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8, scaling_factor=0.5)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                                        num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=CLASSES)
    # DiT-XL-2-256's own scheduler: DDIM over linear betas, never clipping (latents are not in [-1, 1])
    return transformer, vae, DDIMScheduler(num_train_timesteps=100, clip_sample=False)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """(folder, transformer, vae): the full pipeline layout, model_index.json included."""
    from diffusers import DiTPipeline

    transformer, vae, scheduler = _components()
    folder = tmp_path_factory.mktemp("latent") / "dit-pipeline"
    DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler).save_pretrained(folder)
    return folder, transformer.eval(), vae.eval()


def _load(folder: Path, input_shape: tuple[int, ...] = IMAGES) -> torch.nn.Module:
    return build_model(DiTSpec(path=str(folder)), CLASSES, input_shape)


def _images(n: int = 6, seed: int = 3) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.rand(n, *IMAGES, generator=g), torch.arange(n) % CLASSES, torch.arange(n))


def test_the_pipeline_folder_is_a_full_latent_layout_and_reloads_with_identical_outputs(pipeline):
    folder, transformer, vae = pipeline
    index = json.loads((folder / "model_index.json").read_text())
    assert {"transformer", "vae", "scheduler"} <= set(index) and (folder / "vae" / "config.json").is_file()
    model = _load(folder).eval()
    assert model.noise_shape == LATENTS and model.image_shape == IMAGES
    g = torch.Generator().manual_seed(1)
    z, t, y = torch.randn(5, *LATENTS, generator=g), torch.randint(0, 100, (5,), generator=g), torch.arange(5)
    with torch.no_grad():
        assert torch.equal(model(z, t, y), transformer(z, timestep=t, class_labels=y, return_dict=False)[0][:, :4])
        x = _images().x
        assert torch.equal(model.encode(x), vae.encode(x * 2 - 1).latent_dist.mean * 0.5)  # the mean, scaled
        assert torch.equal(model.decode(z), (vae.decode(z / 0.5).sample.clamp(-1, 1) + 1) / 2)
    assert model.scheduler.config.clip_sample is False
    labels = torch.tensor([0, 3, 3, 19])
    first = sample(model, labels, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(2))
    again = sample(_load(folder), labels, steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(2))
    assert first.shape == (4, *IMAGES) and torch.equal(first, again)  # pixels in [0, 1], decoded by the vae
    assert first.min() >= 0 and first.max() <= 1
    # a checkpoint (the state dict) restores the same denoiser into a freshly loaded one
    restored = _load(folder).eval()
    restored.load_state_dict({k: v + 0 for k, v in model.state_dict().items()})
    assert torch.equal(restored(z, t, y), model(z, t, y))


def test_the_vae_is_frozen_outside_parameters_and_state_dict_and_moves_with_the_model(pipeline):
    model = _load(pipeline[0])
    vae = model.latent.vae
    vae_ids = {id(p) for p in vae.parameters()}
    assert vae_ids and not vae_ids & {id(p) for p in model.parameters()}
    assert set(model.state_dict()) == {f"transformer.{k}" for k in model.transformer.state_dict()}
    assert all(not p.requires_grad for p in vae.parameters()) and not vae.training
    model.to(torch.float64)  # .to() reaches the vae (it is no submodule)
    assert next(vae.parameters()).dtype == torch.float64
    model.to(torch.float32)
    original = copy.deepcopy(model)  # the frozen original shares the vae and its latents
    assert original.latent is model.latent
    model.encode(_images().x)
    assert len(pickle.loads(pickle.dumps(model)).latent._cache) == 0  # a pickled model takes no latents along


def test_the_loss_trains_only_the_transformer_and_each_image_is_encoded_once_per_process(pipeline):
    model = _load(pipeline[0]).train()
    latent = model.latent
    counts = lambda: (latent.hits, latent.misses)  # noqa: E731
    start = counts()
    batch = _images(6, seed=11)
    losses = diffusion_loss(model, batch)
    assert losses.shape == (6,) and torch.isfinite(losses).all()
    losses.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in latent.vae.parameters())
    assert counts() == (start[0], start[1] + 6)
    relabelled = pseudo_label_loss(model, batch, torch.full((6,), 5))  # the same images: from the cache
    assert relabelled.shape == (6,) and torch.isfinite(relabelled).all()
    assert counts() == (start[0] + 6, start[1] + 6)
    other = _load(pipeline[0])  # another model of the same folder (a method's run) shares the vae and its latents
    assert other.latent is latent
    shuffled = other.encode(batch.x.flip(0))  # keyed by content, not by a batch's row ids
    assert counts() == (start[0] + 12, start[1] + 6) and torch.equal(shuffled, model.encode(batch.x).flip(0))


def test_a_latent_class_conditional_unet_pipeline_loads_too(pipeline, tmp_path):
    """`model: {name: ddpm, path}` over a pipeline with a vae: the UNet denoises the same latents."""
    from diffusers import DDPMScheduler

    from unlearn.spec import DDPMSpec

    torch.manual_seed(0)
    unet = build_model(DDPMSpec(channels=[16, 32], train_timesteps=100), CLASSES, LATENTS).unet.eval()
    folder = tmp_path / "ldm"
    unet.save_pretrained(folder / "unet")
    DDPMScheduler(num_train_timesteps=100).save_pretrained(folder / "scheduler")
    pipeline[2].save_pretrained(folder / "vae")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "LDMPipeline", **{
        name: ["diffusers", cls] for name, cls in (("unet", "UNet2DModel"), ("vae", "AutoencoderKL"),
                                                   ("scheduler", "DDPMScheduler"))}}))
    model = build_model(DDPMSpec(path=str(folder)), CLASSES, IMAGES).eval()
    assert model.noise_shape == LATENTS and model.scheduler.config.clip_sample is False
    z, t, y = torch.randn(3, *LATENTS), torch.tensor([1, 50, 99]), torch.tensor([0, 5, 19])
    with torch.no_grad():
        assert torch.equal(model(z, t, y), unet(z, t, class_labels=y).sample)
    assert sample(model, y, steps=2, generator=torch.Generator().manual_seed(0)).shape == (3, *IMAGES)
    assert not any("vae" in k or "encoder" in k for k in model.state_dict())


def test_the_latent_cache_is_bounded_dropping_the_least_recently_used(pipeline, monkeypatch):
    from unlearn.models import latent as latent_mod

    space = latent_mod.LatentSpace(pipeline[2])  # its own cache (not the one the loaded models share)
    monkeypatch.setattr(latent_mod, "LATENT_CACHE_BYTES", 3 * 4 * 16 * 4)  # three 4x4x4 float latents
    x = _images(4, seed=5).x
    space.encode(x[:3])
    space.encode(x[:1])  # image 0 is now the most recently used
    space.encode(x[3:])  # a fourth pushes out image 1, the least recently used
    assert len(space._cache) == 3 and space._cached_bytes == 3 * 4 * 16 * 4
    before = space.misses
    space.encode(x[[0, 2, 3]])
    assert space.misses == before
    space.encode(x[1:2])
    assert space.misses == before + 1


def test_decoding_an_encoding_gives_images_of_the_data_shape_in_unit_range(pipeline):
    model = _load(pipeline[0]).eval()
    x = _images(4).x
    back = model.decode(model.encode(x))
    assert back.shape == x.shape and back.min() >= 0 and back.max() <= 1
    assert model.decode(torch.zeros(0, *LATENTS)).shape == (0, *IMAGES)  # an empty evaluation share


@pytest.mark.parametrize("shape, message", [
    ((3, 16, 16), "takes 4x4x4 latents; the dataset's 3x16x16 images encode to 4x8x8"),
    ((1, 8, 8), "encodes 3-channel images whose sides are multiples of 2; the dataset's images are 1x8x8"),
    ((3, 7, 7), "encodes 3-channel images whose sides are multiples of 2"),
])
def test_data_that_does_not_fit_the_latents_is_one_line(pipeline, shape, message):
    with pytest.raises(BadInput) as err:
        _load(pipeline[0], shape)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_latent_class_forgetting_job_runs_end_to_end(pipeline, tmp_path, monkeypatch):
    """The pipeline as the original (evaluated, not trained) on 8 px synthetic images, 5 a class; GA and SA (its
    replay drawn in latent space and decoded, its Fisher over the transformer) unlearn it; FA / CA / FD for each."""
    from unlearn.job import run_job
    from unlearn.spec import validate

    monkeypatch.chdir(tmp_path)
    spec = validate({
        "name": "latent-dit", "seed": 0,
        "dataset": {"name": "synthetic", "num_train": 100, "num_test": 40, "image_size": 8},
        "model": {"name": "dit", "path": str(pipeline[0]), "sample_steps": 5, "guidance_scale": 2.0},
        "forget": {"kind": "class", "classes": [0]},
        "methods": [{"name": "ga", "params": {"steps": 2, "batch_size": 8}},
                    {"name": "sa", "params": {"steps": 2, "batch_size": 8, "replay_per_class": 1, "replay_steps": 2,
                                              "fisher_per_class": 1, "fisher_timesteps": 2}}],
        "eval": {"samples_per_class": 2, "grid_per_class": 1}, "ray": {"enabled": False},
        "tracking": {"enabled": False}, "cache_dir": str(tmp_path / "cache")})
    result = run_job(spec, tmp_path / "out", progress="quiet")
    assert result["original_cached"] and not list((tmp_path / "cache").glob("models/*.pt"))  # nothing trained
    for name in ("original", "ga", "sa"):
        metrics = result["methods"][name]
        assert {"FA", "CA", "FD"} <= set(metrics), name
        assert 0 <= metrics["FA"] <= 100 and 0 <= metrics["CA"] <= 100 and np.isfinite(metrics["FD"]), name
    assert (tmp_path / "out" / "grid_sa.png").is_file()
