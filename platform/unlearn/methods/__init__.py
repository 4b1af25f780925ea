"""The method registry: one module per method, one `register` line each.

`get(name)` returns the class; `validate_methods(spec)` checks every method entry of a job spec
against the registry and the method's declared parameters (field-named errors, exit code 2).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from unlearn.errors import SpecError
from unlearn.methods.base import Batch, Context, Method
from unlearn.params import family_defaults

REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under `cls.name`."""
    if cls.name in REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    """The method class registered under `name`."""
    if name not in REGISTRY:
        raise SpecError("method", f"unknown method {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]


def build(name: str, params: dict[str, Any], field: str = "params", family: str | None = None) -> Method:
    """Instantiate a method with validated params (over the defaults declared for model family `family`);
    errors name `field.<param>`."""
    cls = get(name)
    try:
        return cls(cls.Params.model_validate({**family_defaults(cls.Params, family), **params}))
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown parameter" if first["type"] == "extra_forbidden" else first["msg"]
        if first["type"] == "extra_forbidden":
            msg += f"; {name} takes: {', '.join(cls.Params.model_fields)}"
        elif "input" in first:
            msg += f" (got {first['input']!r})"
        raise SpecError(f"{field}.{loc}", msg) from None


def validate_methods(method_specs: list[Any], task: str, family: str | None = None) -> list[Method]:
    """Build every method of a spec (for model family `family`), checking names, params and the task they
    support."""
    methods = []
    for i, m in enumerate(method_specs):
        if m.name not in REGISTRY:
            raise SpecError(f"methods.{i}.name", f"unknown method {m.name!r}; registered: {', '.join(sorted(REGISTRY))}")
        method = build(m.name, m.params, field=f"methods.{i}.params", family=family)
        if task not in method.tasks:
            raise SpecError(f"methods.{i}.name", f"method {m.name!r} does not support {task} models (supports: {', '.join(sorted(method.tasks))})")
        methods.append(method)
    return methods


# One import per method module: each registers itself.
from unlearn.methods import retrain, ft, ga, rl, l1_sparse, salun, scrub, bs, iu, delete, ghr, gsr, grogu, sfr_on, tarf, sa  # noqa: E402,F401
from unlearn.methods import grad_diff, npo, simnpo, rmu  # noqa: E402,F401  (language models only)

__all__ = ["REGISTRY", "register", "get", "build", "validate_methods", "Batch", "Context", "Method"]
