"""The method interface: what an unlearning method is, independent of where it runs.

A method is tensor maths: `setup` once (saliency masks, teacher copies, scores), then `step` per
optimisation step on one forget batch and one retain batch. It never imports Ray; whole-set
quantities go through `ctx.comm`, so the same code is exact on one process or N Ray workers.
The task (classification or diffusion) is behind `ctx.loss`, so task-agnostic methods (ft, ga,
sfr_on, salun, ...) serve both.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from unlearn.batch import Batch, LossFn, RelabelFn, RowsFn, SampleFn  # re-exported: methods import Batch from here
from unlearn.comm import Comm, LocalComm
from unlearn.params import MethodParams


@dataclass
class Context:
    """Everything a method may touch during a run."""

    model: nn.Module  # being unlearned; DDP/FSDP-wrapped on Ray: call it, step with ctx.optimizer
    module: nn.Module  # the same weights, unwrapped: for setup passes that must not trigger DDP hooks
    original: nn.Module  # frozen copy of the model before unlearning, eval mode
    optimizer: torch.optim.Optimizer
    params: MethodParams
    loss: LossFn
    task: str  # "classification" | "diffusion"
    num_classes: int
    forget_size: int  # global sizes (all workers)
    retain_size: int
    forget_batches: Callable[[], Iterator[Batch]]  # one pass over this worker's forget shard
    retain_batches: Callable[[], Iterator[Batch]]
    comm: Comm = field(default_factory=LocalComm)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    step: int = 0
    total_steps: int = 1
    seed: int = 0
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    logged: dict[str, float] = field(default_factory=dict)
    resume_method_state: dict | None = None  # the method's own state from a checkpoint, if resuming
    relabel: RelabelFn | None = None  # the task's own relabelling loss; None: the task loss under the new labels
    sample: SampleFn | None = None  # generative tasks: the task's sampler (model, labels, noise, steps, guidance)
    rows: RowsFn | None = None  # the task's scored rows (see `scored_rows`)
    global_rows: bool = False  # the task's rows fall unevenly over workers: `row_mean` uses the global count

    def relabel_loss(self, model: nn.Module, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
        """Per-sample loss that teaches `model` the given labels for the batch's inputs."""
        if self.relabel is not None:
            return self.relabel(model, batch, labels)
        return self.loss(model, Batch(batch.x, labels, batch.index))

    def scored_rows(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits R x K, labels R) of what a distillation loss scores: a classifier's samples (logits over
        classes), a language model's answer tokens (next-token logits over the vocabulary, the true next token)."""
        if self.rows is None:
            raise ValueError(f"the {self.task} task has no scored rows")
        return self.rows(model, batch)

    def row_mean(self, total: torch.Tensor, count: int | torch.Tensor) -> torch.Tensor:
        """The per-worker loss of a sum over this worker's `count` rows: its mean. Where rows fall unevenly over
        workers (answer tokens), `total * world / global count`: once DDP averages the gradients, the step follows
        the mean over every row of the global batch, exactly what one process computes."""
        if not self.global_rows:
            return total / max(int(count), 1)
        from unlearn.methods.token_losses import token_mean

        counted = torch.as_tensor(count, dtype=torch.float64, device=total.device).reshape(1).clone()
        global_count = self.comm.all_reduce(counted)[0]
        return token_mean(total, count, global_count, self.comm.world_size)

    def log(self, **values: float) -> None:
        """Record values (besides the returned losses) for this step's log line."""
        self.logged.update({k: float(v) for k, v in values.items()})

    @property
    def progress(self) -> float:
        """Fraction of the run done, in [0, 1)."""
        return self.step / max(self.total_steps, 1)


class Method(abc.ABC):
    """Base class: subclasses set the class attributes and implement `step` (and maybe `setup`)."""

    name: ClassVar[str]
    uses: ClassVar[frozenset[str]]  # subset of {"forget", "retain"}
    Params: ClassVar[type[MethodParams]] = MethodParams
    paper: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    tasks: ClassVar[frozenset[str]] = frozenset({"classification"})
    primary: ClassVar[str] = "forget"  # the stream `epochs` counts passes over
    from_scratch: ClassVar[bool] = False  # True: weights are re-initialised in setup (retrain)
    reference: ClassVar[bool] = False  # True: the run every Gap and KL is measured against (retrain)

    def __init__(self, params: MethodParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def check_data(self, forget_labels: np.ndarray, num_outputs: int) -> None:
        """Before any work: raise SpecError (field relative to the method entry) if the method cannot run on
        this forget set. Most methods can run on any."""

    def epoch_steps(self, forget_size: int, retain_size: int, task: str) -> int | None:
        """Steps in one epoch when a method's epoch is not one pass over its primary stream (e.g. a forget
        pass then a retain pass); None: ceil(primary size / batch size)."""
        return None

    def setup(self, ctx: Context) -> None:
        """Once before the first step."""

    @abc.abstractmethod
    def step(self, ctx: Context, forget: Batch | None, retain: Batch | None) -> dict[str, float]:
        """One optimisation step; returns the losses to log."""

    def state_dict(self) -> dict:
        """Method state that a resumed run needs beyond the weights (scores, masks made mid-run)."""
        return {}

    def diagnostics(self) -> dict:
        """What the method decided that the job can score against what the method was never told (plain data;
        e.g. TARF's `identified_rows`, scored as identification precision and recall). Empty by default."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()` output after `setup` when resuming from a checkpoint."""

    # --- helpers shared by many methods -------------------------------------------------------
    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer the params declare (subclasses may override)."""
        return build_optimizer(model.parameters(), self.params)

    @staticmethod
    def apply(ctx: Context, loss: torch.Tensor, mask: dict[str, torch.Tensor] | None = None) -> None:
        """zero_grad, backward, optional gradient mask and clipping, optimizer step."""
        ctx.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if mask is not None:
            apply_grad_mask(ctx.module, mask)
        clip = ctx.params.clip_grad
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), clip)
        ctx.optimizer.step()


def build_optimizer(parameters, params: MethodParams) -> torch.optim.Optimizer:
    """SGD / Adam / AdamW from declared params."""
    if params.optimizer == "sgd":
        return torch.optim.SGD(parameters, lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay)
    if params.optimizer == "adam":
        return torch.optim.Adam(parameters, lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay)


def apply_grad_mask(module: nn.Module, mask: dict[str, torch.Tensor]) -> None:
    """Zero the gradient of every weight outside the saliency mask (mask keyed by parameter name)."""
    for name, p in module.named_parameters():
        if p.grad is not None and name in mask:
            p.grad.mul_(mask[name])


def grads_of(module: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the current gradients, keyed by parameter name (zeros where None)."""
    return {
        n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
        for n, p in module.named_parameters()
    }
