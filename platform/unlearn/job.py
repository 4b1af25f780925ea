"""One unlearning job, end to end: data, original model, every method, evaluation, tracking, results.

The job never names a method: it builds a `RunRequest` per spec entry and hands it to an executor
(in-process, or Ray Train workers via engine.py). Retrain, when listed, runs first: it is the
reference every Gap and KL is measured against.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unlearn import plots
from unlearn.data import ImageDataset, load_dataset
from unlearn.data.scenarios import Splits, make_splits
from unlearn.errors import BadInput, SpecError
from unlearn.evaluation import build_evaluator
from unlearn.execution import Executor, LocalExecutor, RunRequest, new_model
from unlearn.methods import Method, validate_methods
from unlearn.spec import JobSpec, MethodSpec, dump
from unlearn.tasks import task_of
from unlearn.tracking import flatten, make_tracker
from unlearn.training import original_model, recipe_params

TABLE_COLUMNS = ("FA", "RA", "TA", "MIA", "gap", "KL", "FD", "seconds", "speedup")


@dataclass
class Prepared:
    """Everything checked and loaded before the first optimisation step."""

    spec: JobSpec
    task: str
    methods: list[Method]
    dataset: ImageDataset
    splits: Splits

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.splits.train.x.shape[1:])


def prepare(spec: JobSpec) -> Prepared:
    """Validate methods against the registry and build data and splits (BadInput on any problem)."""
    task = task_of(spec.model.name)
    methods = validate_methods(spec.methods, task)
    dataset = load_dataset(spec.dataset, spec.seed, spec.cache_dir)
    splits = make_splits(dataset, spec.forget, spec.seed)
    for i, method in enumerate(methods):  # e.g. CURE needs classes outside the forget set
        try:
            method.check_data(splits.forget.y, splits.num_outputs)
        except SpecError as err:
            raise SpecError(f"methods.{i}.{err.field}", str(err).split(": ", 1)[-1]) from None
    return Prepared(spec, task, methods, dataset, splits)


def check_writable(folder: Path) -> None:
    """Fail before any work if results cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as err:
        raise BadInput(f"output folder is not writable: {folder} ({err.strerror or err})") from None


