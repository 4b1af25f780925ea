"""Class-conditional DDPM: a diffusers `UNet2DModel` built from the spec (nothing downloaded).

The module the platform trains and unlearns is `ConditionalDDPM`: the UNet with a class embedding of
`num_classes + 1` rows (the last id is "no class", the unconditional model that classifier-free
guidance needs) and its `DDPMScheduler` (the forward noising process; not a module, no weights).

- `diffusion_loss(model, batch)` is the task's per-sample loss (`ctx.loss` of every method): the MSE of
  the noise prediction at a uniformly drawn timestep, images mapped from [0, 1] into the backbone's space by
  `ConditionalDenoiser.encode` (pixels scaled to [-1, 1], or a latent pipeline's VAE latents). In train
  mode labels are dropped to the unconditional id at rate `cond_dropout` (so guidance works later).
- `sample(model, labels, ...)` draws images in [0, 1] with a `DDIMScheduler` made from the DDPM
  scheduler's config (few steps, deterministic for a given generator), optionally with guidance, starting from
  noise of the backbone's `noise_shape` and decoded at the end (`ConditionalDenoiser.decode`).
- `pseudo_label_loss(model, batch, labels)` is SalUn's diffusion relabelling loss: the noise prediction
  under the true label pulled towards the (detached) prediction under another label.

Sizes come from the spec: `channels` are the block widths (each block but the last halves the
resolution), `layers_per_block`, `train_timesteps`. Self-attention sits in the lowest-resolution block
and the mid block only, which keeps 16x16 digits at ~1M parameters and fast on a CPU.
"""

from __future__ import annotations

import abc
import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from unlearn.batch import Batch
from unlearn.errors import BadInput, SpecError
from unlearn.spec import DDPMSpec

if TYPE_CHECKING:
    from unlearn.models.latent import LatentSpace


class ConditionalDenoiser(nn.Module, abc.ABC):
    """What the diffusion task needs of a backbone: `forward(x_noisy, t, labels)` -> predicted noise, the noise
    schedule, the null (unconditional) label id, the task's label dropout rate, `noise_shape` (what the backbone
    denoises) and the map between the task's images in [0, 1] and that space (`encode` / `decode`).

    Pixel-space models denoise the images scaled to [-1, 1]. Latent ones (`latent`, a pipeline's VAE) denoise its
    latents; the VAE is a plain attribute, not a submodule, so it is in neither `parameters()` nor the state dict."""

    def __init__(self, scheduler, num_classes: int, cond_dropout: float, latent: LatentSpace | None = None) -> None:
        super().__init__()
        self.scheduler = scheduler  # diffusers DDPMScheduler: the forward process, no learnable state
        self.num_classes = num_classes
        self.null_label = num_classes  # the unconditional class id (classifier-free guidance)
        self.cond_dropout = cond_dropout
        self.latent = latent  # models.latent.LatentSpace (a plain object, not a submodule) or None: pixels

    @property
    @abc.abstractmethod
    def noise_shape(self) -> tuple[int, int, int]:
        """C x H x W of what the backbone denoises (the starting noise of sampling): pixels, or latents; each
        backbone reads it from its own config."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C x H x W of the images in [0, 1] that the task reads and `decode` gives."""
        return self.noise_shape if self.latent is None else self.latent.image_shape(self.noise_shape)

    def encode(self, x01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> the backbone's space (x0 of the forward process)."""
        return x01 * 2 - 1 if self.latent is None else self.latent.encode(x01)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The backbone's space (a finished sample) -> images in [0, 1]."""
        return (z.clamp(-1, 1) + 1) / 2 if self.latent is None else self.latent.decode(z)

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202: nn.Module's hook behind .to(), .cuda(), .cpu()
        if self.latent is not None:  # the VAE is no submodule: move it along explicitly
            self.latent.vae._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)


