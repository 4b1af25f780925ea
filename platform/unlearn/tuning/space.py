"""The search space and its plan: which of a method's parameters `unlearn tune` searches, over which
ranges (each checked against the parameter's declared bounds before any work)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from unlearn.errors import BadInput, SpecError
from unlearn.spec import JobSpec, MethodSpec

KINDS = ("loguniform", "uniform", "choice", "randint")
SPACE_KEYS = ("kind", "low", "high", "values")


@dataclass(frozen=True)
class Dimension:
    """One searched parameter: its distribution, checked against the method's declared range."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    values: tuple[Any, ...] | None = None
    integer: bool = False  # the parameter is an int: numeric kinds sample integers

    def domain(self):
        """The Ray Tune domain (randint's high is inclusive here, exclusive in Tune)."""
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.values))
        if self.kind == "randint" or (self.integer and self.kind == "uniform"):
            return tune.randint(int(self.low), int(self.high) + 1)
        if self.kind == "loguniform":
            return tune.lograndint(int(self.low), int(self.high) + 1) if self.integer else tune.loguniform(self.low, self.high)
        return tune.uniform(self.low, self.high)

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        if value is None or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high

    def describe(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"kind": "choice", "values": list(self.values)}
        return {"kind": self.kind, "low": self.low, "high": self.high}


@dataclass
class Plan:
    """Everything `unlearn tune` decided before any work: method, fixed params, space, settings."""

    spec: JobSpec
    method: str
    entry: MethodSpec  # the tuned method's entry (the spec's, or a bare one)
    fixed: dict[str, Any]  # params pinned by the entry (not searched unless tune.space names them)
    space: dict[str, Dimension]
    defaults: dict[str, Any]  # the params the method runs with untuned, for the searched names
    num_samples: int
    in_process: bool

    @property
    def metric(self) -> str:
        return self.spec.tune.metric


def _range_text(finfo) -> str:
    """A declared field's hard range as an interval, e.g. '(0, 10]'."""
    low = high = None
    left, right = "[", "]"
    for meta in finfo.metadata:
        for name, bracket in (("ge", "["), ("gt", "(")):
            if getattr(meta, name, None) is not None:
                low, left = getattr(meta, name), bracket
        for name, bracket in (("le", "]"), ("lt", ")")):
            if getattr(meta, name, None) is not None:
                high, right = getattr(meta, name), bracket
    return f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"


def _is_int(finfo) -> bool:
    types = set(get_args(finfo.annotation)) or {finfo.annotation}
    return int in types and float not in types


def _accepts(params_cls, name: str, value: Any) -> bool:
    from pydantic import ValidationError

    try:
        params_cls.model_validate({name: value})
    except ValidationError:
        return False
    return True