def write_json_atomic(data: Any, path: Path) -> None:
    """Write JSON through a temp file + rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value)}")


def _clean(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else round(float(v), 4)) for k, v in metrics.items()}


def make_executor(spec: JobSpec) -> Executor:
    """Ray Train workers when `ray.enabled`, else this process."""
    if spec.ray.enabled:
        from unlearn.engine import RayExecutor

        return RayExecutor(spec.ray, seed=spec.seed)
    return LocalExecutor("cuda" if spec.ray.use_gpu and torch.cuda.is_available() else "cpu")


def request_for(prep: Prepared, entry: MethodSpec, state: dict[str, torch.Tensor]) -> RunRequest:
    """The run of one spec entry: retrain gets the train recipe and the retain set, others the remain stream."""
    spec, splits = prep.spec, prep.splits
    if entry.name == "retrain":
        params, retain = {**recipe_params(spec.train), **entry.params}, splits.retain
    else:
        params, retain = dict(entry.params), splits.remain
    return RunRequest(label=entry.run_name, method=entry.name, params=params, model=spec.model,
                      num_outputs=splits.num_outputs, input_shape=prep.input_shape, initial_state=state,
                      forget=splits.forget, retain=retain, task=prep.task, seed=spec.seed)


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """The results as an aligned text table."""
    cols = [c for c in TABLE_COLUMNS if any(m.get(c) is not None for m in methods.values())]
    header = ["method", *cols]
    rows = [[name, *(_fmt(m.get(c)) for c in cols)] for name, m in methods.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


def run_job(spec: JobSpec, out_dir: Path | None = None, executor: Executor | None = None) -> dict[str, Any]:
    """Run a whole job; writes results.json in `out_dir` and returns its content."""
    out_dir = Path(out_dir or Path("results") / spec.name)
    check_writable(out_dir)
    prep = prepare(spec)
    tracker = make_tracker(spec.tracking, spec.name)
    executor = executor or make_executor(spec)
    evaluator = build_evaluator(prep.task, prep.splits, spec, prep.dataset)
    evaluator.out_dir = out_dir  # an evaluator may add files beside results.json (diffusion: grid_<name>.png)
    splits = prep.splits
    print(f"job {spec.name}: {spec.dataset.name} / {spec.model.name}, forget {splits.describe}, "
          f"sizes {splits.sizes()}", file=sys.stderr, flush=True)

    with tracker.run(spec.name, tags={"unlearn.kind": "job"}) as parent:
        tracker.params(parent, flatten(spec.model_dump(mode="json")))
        tracker.text(parent, dump(spec), "spec.yaml")
        state, info = original_model(spec, splits, prep.input_shape, executor, prep.task)
        model = new_model(request_for(prep, MethodSpec(name="original"), state))
        metrics, ref_out = evaluator.evaluate(model)
        with tempfile.TemporaryDirectory() as tmp:  # the original's artifacts go on the job run (diffusion: its grid)
            for path in evaluator.artifacts(model, "original", Path(tmp)):
                tracker.artifact(parent, path)
        results: dict[str, dict[str, Any]] = {"original": {**metrics, "seconds": 0.0}}
        outputs = {"original": ref_out}
        run_ids: dict[str, str] = {}
        order = sorted(spec.methods, key=lambda m: m.name != "retrain")  # retrain first: the reference
        for entry in order:
            with tracker.run(entry.run_name, parent=parent, tags={"unlearn.method": entry.name}) as run_id:
                run_ids[entry.run_name] = run_id
                request = request_for(prep, entry, state)
                tracker.params(run_id, {"method": entry.name, **flatten(request.params, "params.")})
                out = executor.run(request)
                model = new_model(request)
                model.load_state_dict(out.state)
                metrics, model_out = evaluator.evaluate(model)
                results[entry.run_name] = {**metrics, "seconds": out.seconds}
                outputs[entry.run_name] = model_out
                tracker.history(run_id, out.history)
                tracker.metrics(run_id, {k: v for k, v in results[entry.run_name].items()})
                if out.resumed_from_step:
                    tracker.tag(run_id, "unlearn.resumed_from_step", str(out.resumed_from_step))
                    tracker.metrics(run_id, {"restarts": out.restarts})
                with tempfile.TemporaryDirectory() as tmp:
                    if out.history:
                        tracker.artifact(run_id, plots.loss_curves(out.history, Path(tmp) / "losses.png", entry.run_name))
                    for path in evaluator.artifacts(model, entry.run_name, Path(tmp)):
                        tracker.artifact(run_id, path)
                tracker.model(run_id, model)

        reference = next((m.run_name for m in spec.methods if m.name == "retrain"), None)
        retrain_seconds = results[reference]["seconds"] if reference else None
        for name, m in results.items():
            if reference is not None:
                m.update(evaluator.compare(m, outputs[name], results[reference], outputs[reference]))
            if retrain_seconds and name not in ("original", reference) and m["seconds"] > 0:
                m["speedup"] = retrain_seconds / m["seconds"]
        for name, run_id in run_ids.items():
            tracker.metrics(run_id, {k: v for k, v in results[name].items() if k in ("gap", "KL", "speedup")})
        tracker.metrics(parent, {f"{name}.{k}": v for name, m in results.items() for k, v in m.items()})

        payload = {
            "job": spec.name,
            "dataset": spec.dataset.name,
            "model": spec.model.name,
            "forget": splits.describe,
            "label_level": splits.label_level,
            "sizes": {k: v for k, v in splits.sizes().items() if k in ("forget", "retain", "test", "remain", "target")},
            "original_cached": info["cached"],
            "methods": {name: _clean(m) for name, m in results.items()},
            "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                       "parent_run": parent or None, "runs": run_ids},
        }
        write_json_atomic(payload, out_dir / "results.json")
        with tempfile.TemporaryDirectory() as tmp:
            bars = plots.metric_bars(payload["methods"], Path(tmp) / "metrics.png", f"{spec.name}: metrics vs retrain")
            tracker.artifact(parent, bars)
            tracker.artifact(parent, out_dir / "results.json")
    print(format_table(payload["methods"]), flush=True)
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return payload
