"""RMU: representation misdirection (Li et al. 2024, WMDP), in open-unlearning's form.

At one decoder layer, the model's activations on forget answers are pushed towards c·u (u a random unit vector
drawn once from the run's seed, c the steering coefficient) while its activations on retain answers are kept equal
to the frozen original's (`token_losses.rmu_loss`): the layers above receive a large, meaningless signal on forget
text only. Positions are the answer tokens (open-unlearning: `labels != -100`, unshifted); each term is the mean
over every answer token of the global batch (`ctx.row_mean`), the retain term weighted by α.

Every parameter trains (open-unlearning's `trainable_params_regex: .*`; WMDP's release trains three MLP
projections). The layers above the chosen one do not enter the loss; they are tied to it with weight 0, so every
parameter gets a (zero) gradient: DDP without `find_unused_parameters` requires one for each, and one process
computes the same step.
"""

from __future__ import annotations

from typing import Literal

import torch

from unlearn.data.qa_batches import unpack_rows
from unlearn.errors import SpecError
from unlearn.methods import register
from unlearn.methods.base import Batch, Context, Method
from unlearn.methods.lm_defaults import (OPEN_UNLEARNING, lm_batch_size, lm_epochs, lm_lr, lm_optimizer,
                                         lm_weight_decay)
from unlearn.methods.token_losses import IGNORE_INDEX, decoder_layers, layer_forward, random_control_vector, rmu_loss
from unlearn.models.causal_lm import AdaptersOff
from unlearn.params import ForgetBatchParams, hparam, loguniform

RMU_CONFIG = f"{OPEN_UNLEARNING} configs/trainer/RMU.yaml"


def resolve_layer(layer: int | None, count: int) -> int:
    """The decoder layer RMU steers: the declared one, checked against the model's `count` layers, or the middle
    one, (count - 1) // 2 (open-unlearning's layer 7 of Llama-3.2-1B's 16)."""
    if layer is None:
        return (count - 1) // 2
    if layer >= count:
        raise SpecError("params.layer", f"layer {layer} does not exist: the model has {count} decoder layers "
                                        f"(0..{count - 1})")
    return layer


class RMUParams(ForgetBatchParams):
    lr: float = lm_lr(1e-3,
                      "forget NLL 0.17 -> 0.41 / 0.10 -> 0.22, retain 0.15 -> 0.21 / 0.10 -> 0.13 at seeds 1 / 2 (3e-3: "
                      "retain 0.64 at seed 2)")
    epochs: float = lm_epochs()
    batch_size: int = lm_batch_size()
    optimizer: Literal["sgd", "adam", "adamw"] = lm_optimizer()
    weight_decay: float = lm_weight_decay()
    layer: int | None = hparam(None, ge=0, le=10_000,
                               paper=f"{RMU_CONFIG}: module_regex model.layers.7, the middle of Llama-3.2-1B's 16 "
                                     "layers (WMDP: layer 7 of zephyr-7b's 32); None: the middle layer, "
                                     "(layers - 1) // 2",
                               help="decoder layer (0-based) whose output is steered; None: the middle one")
    steering_coeff: float = hparam(2.0, gt=0, le=10_000, search=loguniform(0.5, 300.0),
                                   paper=f"{RMU_CONFIG}: steering_coeff 2 (WMDP: 6.5 for zephyr-7b; open-unlearning "
                                         "notes it depends on the model and data)",
                                   help="c: the forget activations' target is c · u")
    alpha: float = hparam(1.0, ge=0, le=100_000, search=loguniform(0.1, 1000.0),
                          paper=f"{RMU_CONFIG}: alpha 1 with retain_loss_type EMBED_DIFF (WMDP: 1200 for zephyr-7b)",
                          help="weight of the retain term (activations equal to the original's)")


@register
class RMU(Method):
    name = "rmu"
    uses = frozenset({"forget", "retain"})
    primary = "forget"
    tasks = frozenset({"language_modelling"})
    Params = RMUParams
    paper = "Li et al. 2024, The WMDP Benchmark (RMU); settings of open-unlearning's RMU"
    summary = "steer a layer's forget activations to a random direction, keep retain activations as the original's"

    def setup(self, ctx: Context) -> None:
        layers = decoder_layers(ctx.module)
        self.layer = resolve_layer(self.params.layer, len(layers))
        self.student_layer = layers[self.layer]
        # the original runs through its own layers, or (LoRA) through the student's with the adapters off
        original_layers = layers if isinstance(ctx.original, AdaptersOff) else decoder_layers(ctx.original)
        self.original_layer = original_layers[self.layer]
        self.control: torch.Tensor | None = None  # u, drawn at the first step (its size is the layer's width)
        self.seed = ctx.seed

    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        p = self.params
        f_qa, r_qa = unpack_rows(forget.x), unpack_rows(retain.x)
        forget_acts, forget_out = layer_forward(ctx.model, self.student_layer, f_qa.input_ids, f_qa.attention_mask)
        retain_acts, retain_out = layer_forward(ctx.model, self.student_layer, r_qa.input_ids, r_qa.attention_mask)
        with torch.no_grad():
            original_acts, _ = layer_forward(ctx.original, self.original_layer, r_qa.input_ids, r_qa.attention_mask)
        if self.control is None:
            self.control = random_control_vector(forget_acts.shape[-1], self.seed, device=forget_acts.device)
        parts = rmu_loss(forget_acts, retain_acts, original_acts, self.control, p.steering_coeff, p.alpha,
                         forget_mask=f_qa.labels != IGNORE_INDEX, retain_mask=r_qa.labels != IGNORE_INDEX)
        forget_term = ctx.row_mean(parts.forget.total, parts.forget.count)
        retain_term = ctx.row_mean(parts.retain.total, parts.retain.count)
        tie = 0.0 * (forget_out.logits.sum() + retain_out.logits.sum())  # see the module docstring
        self.apply(ctx, forget_term + p.alpha * retain_term + tie)
        return {"forget_mse": forget_term.item(), "retain_mse": retain_term.item()}
