"""Class-conditional diffusion transformer: diffusers' `DiTTransformer2DModel` and its DDPM noise schedule.

`ConditionalDiT` has the interface of `ddpm.ConditionalDDPM` (forward(x_noisy, t, labels) -> predicted noise,
`scheduler`, `null_label`, `cond_dropout`, `noise_shape`, `encode` / `decode`), so the task's loss, sampling with
guidance and every diffusion method work on it unchanged. A pretrained pipeline with a `vae/` (DiT-XL-2-256 and
its sd-vae-ft-ema) is latent diffusion: the transformer denoises the VAE's latents of the data's images (encoded
once each, `unlearn.models.latent`) and samples are decoded for the judge. Two facts of diffusers' DiT handled here:

- Its label embeddings (one per block) drop labels to the null class at `class_dropout_prob` (0.1) whenever
  the module is in training mode, independently per block. An ascent on a forgotten class would then push
  ~10% of its steps onto the null class that guidance relies on. The model's own dropout is switched off
  (the null row of the table stays), and the task drops labels itself, at `cond_dropout`, only when training
  the original and retrain (`diffusion_loss`).
- With `learn_sigma` (DiT-XL/2) the output holds a variance prediction beside the noise (`out_channels` =
  2 x in): forward returns the noise half, which is what the loss and the DDIM sampler read.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from unlearn.errors import BadInput, SpecError
from unlearn.models.ddpm import ConditionalDenoiser
from unlearn.spec import DiTSpec

if TYPE_CHECKING:
    from unlearn.models.latent import LatentSpace


class ConditionalDiT(ConditionalDenoiser):
    """DiT noise predictor + DDPM noise schedule; `forward(x_noisy, t, labels)` returns predicted noise. The null
    label is the label table's extra row."""

    def __init__(self, transformer: nn.Module, scheduler, num_classes: int, cond_dropout: float,
                 latent: LatentSpace | None = None) -> None:
        super().__init__(scheduler, num_classes, cond_dropout, latent)
        self.transformer = transformer
        silence_label_dropout(transformer)

    def forward(self, x_noisy: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        out = self.transformer(x_noisy, timestep=t, class_labels=labels, return_dict=False)[0]
        return out[:, :x_noisy.shape[1]]  # learned sigma: the noise half

    @property
    def noise_shape(self) -> tuple[int, int, int]:
        size = self.transformer.config.sample_size
        return (self.transformer.config.in_channels, size, size)


def silence_label_dropout(transformer: nn.Module) -> None:
    """Turn off every label embedding's own dropout (the null row stays for guidance)."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in transformer.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def build_dit(spec: DiTSpec, num_classes: int, input_shape: tuple[int, ...]) -> ConditionalDiT:
    """A tiny DiT from the spec's sizes (freshly initialised), or the pretrained one in `spec.path`."""
    from diffusers import DiTTransformer2DModel

    from unlearn.models.pretrained import load_latent, load_model, load_scheduler, locate

    channels, size = input_shape[0], input_shape[-1]
    if spec.path is not None:
        located = locate(spec.path, "transformer", "DiTTransformer2DModel")
        transformer = load_model(DiTTransformer2DModel, located.model)
        latent = load_latent(located)
        check_pretrained(transformer, num_classes, input_shape, spec.path, latent)
        scheduler = load_scheduler(located.scheduler, spec.train_timesteps, latent=latent is not None)
        return ConditionalDiT(transformer, scheduler, num_classes, spec.cond_dropout, latent)
    if input_shape[-2] != size:
        raise SpecError("dataset", f"dit needs square images, got {input_shape[-2]}x{size} (set dataset.resize)")
    if size % spec.patch:
        raise SpecError("model.patch", f"{spec.patch} px patches do not tile {size} px images")
    from diffusers import DDPMScheduler

    transformer = DiTTransformer2DModel(
        num_attention_heads=spec.heads, attention_head_dim=spec.hidden // spec.heads, in_channels=channels,
        out_channels=2 * channels if spec.learn_sigma else channels, num_layers=spec.layers, dropout=spec.dropout,
        sample_size=size, patch_size=spec.patch, num_embeds_ada_norm=num_classes)
    return ConditionalDiT(transformer, DDPMScheduler(num_train_timesteps=spec.train_timesteps), num_classes,
                          spec.cond_dropout)


def check_pretrained(transformer: nn.Module, num_classes: int, input_shape: tuple[int, ...], path: str,
                     latent: LatentSpace | None = None) -> None:
    """A pretrained DiT must fit the data: its classes, channels and size (of the images' latents in a latent
    pipeline), and a null class for guidance."""
    from diffusers.models.embeddings import LabelEmbedding

    from unlearn.models.latent import check_latent_input

    config = transformer.config
    if config.num_embeds_ada_norm != num_classes:
        raise BadInput(f"model.path: the DiT in {path} has {config.num_embeds_ada_norm} classes; the dataset has "
                       f"{num_classes}")
    takes = (config.in_channels, config.sample_size, config.sample_size)
    if latent is not None:
        check_latent_input(latent, input_shape, takes, f"the DiT in {path}")
    elif takes != tuple(input_shape):
        raise BadInput(f"model.path: the DiT in {path} takes {config.in_channels}x{config.sample_size}x"
                       f"{config.sample_size} inputs; the dataset's images are {'x'.join(map(str, input_shape))}")
    tables = [m.embedding_table.num_embeddings for m in transformer.modules() if isinstance(m, LabelEmbedding)]
    if not tables or min(tables) < num_classes + 1:
        raise BadInput(f"model.path: the DiT in {path} has no null class (trained without label dropout), which "
                       "classifier-free guidance and unlearning's label handling need")


__all__ = ["ConditionalDiT", "build_dit", "silence_label_dropout"]
