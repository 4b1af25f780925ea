"""Diffusion transformers and pretrained diffusion folders: the DiT backbone, loading local pipelines (no download),
samples that do not depend on the worker count, and a tiny DiT job end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unlearn import cli
from unlearn.errors import BadInput
from unlearn.models import build_model
from unlearn.spec import DDPMSpec, DiTSpec

TINY_DIT = {"layers": 1, "hidden": 32, "heads": 2, "patch": 2, "train_timesteps": 100}


def _dit(**changes) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(DiTSpec(**{**TINY_DIT, **changes}), 10, (1, 8, 8))


def _inputs(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 100, (n,), generator=g), torch.arange(n) % 10


def test_the_dit_predicts_noise_and_its_own_label_dropout_is_off():
    model = _dit().train()
    x, t, y = _inputs()
    first, again = model(x, t, y), model(x, t, y)
    assert first.shape == x.shape
    assert torch.equal(first, again)  # diffusers' DiT would drop ~10% of labels per block in training mode
    null = model(x, t, torch.full_like(y, model.null_label))  # the null row stays: guidance has its unconditional
    assert not torch.allclose(first, null)


def test_a_dit_with_learned_sigma_gives_the_loss_its_noise_half():
    model = _dit(learn_sigma=True).eval()
    x, t, y = _inputs()
    full = model.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]
    assert full.shape[1] == 2 and torch.equal(model(x, t, y), full[:, :1])


def _pipeline(folder: Path, component: str, model: torch.nn.Module, scheduler, extra: dict | None = None) -> Path:
    """A diffusers pipeline folder as `save_pretrained` writes one (model_index.json + a subfolder each)."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder / component)
    scheduler.save_pretrained(folder / "scheduler")
    index = {"_class_name": "DiTPipeline" if component == "transformer" else "DDPMPipeline",
             "_diffusers_version": "0.42.1", component: ["diffusers", type(model).__name__],
             "scheduler": ["diffusers", type(scheduler).__name__], **(extra or {})}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def test_a_pretrained_dit_pipeline_folder_loads_and_gives_identical_outputs(tmp_path):
    from diffusers import DDIMScheduler

    saved = _dit().eval()
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="scaled_linear")
    folder = _pipeline(tmp_path / "dit", "transformer", saved.transformer, scheduler)
    for path in (folder, folder / "transformer"):  # a pipeline, or the model's own folder
        loaded = build_model(DiTSpec(path=str(path), train_timesteps=100), 10, (1, 8, 8)).eval()
        x, t, y = _inputs()
        assert torch.equal(loaded(x, t, y), saved(x, t, y))
    loaded = build_model(DiTSpec(path=str(folder)), 10, (1, 8, 8))
    # the forward process is the pipeline's: its betas, whatever sampler class it named
    assert loaded.scheduler.config.beta_schedule == "scaled_linear" and loaded.scheduler.config.num_train_timesteps == 100
    with pytest.raises(BadInput, match="has 10 classes; the dataset has 5"):
        build_model(DiTSpec(path=str(folder)), 5, (1, 8, 8))


def test_a_pretrained_class_conditional_unet_loads_and_an_unconditional_one_is_refused(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    spec = DDPMSpec(channels=[16, 32], train_timesteps=100)
    saved = build_model(spec, 10, (1, 8, 8)).eval()
    folder = _pipeline(tmp_path / "ddpm", "unet", saved.unet, DDPMScheduler(num_train_timesteps=100))
    loaded = build_model(DDPMSpec(path=str(folder)), 10, (1, 8, 8)).eval()
    x, t, y = _inputs()
    assert torch.equal(loaded(x, t, y), saved(x, t, y))
    plain = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        norm_num_groups=16)
    plain.save_pretrained(tmp_path / "unconditional")
    with pytest.raises(BadInput, match="unconditional"):
        build_model(DDPMSpec(path=str(tmp_path / "unconditional")), 10, (1, 8, 8))
    latent = _pipeline(tmp_path / "latent", "unet", saved.unet, DDPMScheduler(), {"vae": ["diffusers", "AutoencoderKL"]})
    with pytest.raises(BadInput, match="names a vae but .* is missing"):  # never a latent model fed pixels
        build_model(DDPMSpec(path=str(latent)), 10, (1, 8, 8))
    (latent / "vae").mkdir()
    with pytest.raises(BadInput, match="cannot load a AutoencoderKL from .*vae"):  # a broken vae folder: one line
        build_model(DDPMSpec(path=str(latent)), 10, (1, 8, 8))


def test_a_folder_that_is_not_a_diffusers_model_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    import yaml

    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"not a model")
    job = {"name": "dit-bad-folder", "dataset": {"name": "digits"},
           "model": {"name": "dit", "path": str(folder)}, "forget": {"kind": "class", "classes": [3]},
           "methods": [{"name": "sfr_on"}], "ray": {"enabled": False}, "tracking": {"enabled": False},
           "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    monkeypatch.chdir(tmp_path)
    codes: list[int] = []
    cli.main(["run", str(path), "--out", str(tmp_path / "out")], exit=codes.append)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert codes == [2] and len(err) == 1, err
    assert "is not a diffusers DiTTransformer2DModel" in err[0] and str(folder) in err[0]
    assert not (tmp_path / "out" / "results.json").exists()


class _Share:
    """Which share of an evaluation set a worker draws (the rank and world size a Comm would report)."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size


@pytest.mark.parametrize("family", ["dit", "ddpm"])
def test_one_and_two_workers_draw_the_same_samples(family):
    """Each sample starts from noise seeded by (seed, class, index): the set is the same whoever draws it."""
    from unlearn.evaluation.diffusion import DiffusionEvaluator
    from unlearn.spec import validate

    torch.manual_seed(0)
    model_spec = ({"name": "dit", **TINY_DIT} if family == "dit" else
                  {"name": "ddpm", "channels": [16, 32], "train_timesteps": 100})
    spec = validate({"name": "share", "dataset": {"name": "digits"}, "forget": {"kind": "class", "classes": [3]},
                     "model": {**model_spec, "sample_steps": 5, "guidance_scale": 2.0}, "methods": [{"name": "sfr_on"}]})
    model = build_model(spec.model, 10, (1, 8, 8))
    evaluator = DiffusionEvaluator.sampler(spec, 10)  # only the sampler: no judge or data needed for this check
    whole, labels = evaluator.generate(model, 5, seed=7, comm=_Share(0, 1))
    shares = [evaluator.generate(model, 5, seed=7, comm=_Share(r, 2))[0] for r in range(2)]
    assert len(shares[0]) == 25 and len(shares[1]) == 25 and (labels == np.repeat(np.arange(10), 5)).all()
    assert (torch.cat(shares) - whole).abs().max().item() <= 1e-5
    fewer, _ = evaluator.generate(model, 3, seed=7, comm=_Share(0, 1))  # the first 3 per class are the same 3
    assert (fewer.view(10, 3, -1) - whole.view(10, 5, -1)[:, :3]).abs().max().item() <= 1e-5
