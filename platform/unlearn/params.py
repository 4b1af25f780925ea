"""Hyperparameters are declared once, here-shaped, and read by the spec, the CLI and Ray Tune.

Every method declares a pydantic model of its parameters with `hparam(...)` fields: the default (with
the paper it comes from), the valid range (enforced when a spec is validated) and, where a parameter is
worth searching, the search range that `unlearn tune` uses when the spec gives none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class SearchRange:
    """Default Ray Tune search space of one parameter."""

    kind: Literal["uniform", "loguniform", "randint", "choice"]
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None


def hparam(
    default: Any,
    *,
    ge: float | None = None,
    le: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    search: SearchRange | None = None,
    paper: str = "",
    help: str = "",
    family: dict[str, Any] | None = None,
) -> Any:
    """A declared hyperparameter: default, hard range, default search range and provenance.

    `family` declares other defaults per model family (`model.name`: value) where one default cannot serve
    every model (e.g. a learning rate); a job's spec, when it sets the param, always wins."""
    return Field(
        default,
        ge=ge,
        le=le,
        gt=gt,
        lt=lt,
        description=help,
        json_schema_extra={"paper": paper, "search": search.__dict__ if search else None, "family": family},
    )


def family_defaults(params_cls: type[BaseModel], family: str | None) -> dict[str, Any]:
    """The defaults `params_cls` declares for model family `family` (see `hparam(family=...)`)."""
    out = {}
    for name, field in params_cls.model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if family is not None and family in (extra.get("family") or {}):
            out[name] = extra["family"][family]
    return out


def loguniform(low: float, high: float) -> SearchRange:
    return SearchRange("loguniform", low, high)


def uniform(low: float, high: float) -> SearchRange:
    return SearchRange("uniform", low, high)


def randint(low: int, high: int) -> SearchRange:
    return SearchRange("randint", low, high)


def choice(values: Sequence[Any]) -> SearchRange:
    return SearchRange("choice", values=tuple(values))


class MethodParams(BaseModel):
    """Parameters every optimisation-based method shares; a method redeclares a field to change its default.

    Step count: `steps` when given, else `epochs` passes over the method's primary stream at the
    global batch size (the batch is split across workers, so N workers take the same steps as one).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    lr: float = hparam(0.01, gt=0, le=10, search=loguniform(1e-5, 1e-1), help="learning rate")
    epochs: float = hparam(5.0, gt=0, le=1000, help="passes over the primary stream")
    steps: int | None = hparam(None, ge=1, le=10_000_000, help="optimisation steps (overrides epochs)")
    batch_size: int = hparam(64, ge=1, le=65536, help="global batch size (split across workers)")
    optimizer: Literal["sgd", "adam", "adamw"] = hparam("sgd", help="optimizer")
    momentum: float = hparam(0.9, ge=0, lt=1, help="SGD momentum")
    weight_decay: float = hparam(5e-4, ge=0, le=1, help="weight decay")
    lr_schedule: Literal["constant", "cosine"] = hparam("constant", help="learning-rate schedule over the run")
    clip_grad: float | None = hparam(None, gt=0, help="gradient norm clip (None: no clipping)")
    norm_stats: Literal["update", "frozen"] = hparam(
        "update", help="BatchNorm layers while unlearning: 'update' (training mode: batch statistics, running "
                       "averages updated) or 'frozen' (the original's running statistics, as at evaluation)")


# Where per-family defaults were chosen (benchmarks/choose_defaults.py; measured on held-out classes and seeds
# by benchmarks/defaults.py).
SELECTION = "benchmarks/results/defaults-selection.md (validation split; synthetic classes 5, 8, 14 x seeds 0, 1)"

FORGET_BATCH_NORM_POLICY = (
    "platform policy, the same for every method that forwards forget-only batches (the releases keep BatchNorm "
    "in training mode): such batches hold the forgotten data alone (one class, in class forgetting) and would "
    "make the running statistics theirs; synthetic class forgetting, DELETE lr 1e-4: RA 86.2 updated vs 92.9 frozen")


def forget_batch_norm_stats(family: dict[str, str] | None = None, why: str = "") -> Any:
    """The `norm_stats` field of a method that forwards forget-only batches: the policy (frozen), with the
    per-family exceptions a method declares and `why` (their source)."""
    return hparam("frozen", family=family, paper=FORGET_BATCH_NORM_POLICY + (f". {why}" if why else ""),
                  help="BatchNorm layers: 'frozen' at the original's running statistics, or 'update' them "
                       "(training mode)")


# Measured on the cnn at the methods' declared lr (synthetic class 5, seed 0, 2026-12-04): with BatchNorm in
# evaluation mode nothing renormalises the activations, and these runs overflow or collapse; updating, they do not.
DIVERGES_FROZEN = ("With frozen statistics it {what} on the cnn (synthetic class 5, seed 0, at its declared lr), so on "
                   "the cnn it updates them, as its release does")


class ForgetBatchParams(MethodParams):
    """Params of a method that forwards forget-only batches: BatchNorm frozen by default (see the policy)."""

    norm_stats: Literal["update", "frozen"] = forget_batch_norm_stats()


def field_doc(field: FieldInfo) -> tuple[str, str, dict | None]:
    """(help, paper, search) of a declared field, for `unlearn methods` and Ray Tune."""
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    return field.description or "", str(extra.get("paper") or ""), extra.get("search")


def bounds(field: FieldInfo) -> tuple[float | None, float | None]:
    """The hard (low, high) bounds declared on a field, for checking a search space against them."""
    low = high = None
    for meta in field.metadata:
        for name in ("ge", "gt"):
            if getattr(meta, name, None) is not None:
                low = getattr(meta, name)
        for name in ("le", "lt"):
            if getattr(meta, name, None) is not None:
                high = getattr(meta, name)
    return low, high
