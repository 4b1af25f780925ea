"""The shared recipe of the language-model methods: one place for the defaults every LLM method takes from
open-unlearning's TOFU recipe, and for where the learning rate departs from it.

open-unlearning (locuslab/open-unlearning) runs every TOFU unlearning method with one trainer recipe
(configs/trainer/finetune.yaml under configs/experiment/unlearn/tofu/default.yaml): paged AdamW (32-bit), 8 rows
per device x 4 accumulation steps, 10 epochs over the forget set (`data.anchor: forget`), weight decay 0.01,
learning rate 1e-5, one warm-up epoch then the Trainer's default linear decay. The LLM-only methods (grad_diff,
npo, simnpo, rmu) declare these as their defaults; DELETE / GSR / GHR / GROGU, which also serve classifiers,
declare them for the `causal_lm` family (`hparam(family=...)`), so every LLM method of one job follows one recipe.

Departures, each for a reason:
* Learning rate. 1e-5 is open-unlearning's rate for 1B-8B pretrained models; the `causal_lm` models of this
  project are tiny (0.2-1M parameters) and trained from scratch on the facts set, where AdamW needs 1e-4..1e-2 to
  move within 10 epochs of a few-dozen-row forget set. Each method's rate is the largest of a grid that keeps the
  retained answers (`LR_SELECTION`); a job on a pretrained model should set `lr` (or tune it).
* No warm-up and a constant rate: the platform has constant and cosine schedules only (`lr_schedule`), and a
  forget set of ~70 rows gives ~3 steps per epoch, so a warm-up epoch would be a tenth of the run.
"""

from __future__ import annotations

from typing import Any

from unlearn.params import hparam, loguniform

OPEN_UNLEARNING = "open-unlearning (locuslab/open-unlearning)"
RECIPE = (f"{OPEN_UNLEARNING} TOFU recipe (configs/trainer/finetune.yaml, configs/experiment/unlearn/tofu/"
          "default.yaml)")

LM_OPTIMIZER = "adamw"
LM_OPTIMIZER_WHY = f"{RECIPE}: paged_adamw_32bit (AdamW)"
LM_BATCH = 32
LM_BATCH_WHY = f"{RECIPE}: per_device_train_batch_size 8 x gradient_accumulation_steps 4"
LM_EPOCHS = 10.0
LM_EPOCHS_WHY = f"{RECIPE}: num_train_epochs 10 over the forget set (data.anchor: forget)"
LM_WEIGHT_DECAY = 0.01
LM_WEIGHT_DECAY_WHY = f"{RECIPE}: weight_decay 0.01"
LR_SELECTION = ("benchmarks/results/lm-lr-selection.md (benchmarks/lm_lr_selection.py: 2-layer llama, 30 facts "
                "entities, 10% forgotten, seeds 1 and 2; the largest lr of 1e-4, 3e-4, 1e-3, 3e-3, 1e-2 whose retain "
                "answer NLL stays <= 0.5 nats/token, the original's ~0.1-0.15)")
LM_LR_SEARCH = loguniform(1e-5, 3e-2)


def lm_lr_why(chosen: float, measured: str) -> str:
    """Where an LLM method's learning rate comes from: `measured` is what the selection saw at the chosen rate."""
    return (f"{RECIPE}: learning_rate 1e-5, for 1B-8B pretrained models; {chosen:g} for this project's tiny causal_lm "
            f"models trained from scratch, chosen on {LR_SELECTION}: {measured}")


def lm_lr(default: float, measured: str) -> Any:
    """The `lr` field of an LLM-only method."""
    return hparam(default, gt=0, le=10, search=LM_LR_SEARCH, paper=lm_lr_why(default, measured), help="learning rate")


def lm_epochs() -> Any:
    """The `epochs` field of an LLM-only method (passes over the forget set)."""
    return hparam(LM_EPOCHS, gt=0, le=1000, search=loguniform(2, 50), paper=LM_EPOCHS_WHY,
                  help="passes over the forget data")


def lm_batch_size() -> Any:
    return hparam(LM_BATCH, ge=1, le=65536, paper=LM_BATCH_WHY, help="global batch size (split across workers)")


def lm_optimizer() -> Any:
    return hparam(LM_OPTIMIZER, paper=LM_OPTIMIZER_WHY, help="optimizer")


def lm_weight_decay() -> Any:
    return hparam(LM_WEIGHT_DECAY, ge=0, le=1, paper=LM_WEIGHT_DECAY_WHY, help="weight decay")


def causal_lm_note(field: str, lr: float | None = None, measured: str = "") -> str:
    """The paper string's note of a classifier method's `causal_lm` family default for `field` (`lr` and what
    the selection `measured` at it, for the learning rate)."""
    if field == "lr":
        return f"causal_lm {lr:g}: {lm_lr_why(lr, measured)}"
    return {"optimizer": f"causal_lm {LM_OPTIMIZER}: {LM_OPTIMIZER_WHY}",
            "batch_size": f"causal_lm {LM_BATCH:g}: {LM_BATCH_WHY}",
            "epochs": f"causal_lm {LM_EPOCHS:g}: {LM_EPOCHS_WHY}",
            "weight_decay": f"causal_lm {LM_WEIGHT_DECAY:g}: {LM_WEIGHT_DECAY_WHY}"}[field]


# The family name of causal language models (`model.name`), for `hparam(family=...)` overrides.
CAUSAL_LM = "causal_lm"
# DELETE / GSR / GHR / GROGU on causal_lm: the selection's choice for all four (same rate, same rule).
CURE_LM_LR = 1e-4
CURE_LM_MEASURED = ("forget NLL 0.17 -> 0.31..0.41, retain 0.15 -> 0.17..0.19 at seed 1 (at 3e-4 the retain NLL is "
                    "already 0.31..1.95: these losses see forget rows only)")