class ConditionalDDPM(ConditionalDenoiser):
    """UNet noise predictor + DDPM noise schedule; `forward(x_noisy, t, labels)` returns predicted noise."""

    def __init__(self, unet: nn.Module, scheduler, num_classes: int, cond_dropout: float,
                 latent: LatentSpace | None = None) -> None:
        super().__init__(scheduler, num_classes, cond_dropout, latent)
        self.unet = unet

    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x_noisy, t, class_labels=labels).sample

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        return (self.unet.config.in_channels, size, size)


def build_ddpm(spec: DDPMSpec, num_classes: int, input_shape: tuple[int, ...]) -> ConditionalDDPM:
    """A freshly initialised class-conditional UNet for C x H x W images (H = W) and its DDPM scheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    if spec.path is not None:
        return load_ddpm(spec, num_classes, input_shape)
    channels, size = input_shape[0], input_shape[-1]
    widths = tuple(spec.channels)
    if input_shape[-2] != size:
        raise SpecError("dataset", f"ddpm needs square images, got {input_shape[-2]}x{size} (set dataset.resize)")
    if size % 2 ** (len(widths) - 1):
        raise SpecError("model.channels", f"{len(widths)} blocks halve the {size} px images {len(widths) - 1} times; "
                                          "give fewer block widths")
    n = len(widths)
    down = ["DownBlock2D"] * (n - 1) + ["AttnDownBlock2D"]
    up = ["AttnUpBlock2D"] + ["UpBlock2D"] * (n - 1)
    unet = UNet2DModel(
        sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=widths,
        layers_per_block=spec.layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=math.gcd(32, *widths), attention_head_dim=math.gcd(32, widths[-1]), dropout=spec.dropout,
        num_class_embeds=num_classes + 1)
    scheduler = DDPMScheduler(num_train_timesteps=spec.train_timesteps)
    return ConditionalDDPM(unet, scheduler, num_classes, spec.cond_dropout)


def load_ddpm(spec: DDPMSpec, num_classes: int, input_shape: tuple[int, ...]) -> ConditionalDDPM:
    """The pretrained class-conditional UNet in `spec.path` (a pipeline or a UNet2DModel folder), over its
    pipeline's VAE latents where the pipeline has one."""
    from diffusers import UNet2DModel

    from unlearn.models.latent import check_latent_input
    from unlearn.models.pretrained import load_latent, load_model, load_scheduler, locate

    located = locate(spec.path, "unet", "UNet2DModel")
    unet = load_model(UNet2DModel, located.model)
    n = unet.config.num_class_embeds
    if n is None:
        raise BadInput(f"model.path: the UNet in {spec.path} is unconditional (no class embedding): it cannot be "
                       "asked to forget a class")
    if n != num_classes + 1:
        raise BadInput(f"model.path: the UNet in {spec.path} has {n} class embeddings; this dataset needs "
                       f"{num_classes} classes + 1 unconditional (the last id)")
    size = unet.config.sample_size
    takes = (unet.config.in_channels, size, size)
    latent = load_latent(located)
    if latent is not None:
        check_latent_input(latent, input_shape, takes, f"the UNet in {spec.path}")
    elif takes != tuple(input_shape):
        raise BadInput(f"model.path: the UNet in {spec.path} takes {unet.config.in_channels}x{size}x{size} images; "
                       f"the dataset's are {'x'.join(map(str, input_shape))}")
    scheduler = load_scheduler(located.scheduler, spec.train_timesteps, latent=latent is not None)
    return ConditionalDDPM(unet, scheduler, num_classes, spec.cond_dropout, latent)


def unwrap(model: nn.Module) -> ConditionalDenoiser:
    """The ConditionalDenoiser inside a DDP/FSDP wrapper (or the model itself)."""
    return getattr(model, "module", model)