def _number(value: Any) -> float | int | None:
    """A number, also from YAML 1.1 strings like '1e-5' (which PyYAML does not read as floats)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _dimension(method: str, params_cls, name: str, raw: dict[str, Any], where: str) -> Dimension:
    """Validate one search range (from the spec or a declaration) against the parameter's field."""
    from unlearn.params import bounds

    finfo = params_cls.model_fields[name]
    extra = sorted(set(raw) - set(SPACE_KEYS))
    if extra:
        raise SpecError(f"{where}.{extra[0]}", f"unknown key; allowed: {', '.join(SPACE_KEYS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise SpecError(f"{where}.kind", f"must be one of {', '.join(KINDS)} (got {kind!r})")
    if kind == "choice":
        values = raw.get("values")
        if not isinstance(values, (list, tuple)) or not values:
            raise SpecError(f"{where}.values", "choice needs a non-empty list of values")
        for i, value in enumerate(values):
            if not _accepts(params_cls, name, value):
                raise SpecError(f"{where}.values.{i}", f"{value!r} is not a valid {name} for {method} "
                                                       f"(declared range {_range_text(finfo)})")
        return Dimension(name, kind, values=tuple(values))
    low, high = _number(raw.get("low")), _number(raw.get("high"))
    for key, value in (("low", low), ("high", high)):
        if value is None:
            raise SpecError(f"{where}.{key}", f"{kind} needs a number (got {raw.get(key)!r})")
    if bounds(finfo) == (None, None) and not _accepts(params_cls, name, low):
        raise SpecError(f"{where}.kind", f"{name} is not numeric: use kind choice")
    if not low < high:
        raise SpecError(where, f"low must be below high (got low={low}, high={high})")
    if kind == "loguniform" and low <= 0:
        raise SpecError(f"{where}.low", f"loguniform needs low > 0 (got {low})")
    if kind == "randint" and (int(low) != low or int(high) != high):
        raise SpecError(where, f"randint needs integer low and high (got {low}, {high})")
    for key, value in (("low", low), ("high", high)):
        if not _accepts(params_cls, name, value):
            raise SpecError(f"{where}.{key}", f"{value} is outside {method}'s declared range of {name}: "
                                              f"{_range_text(finfo)}")
    return Dimension(name, kind, float(low), float(high), integer=_is_int(finfo))


def search_space(method: str, fixed: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Dimension]:
    """The method's declared search ranges (minus pinned params) merged with the spec's `tune.space`."""
    from unlearn.methods import get
    from unlearn.params import field_doc

    params_cls = get(method).Params
    fields = params_cls.model_fields
    for name in overrides:
        if name not in fields:
            raise SpecError(f"tune.space.{name}", f"unknown parameter; {method} takes: {', '.join(fields)}")
    space: dict[str, Dimension] = {}
    for name, finfo in fields.items():
        declared = field_doc(finfo)[2]
        if name in overrides:
            space[name] = _dimension(method, params_cls, name, dict(overrides[name]), f"tune.space.{name}")
        elif declared and name not in fixed:
            space[name] = _dimension(method, params_cls, name, {k: v for k, v in declared.items() if v is not None},
                                     f"{method}.{name} (declared search)")
    if not space:
        raise SpecError("tune.space", f"nothing to search: {method} declares no search range outside the "
                                      f"params the spec pins ({', '.join(fixed) or 'none'}); name some in tune.space")
    return space


def plan_search(spec: JobSpec, method: str | None = None, num_samples: int | None = None) -> Plan:
    """Check the method, its fixed params and the search space; no data is touched."""
    from unlearn.methods import REGISTRY, build
    from unlearn.tasks import task_of

    name = method or spec.tune.method
    where = "--method" if method else "tune.method"
    if not name:
        candidates = [m.name for m in spec.methods if m.name != "retrain"]
        if len(candidates) != 1:
            raise BadInput("unlearn tune: say which method to tune (--method M or tune.method in the spec)")
        name = candidates[0]
    if name not in REGISTRY:
        raise SpecError(where, f"unknown method {name!r}; registered: {', '.join(sorted(REGISTRY))}")
    if name == "retrain":
        raise SpecError(where, "retrain is the reference every Gap is measured to; tune an unlearning method")
    task = task_of(spec.model.name)
    if task == "diffusion":
        raise SpecError("model.name", f"unlearn tune searches classifiers and language models (got {spec.model.name!r})")
    if task != "classification" and spec.tune.metric == "proxy":
        raise SpecError("tune.metric", f"the retrain-free proxy scores classifiers; a {task} search needs "
                                       "metric gap (against retrain)")
    if task not in REGISTRY[name].tasks:
        raise SpecError(where, f"method {name!r} does not support {task} models")
    if num_samples is not None and num_samples < 1:
        raise BadInput(f"--num-samples must be at least 1 (got {num_samples})")
    index = next((i for i, m in enumerate(spec.methods) if m.name == name), None)
    entry = spec.methods[index] if index is not None else MethodSpec(name=name)
    fixed = dict(entry.params)
    untuned = build(name, fixed, field=f"methods.{index}.params" if index is not None else "params",
                    family=spec.model.name).params
    space = search_space(name, fixed, spec.tune.space)
    defaults = {p: getattr(untuned, p) for p in space}
    return Plan(spec, name, entry, fixed, space, defaults, num_samples or spec.tune.num_samples,
                in_process=spec.tune.in_process or not spec.ray.enabled)
