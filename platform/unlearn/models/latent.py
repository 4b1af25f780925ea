"""The autoencoder between pixels and a latent denoiser (latent diffusion, e.g. DiT-XL/2 over sd-vae-ft-ema latents).

`LatentSpace` holds a pipeline's frozen diffusers `AutoencoderKL` and maps the task's images in [0, 1] to the
denoiser's latents and back:

- `encode`: images scaled to [-1, 1], the latent distribution's *mean* (deterministic: an image always gives the
  same latent, so the loss's only randomness stays the task's timestep and noise) times the VAE's `scaling_factor`;
- `decode`: latents divided by `scaling_factor`, decoded, clamped to [-1, 1] and mapped to [0, 1] (what the judge
  and the sample grids read).

The denoiser holds it as a plain attribute, not a submodule: the VAE is no parameter that unlearning methods see
(optimizers, saliency masks, Fishers iterate `model.parameters()`) and no entry of the state dict (checkpoints,
the cached original, U-LiRA shadows); the denoiser moves it along in `.to()`. It never changes, so deep copies of
the denoiser (the frozen original beside the model being unlearned) share it, and so do all the models one process
builds from one pipeline folder (`pretrained.load_latent`): with them its cache of latents.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import torch

from unlearn.errors import BadInput

# Bound of the latent cache per process, in host memory (least recently used latents are dropped beyond it): a
# digits-sized set takes kilobytes, ImageNet-256 latents (4x32x32 floats) 16 KiB an image, so ~65k images fit.
LATENT_CACHE_BYTES = 1 << 30
CHUNK = 32  # images through the VAE at once (a 256 px encoder or decoder pass holds large activations)


class LatentSpace:
    """A frozen AutoencoderKL: images in [0, 1] <-> scaled latents, encoded latents cached by image content."""

    def __init__(self, vae: Any) -> None:
        self.vae = vae.eval().requires_grad_(False)
        config = vae.config
        self.scaling_factor = float(config.scaling_factor)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)  # every encoder block but the last halves H, W
        self.channels, self.latent_channels = int(config.in_channels), int(config.latent_channels)
        # Each image is encoded once per process. Keyed by a hash of the image's bytes, not by `Batch.index`: the
        # index is a row id within its split (forget and retain rows share ids), and methods build batches of
        # their own (SA's noise images and replayed samples, Fisher copies) whose ids name no dataset row.
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self.hits = self.misses = 0

    def latent_shape(self, image_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
        """The latents' C x h x w for C x H x W images, or None when the VAE cannot encode such images."""
        channels, height, width = image_shape
        if channels != self.channels or height % self.downsample or width % self.downsample:
            return None
        return (self.latent_channels, height // self.downsample, width // self.downsample)

    def image_shape(self, latent_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The C x H x W of the images that latents of `latent_shape` decode to."""
        _, height, width = latent_shape
        return (self.channels, height * self.downsample, width * self.downsample)

    def _vae_on(self, device: torch.device) -> Any:
        # The denoiser moves the VAE with itself; a deep copy sharing it may sit on another device meanwhile.
        if next(self.vae.parameters()).device != device:
            self.vae.to(device)
        return self.vae

    @torch.no_grad()
    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N x c x h x w, on x's device) of images in [0, 1], from the cache where it holds them."""
        keys = _content_keys(x01)
        latents: dict[bytes, torch.Tensor] = {}
        for key in keys:
            if key in self._cache and key not in latents:
                self._cache.move_to_end(key)
                latents[key] = self._cache[key]
        todo = list(dict.fromkeys(k for k in keys if k not in latents))  # unseen images, once each
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        if todo:
            first = {key: row for row, key in reversed(list(enumerate(keys)))}
            rows = torch.tensor([first[k] for k in todo], device=x01.device)
            fresh = self._encode(x01[rows]).float().cpu()  # kept in host memory: latents are small to move
            for key, latent in zip(todo, fresh):
                latents[key] = latent
                self._remember(key, latent)
        return torch.stack([latents[k] for k in keys]).to(x01.device, x01.dtype)

    def _encode(self, x01: torch.Tensor) -> torch.Tensor:
        vae = self._vae_on(x01.device)
        dtype = next(vae.parameters()).dtype
        parts = [vae.encode(x01[i:i + CHUNK].to(dtype) * 2 - 1).latent_dist.mean for i in range(0, len(x01), CHUNK)]
        return torch.cat(parts) * self.scaling_factor

    def _remember(self, key: bytes, latent: torch.Tensor) -> None:
        latent = latent.clone()  # not a view of the chunk's tensor (which would keep the whole chunk alive)
        self._cache[key] = latent
        self._cached_bytes += latent.numel() * latent.element_size()
        while self._cached_bytes > LATENT_CACHE_BYTES and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (N x C x H x W, on z's device) decoded from scaled latents."""
        if len(z) == 0:
            return z.new_zeros((0, *self.image_shape(tuple(z.shape[1:]))))
        vae = self._vae_on(z.device)
        dtype = next(vae.parameters()).dtype
        parts = [vae.decode(z[i:i + CHUNK].to(dtype) / self.scaling_factor).sample for i in range(0, len(z), CHUNK)]
        return ((torch.cat(parts).clamp(-1, 1) + 1) / 2).to(z.dtype)

    def __deepcopy__(self, memo: dict) -> "LatentSpace":
        return self  # frozen: copies of a denoiser share the VAE and its latents

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)  # a pickled model (MLflow) takes the VAE, not this process's latents
        state.update(_cache=OrderedDict(), _cached_bytes=0, hits=0, misses=0)
        return state


def _content_keys(x: torch.Tensor) -> list[bytes]:
    """One digest per image of its shape and float32 bytes."""
    rows = x.detach().to("cpu", torch.float32).contiguous()
    shape = repr(tuple(rows.shape[1:])).encode()
    return [hashlib.blake2b(shape + row.numpy().tobytes(), digest_size=16).digest() for row in rows]


def check_latent_input(latent: LatentSpace, input_shape: tuple[int, ...], takes: tuple[int, ...], what: str) -> None:
    """A latent denoiser must take the latents of the data's images: one line where it does not."""
    shown = "x".join(map(str, input_shape))
    latent_shape = latent.latent_shape(tuple(input_shape))
    if latent_shape is None:
        raise BadInput(f"model.path: the vae of {what} encodes {latent.channels}-channel images whose sides are "
                       f"multiples of {latent.downsample}; the dataset's images are {shown}")
    if tuple(takes) != latent_shape:
        raise BadInput(f"model.path: {what} takes {'x'.join(map(str, takes))} latents; the dataset's {shown} images "
                       f"encode to {'x'.join(map(str, latent_shape))} (set dataset.resize)")


__all__ = ["LATENT_CACHE_BYTES", "LatentSpace", "check_latent_input"]
