"""Pretrained diffusion models from local folders (`model.path`): nothing is downloaded.

A folder is either a diffusers pipeline (`model_index.json` naming its components, each in a subfolder:
`unet/` or `transformer/`, `scheduler/`, `vae/` for latent models) or one model's own folder (`config.json`
whose `_class_name` is the model class). A pipeline with a `vae/` is latent diffusion: its denoiser works on the
VAE's latents (`unlearn.models.latent`). Every problem is one line naming the folder (BadInput: exit 2).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearn.errors import BadInput


@dataclass
class Located:
    model: Path  # the denoiser's own folder (config.json + weights)
    scheduler: Path | None  # the pipeline's scheduler folder, if any
    vae: Path | None  # a latent pipeline's autoencoder folder


def _json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise BadInput(f"model.path: cannot read {path}: {err}") from None


def locate(path: str | Path, component: str, class_name: str) -> Located:
    """Where a pipeline folder (or a bare model folder) keeps its `component` (e.g. "transformer")."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise BadInput(f"model.path: not a folder: {root}")
    index = root / "model_index.json"
    if index.is_file():
        parts = {k: v for k, v in _json(index).items() if not k.startswith("_") and isinstance(v, list) and v[0]}
        if component not in parts:
            raise BadInput(f"model.path: the diffusers pipeline in {root} has no {component} "
                           f"(it has: {', '.join(sorted(parts)) or 'nothing'})")
        found = lambda name: root / name if name in parts and (root / name).is_dir() else None  # noqa: E731
        for name in (component, "vae"):  # a latent denoiser run without its vae would be fed pixels
            if name in parts and found(name) is None:
                raise BadInput(f"model.path: {root}/model_index.json names a {name} but {root / name} is missing")
        return Located(root / component, found("scheduler"), found("vae"))
    config = root / "config.json"
    if config.is_file() and _json(config).get("_class_name") == class_name:
        return Located(root, None, None)
    raise BadInput(f"model.path: {root} is not a diffusers {class_name} (no model_index.json, and no config.json "
                   f"with _class_name {class_name})")


def load_model(cls: type, folder: Path) -> Any:
    """`cls.from_pretrained(folder)` from local files only, its failure as one line."""
    try:
        return cls.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # diffusers raises OSError, ValueError, EnvironmentError... for a broken folder
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"model.path: cannot load a {cls.__name__} from {folder}: {first}") from None


def load_scheduler(folder: Path | None, train_timesteps: int, latent: bool = False) -> Any:
    """The forward process as a DDPMScheduler: from the pipeline's scheduler config (whatever sampler class it
    names, the betas are what the model was trained with), else a fresh one of `train_timesteps`. `latent`:
    latents are not confined to [-1, 1], so the sampler must never clip its estimate of x0 to that range."""
    from diffusers import DDPMScheduler

    if folder is None:
        return DDPMScheduler(num_train_timesteps=train_timesteps, clip_sample=not latent)
    config = _json(folder / "scheduler_config.json") if (folder / "scheduler_config.json").is_file() else None
    if config is None:
        raise BadInput(f"model.path: {folder} has no scheduler_config.json")
    return DDPMScheduler.from_config(config, **({"clip_sample": False, "thresholding": False} if latent else {}))


# The autoencoders loaded in this process, by folder: every model built from one pipeline (the driver's check, each
# method's run, the original) shares one frozen VAE and so its latent cache: an image is encoded once per process.
_LATENTS: dict[Path, tuple[tuple[int, ...], Any]] = {}
KEEP_LATENTS = 2  # folders remembered (a job uses one; a VAE may take hundreds of MB)


def load_latent(located: Located) -> Any:
    """A latent pipeline's frozen autoencoder (`LatentSpace` over its AutoencoderKL), None for pixel models."""
    from diffusers import AutoencoderKL

    from unlearn.models.latent import LatentSpace

    if located.vae is None:
        return None
    folder = located.vae.resolve()
    stamp = tuple(f.stat().st_mtime_ns for f in sorted(folder.iterdir()) if f.is_file())  # a rewritten folder reloads
    if folder in _LATENTS and _LATENTS[folder][0] == stamp:
        return _LATENTS[folder][1]
    latent = LatentSpace(load_model(AutoencoderKL, located.vae))
    _LATENTS.pop(folder, None)
    _LATENTS[folder] = (stamp, latent)
    while len(_LATENTS) > KEEP_LATENTS:
        _LATENTS.pop(next(iter(_LATENTS)))
    return latent
