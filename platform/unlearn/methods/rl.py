"""RL (random labels): train on the forget data relabelled at random with wrong labels, plus the retain data."""

from __future__ import annotations

import math
from typing import Literal

import torch

from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import (DIVERGES_FROZEN, ForgetBatchParams, MethodParams, forget_batch_norm_stats, hparam,
                            loguniform, uniform)


def random_other_labels(y: torch.Tensor, num_classes: int, index: torch.Tensor, salt: int) -> torch.Tensor:
    """A uniformly drawn label different from each sample's own.

    Drawn from a hash of (the sample's row id, `salt`) rather than a global generator, so a sample gets
    the same label whichever worker holds it: N workers relabel exactly as one process does.
    """
    offset = 1 + _hash(index.to(torch.int64), salt) % max(num_classes - 1, 1)
    return (y + offset.to(y.device)) % num_classes


def _hash(values: torch.Tensor, salt: int) -> torch.Tensor:
    """A non-negative pseudo-random int64 per value (a 32-bit integer mix: multiply, xor-shift)."""
    mask = 0xFFFFFFFF
    salt = int(salt) & mask  # the same mix mod 2^32, and no int64 overflow for large seeds
    x = (values * 0x9E3779B1 + salt * 0x85EBCA77 + 0x27D4EB2F) & mask
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & mask
    x = ((x ^ (x >> 16)) * 0x045D9F3B) & mask
    return x ^ (x >> 16)


def random_label_loss(ctx: Context, forget: Batch, retain: Batch, retain_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean relabelling loss of the forget batch under random wrong labels + retain_weight × mean retain loss.

    Classification: cross-entropy to the wrong labels. Diffusion (`ctx.relabel`, SalUn's DDPM variant): the
    prediction under the forgotten label is pulled to the detached prediction under the wrong label, so the
    forgotten label learns to draw another class.
    """
    forget_loss = relabelled_forget_loss(ctx, forget)
    retain_loss = ctx.loss(ctx.model, retain).mean()
    return forget_loss + retain_weight * retain_loss, {"forget_loss": forget_loss.item(), "retain_loss": retain_loss.item()}


def relabelled_forget_loss(ctx: Context, forget: Batch) -> torch.Tensor:
    """Mean relabelling loss of the forget batch under this step's random wrong labels."""
    wrong = random_other_labels(forget.y, ctx.num_classes, forget.index, salt=ctx.seed * 1_000_003 + ctx.step)
    return ctx.relabel_loss(ctx.model, forget, wrong).mean()


RELEASE_SCHEDULE = ("SalUn release (Unlearn-Saliency, classification RL/SalUn): each epoch one pass over D_f "
                    "with random labels, then one pass over D_r; its DDPM script pairs a forget and a retain "
                    "batch at every iteration")


def forget_phase(step: int, forget_size: int, retain_size: int, batch_size: int) -> bool:
    """`schedule: release`: whether `step` falls in its epoch's forget pass (ceil(|D_f|/B) forget updates open
    every epoch, then ceil(|D_r|/B) retain updates)."""
    forget_steps = math.ceil(forget_size / batch_size)
    return step % (forget_steps + math.ceil(retain_size / batch_size)) < forget_steps


def _pairs(params: MethodParams, task: str) -> bool:
    """Both terms at every step: `paired`, and always for diffusion (SalUn's DDPM script)."""
    return params.schedule == "paired" or task == "diffusion"


def release_epoch_steps(params: MethodParams, forget_size: int, retain_size: int, task: str) -> int | None:
    """Steps per epoch of RL/SalUn: a forget pass plus a retain pass (`release`), or a retain pass (`paired`)."""
    if _pairs(params, task):
        return None
    return math.ceil(forget_size / params.batch_size) + math.ceil(retain_size / params.batch_size)


def scheduled_random_label_loss(ctx: Context, forget: Batch, retain: Batch, params: MethodParams
                                ) -> tuple[torch.Tensor, dict[str, float]]:
    """RL's loss under its schedule: paired (both terms every step), or the release's forget pass (the random-
    label term alone) and retain pass (the retain term alone)."""
    if _pairs(params, ctx.task):
        return random_label_loss(ctx, forget, retain, params.retain_weight)
    if forget_phase(ctx.step, ctx.forget_size, ctx.retain_size, params.batch_size):
        forget_loss = relabelled_forget_loss(ctx, forget)
        return forget_loss, {"forget_loss": forget_loss.item()}
    retain_loss = ctx.loss(ctx.model, retain).mean()
    return params.retain_weight * retain_loss, {"retain_loss": retain_loss.item()}


class RLParams(ForgetBatchParams):
    norm_stats: Literal["update", "frozen"] = forget_batch_norm_stats(
        family={"cnn": "update"}, why=DIVERGES_FROZEN.format(what="its loss became NaN (step 14)"))
    lr: float = hparam(0.01, gt=0, le=10, search=loguniform(1e-4, 0.1),
                       paper="Golatkar et al. 2020; settings of SalUn's RL baseline (lr ~0.01, SGD momentum 0.9)",
                       help="learning rate")
    epochs: float = hparam(4.0, gt=0, le=1000, search=loguniform(1, 20),
                           paper="SalUn's RL baseline: 10 epochs over D_f ∪ D_r; 4 on digits (one epoch leaves RA "
                                 "10-25 points down, the retain data must repair it)",
                           help="epochs: a forget pass then a retain pass each (`paired`: retain passes, each step "
                                "also taking a forget batch)")
    schedule: Literal["release", "paired"] = hparam("release", paper=RELEASE_SCHEDULE,
                                                    help="release: a forget pass then a retain pass per epoch; "
                                                         "paired: a forget and a retain batch every step")
    retain_weight: float = hparam(1.0, ge=0, le=100, search=uniform(0.0, 2.0),
                                  paper="SalUn (classification): forget and retain batches weigh the same",
                                  help="weight of the retain loss")


@register
class RL(Method):
    name = "rl"
    uses = frozenset({"forget", "retain"})
    primary = "retain"
    tasks = frozenset({"classification"})
    Params = RLParams
    paper = "Golatkar et al. 2020 (random labels); as run by Fan et al. 2024 (SalUn)"
    summary = "fine-tune on the forget data with random wrong labels plus the retain data"

    def epoch_steps(self, forget_size: int, retain_size: int, task: str) -> int | None:
        return release_epoch_steps(self.params, forget_size, retain_size, task)

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        loss, logged = scheduled_random_label_loss(ctx, forget, retain, self.params)
        self.apply(ctx, loss)
        return logged