def _noised(core: ConditionalDenoiser, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, noise) for images in [0, 1], in the backbone's space (`encode`): antithetic uniform timesteps
    (t and T-1-t, as the DDPM releases)."""
    x0 = core.encode(x)
    n, steps = len(x0), core.scheduler.config.num_train_timesteps
    half = torch.randint(0, steps, ((n + 1) // 2,), device=x0.device)
    t = torch.cat([half, steps - 1 - half])[:n]
    noise = torch.randn_like(x0)
    return core.scheduler.add_noise(x0, noise, t), t, noise


def diffusion_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Per-sample noise-prediction MSE, shape (B,); labels dropped at rate cond_dropout in train mode."""
    core = unwrap(model)
    x_t, t, noise = _noised(core, batch.x)
    labels = batch.y
    if core.training and core.cond_dropout > 0:
        drop = torch.rand(labels.shape, device=labels.device) < core.cond_dropout
        labels = torch.where(drop, torch.full_like(labels, core.null_label), labels)
    prediction = model(x_t, t, labels)
    return (prediction - noise).square().flatten(1).mean(1)


def pseudo_label_loss(model: nn.Module, batch: Batch, pseudo_labels: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between the prediction under each image's label and the detached one under
    `pseudo_labels` (SalUn's DDPM relabelling: the forgotten class is steered to draw another class)."""
    core = unwrap(model)
    x_t, t, _ = _noised(core, batch.x)
    with torch.no_grad():
        target = model(x_t, t, pseudo_labels)
    return (model(x_t, t, batch.y) - target).square().flatten(1).mean(1)


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, steps: int = 50, guidance_scale: float = 1.0,
           generator: torch.Generator | None = None, batch_size: int = 500,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Images in [0, 1] (CPU tensor, N x C x H x W) conditioned on `labels`, by `steps` DDIM steps (eta 0) in the
    backbone's space (`noise_shape`), decoded at the end (`decode`).

    Classifier-free guidance when `guidance_scale` != 1: ε = ε_uncond + s (ε_cond − ε_uncond).
    The starting noise is drawn on the CPU from `generator`, so a seed gives the same images anywhere; or
    given as `noise` (a worker sampling its share of a set passes its rows of the set's noise). DDIM with
    eta 0 adds no noise after the start, so each image depends only on its own starting noise and label.
    """
    from diffusers import DDIMScheduler

    core = unwrap(model)
    was_training = core.training
    core.eval()
    device = next(core.parameters()).device
    ddim = DDIMScheduler.from_config(core.scheduler.config, timestep_spacing="trailing")
    ddim.set_timesteps(steps)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if noise is None:
        noise = torch.randn((len(labels), *core.noise_shape), generator=generator)
    out = []
    for start in range(0, len(labels), batch_size):
        y = labels[start:start + batch_size].to(device)
        x = noise[start:start + batch_size].to(device)
        guided = guidance_scale != 1.0
        y_in = torch.cat([y, torch.full_like(y, core.null_label)]) if guided else y
        for t in ddim.timesteps:
            x_in = torch.cat([x, x]) if guided else x
            eps = core(x_in, t.to(device).expand(len(x_in)), y_in)
            if guided:
                cond, uncond = eps.chunk(2)
                eps = uncond + guidance_scale * (cond - uncond)
            x = ddim.step(eps, t, x).prev_sample
        out.append(core.decode(x).cpu())
    core.train(was_training)
    return torch.cat(out) if out else core.decode(noise)


def seeded_noise(seed: int, labels: torch.Tensor, index: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The starting noise of each sample (its label, its index within the label), each from a generator of
    its own seeded by (seed, label, index): what a sample starts from never depends on who draws it, with
    whom, or how many others are drawn."""
    out = torch.empty((len(labels), *shape))
    generator = torch.Generator()
    for row, (label, i) in enumerate(zip(torch.as_tensor(labels).tolist(), torch.as_tensor(index).tolist())):
        generator.manual_seed(((seed * 1_000_003 + label) * 1_000_003 + i) % (2 ** 63))
        out[row] = torch.randn(shape, generator=generator)
    return out


def draw(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, steps: int, guidance_scale: float) -> torch.Tensor:
    """The diffusion task's sampler (`ctx.sample`): images in [0, 1] on the model's device, from the given noise."""
    device = next(unwrap(model).parameters()).device
    return sample(model, labels, steps, guidance_scale, noise=noise).to(device)


__all__ = ["ConditionalDDPM", "ConditionalDenoiser", "build_ddpm", "diffusion_loss", "draw", "pseudo_label_loss", "sample", "seeded_noise",
           "unwrap"]
