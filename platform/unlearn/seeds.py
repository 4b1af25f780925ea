"""A job over several seeds: mean ± std instead of one draw.

Each seed is the whole job at that seed: its own original (trained or read from the cache under the seed's
key), its own retrain reference, its own random forget set where the scenario draws one, and every method.
The seeds run one after another on one executor (Ray is joined once). `results.json` keeps each metric's
mean under its own name (readers of one-seed results need not change), adds `<metric>_std` (the sample
standard deviation, ddof 1, as the papers' ± columns) and `per_seed`; each seed's own results.json lies in
`seed-<s>/`. In MLflow each seed's job run (with its method runs) nests under one run for the whole job,
which holds the means and standard deviations.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from unlearn.atomic import write_json_atomic
from unlearn.execution import Executor
from unlearn.spec import JobSpec
from unlearn.tracking import flatten, make_tracker


def seeds_of(spec: JobSpec) -> list[int]:
    return list(spec.seeds) if spec.seeds is not None else [spec.seed]


def spread(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (`<key>_std`, 0 for one seed) of every number the rows share."""
    keys = [k for k in rows[0] if all(isinstance(r.get(k), (int, float)) for r in rows)]
    out: dict[str, float] = {}
    for key in keys:
        values = np.array([float(r[key]) for r in rows])
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    return {k: round(v, 4) for k, v in out.items()}


def combine(spec: JobSpec, per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The multi-seed results.json from each seed's."""
    first = next(iter(per_seed.values()))
    names = list(dict.fromkeys(name for result in per_seed.values() for name in result["methods"]))
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        rows = {s: r["methods"].get(name, {"error": "not run"}) for s, r in per_seed.items()}
        failed = {s: row["error"] for s, row in rows.items() if "error" in row}
        row: dict[str, Any] = spread([m for m in rows.values() if "error" not in m]) if len(failed) < len(rows) else {}
        if failed:
            s, error = next(iter(failed.items()))
            row["error"] = f"seed {s}: {error}" + (f" (and {len(failed) - 1} more seeds)" if len(failed) > 1 else "")
        row["per_seed"] = {str(s): m for s, m in rows.items()}
        methods[name] = row
    engines = [r["engine"] for r in per_seed.values()]
    return {
        "job": spec.name, "dataset": first["dataset"], "model": first["model"], "forget": first["forget"],
        "label_level": first["label_level"], "sizes": first["sizes"], "seeds": list(per_seed),
        "original_cached": all(r["original_cached"] for r in per_seed.values()),
        "methods": methods,
        "engine": {"executor": engines[0]["executor"], "worker_groups": engines[0]["worker_groups"],
                   "train_runs": sum(e["train_runs"] for e in engines),
                   "wall_seconds": round(sum(e["wall_seconds"] for e in engines), 2)},
        "failed": sorted(name for name, m in methods.items() if "error" in m),
        "per_seed_results": {str(s): f"seed-{s}/results.json" for s in per_seed},
        **({"concept_known": first["concept_known"]} if "concept_known" in first else {}),
    }


def format_spread(methods: dict[str, dict[str, Any]]) -> str:
    """The table with `mean ± std` cells."""
    from unlearn.job import format_table

    shown = {}
    for name, m in methods.items():
        if "error" in m:
            shown[name] = {"error": m["error"]}
            continue
        shown[name] = {k: _cell(m[k], m.get(f"{k}_std")) for k in m if isinstance(m[k], float) and not k.endswith("_std")}
    return format_table(shown)


def _cell(mean: float, std: float | None) -> str:
    if std is None or not math.isfinite(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def run_seeds(spec: JobSpec, out_dir: Path | None = None, executor: Executor | None = None, *,
              resume: bool = False, progress: Any = None) -> dict[str, Any]:
    """Run the job once per seed of `spec.seeds`; writes results.json (mean ± std) in `out_dir`.

    `resume`: seeds an interrupted driver finished are read back, the others resumed (see `unlearn.resume`)."""
    from unlearn.job import check_writable, make_executor, run_one_seed
    from unlearn.resume import JobState

    out_dir = Path(out_dir or Path("results") / spec.name)
    check_writable(out_dir)
    state = JobState.begin(out_dir, spec, resume)
    seeds = seeds_of(spec)
    tracker = make_tracker(spec.tracking, spec.name)
    own_executor = executor is None
    executor = executor or make_executor(spec, out_dir)
    per_seed: dict[int, dict[str, Any]] = {}
    try:
        with tracker.run(spec.name, tags={"unlearn.kind": "seeds", "unlearn.seeds": ",".join(map(str, seeds))},
                         run_id=state.parent_run) as parent:
            state.parent_run = parent or None
            state.save()
            tracker.params(parent, flatten(spec.model_dump(mode="json")))
            for k, seed in enumerate(seeds):
                if progress is None or progress.mode != "quiet":
                    print(f"seed {seed} ({k + 1}/{len(seeds)})", file=sys.stderr, flush=True)
                one = spec.model_copy(update={"seed": seed, "seeds": None})
                folder = out_dir / f"seed-{seed}"
                done = folder / "results.json"
                if resume and done.is_file():  # this seed finished before the driver was lost
                    per_seed[seed] = json.loads(done.read_text())
                    continue
                per_seed[seed] = run_one_seed(one, folder, executor, parent_run=parent,
                                              resume=resume and (folder / "job-state.json").is_file(),
                                              progress=progress)
            payload = combine(spec, per_seed)
            payload["mlflow"] = {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                                 "parent_run": parent or None,
                                 "runs": next(iter(per_seed.values()))["mlflow"]["runs"],  # the first seed's
                                 "models": next(iter(per_seed.values()))["mlflow"].get("models", {}),
                                 "runs_per_seed": {str(s): r["mlflow"]["runs"] for s, r in per_seed.items()},
                                 "seed_runs": {str(s): r["mlflow"]["parent_run"] for s, r in per_seed.items()}}
            tracker.metrics(parent, {f"{name}.{k}": v for name, m in payload["methods"].items() for k, v in m.items()
                                     if isinstance(v, (int, float))})
            write_json_atomic(payload, out_dir / "results.json")
            tracker.artifact(parent, out_dir / "results.json")
    finally:
        if own_executor and hasattr(executor, "close"):
            executor.close()
    print(f"\n{spec.name}: mean ± std over seeds {', '.join(map(str, seeds))}", flush=True)
    print(format_spread(payload["methods"]), flush=True)
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return payload


__all__ = ["combine", "format_spread", "run_seeds", "seeds_of", "spread"]
