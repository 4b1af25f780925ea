"""Running the search on the driver: Ray and what the cluster holds, the Tuner, the saved search state,
and `run_tune` / `resume_tune`."""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from unlearn.atomic import write_text_atomic
from unlearn.errors import BadInput
from unlearn.spec import JobSpec, MethodSpec, validate
from unlearn.tuning.objectives import (
    PENALTY,
    _LazyExecutor,
    _retrain_reference,
    proxy_objective,
    proxy_targets,
)
from unlearn.tuning.outputs import (
    _best,
    _config_text,
    _log_mlflow,
    _short,
    _trial_rows,
    best_spec,
    format_trials,
)
from unlearn.tuning.space import Plan, plan_search
from unlearn.tuning.trials import DRIVER_CPU, TRIALS_DIR, Shared, _plain, run_trial

# Where each number in tune.json comes from (members: the training data; non-members: the validation rows).
SELECTED_ON = {"FA": "forget set (training data)", "RA": "retain set (training data)",
               "TA": "validation split", "MIA": "retain set vs validation split", "KL": "validation split"}
STATE_FILE = "tune-state.json"
SEARCH_DIR = "search"  # Tune's experiment folder inside DIR


class TrialProgress(Callback):
    """A compact Tune callback: one line per finished trial (Tune's own table is too chatty here)."""

    def __init__(self, metric: str, mode: str, reports: int, total: int) -> None:
        self.metric, self.mode, self.reports, self.total = metric, mode, reports, total
        self.best = None

    @staticmethod
    def _done(trials, trial) -> int:
        """Trials finished so far, restored ones included (this one may not be marked yet)."""
        return sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = trial.last_result or {}
        value = last.get(self.metric)
        if value is not None and math.isfinite(value) and last.get("final") and not last.get("diverged"):
            if self.best is None or (value < self.best if self.mode == "min" else value > self.best):
                self.best = value
        how = (f"diverged ({last.get('why') or 'no reason given'})" if last.get("diverged")
               else "completed" if last.get("final")
               else f"stopped early at report {last.get('training_iteration', 0)}/{self.reports}")
        print(f"[tune] trial {self._done(trials, trial)}/{self.total} {trial.trial_id}: {how}, {self.metric}={_short(value)} "
              f"(best {_short(self.best)}) {_config_text(trial.config)}", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {self._done(trials, trial)}/{self.total} {trial.trial_id}: ERROR {_config_text(trial.config)}",
              file=sys.stderr, flush=True)


def _ensure_ray(plan: Plan) -> bool:
    """Join `ray.address` (or RAY_ADDRESS) as the engine does, else start a private local Ray; True when started."""
    import ray

    from unlearn import engine

    if ray.is_initialized():
        return False
    if plan.spec.ray.address or os.environ.get("RAY_ADDRESS"):
        return engine.connect(plan.spec.ray)
    num_cpus = None  # in-process trials: Ray counts this machine's CPUs
    if not plan.in_process:  # as the engine does: room for one trial's workers even on a small machine
        from unlearn.ray_session import lean_train_env

        lean_train_env()
        rs = plan.spec.ray
        num_cpus = max(os.cpu_count() or 1, math.ceil(rs.num_workers * rs.cpus_per_worker + DRIVER_CPU))
    # address "local": a fresh instance, never a stray cluster another process left registered on this machine.
    # ray.init replaces the driver's SIGTERM handler with sys.exit; the CLI's (a stop ends the search like
    # Ctrl-C, resumable with --resume) is put back.
    import signal
    import threading

    on_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if on_main else None
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)
    return True


def _capacity(plan: Plan) -> tuple[dict[str, float], int]:
    """(resources one trial's Tune function reserves, trials the cluster can hold at once)."""
    import ray

    cluster = ray.cluster_resources()
    if plan.in_process:
        per_trial = {"cpu": 1.0}
        fits = int(cluster.get("CPU", 1) // 1)
    else:
        rs = plan.spec.ray
        per_trial = {"cpu": DRIVER_CPU}
        fits = int(cluster.get("CPU", 1) // (rs.num_workers * rs.cpus_per_worker + DRIVER_CPU))
        if rs.use_gpu:
            fits = min(fits, int(cluster.get("GPU", 0) // rs.num_workers))
        if fits < 1:
            raise BadInput(f"ray.num_workers: a trial needs {rs.num_workers} workers x {rs.cpus_per_worker} CPU, "
                           f"the cluster has {cluster.get('CPU', 0)} CPU")
    return per_trial, max(1, min(plan.spec.tune.max_concurrent, fits))


def _tuner(plan: Plan, trainable, out_dir: Path, max_concurrent: int, restore: bool):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if restore:
        return tune.Tuner.restore(str((out_dir / SEARCH_DIR).resolve()), trainable, resume_unfinished=True, resume_errored=True)
    t = plan.spec.tune
    defaults = {k: _plain(v) for k, v in plan.defaults.items()}
    points = [defaults] if all(plan.space[k].contains(v) for k, v in defaults.items()) else None
    if t.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        search = ConcurrencyLimiter(OptunaSearch(points_to_evaluate=points, seed=plan.spec.seed), max_concurrent)
    else:
        from ray.tune.search import BasicVariantGenerator

        search = BasicVariantGenerator(points_to_evaluate=points, max_concurrent=max_concurrent,
                                       random_state=plan.spec.seed)
    scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=t.reports, grace_period=1, reduction_factor=2)
                 if t.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space={name: dim.domain() for name, dim in plan.space.items()},
        tune_config=tune.TuneConfig(metric=plan.metric, mode=t.mode, search_alg=search, scheduler=scheduler,
                                    num_samples=plan.num_samples, reuse_actors=plan.in_process),
        run_config=tune.RunConfig(name=SEARCH_DIR, storage_path=str(out_dir.resolve()), verbose=0,
                                  callbacks=[TrialProgress(plan.metric, t.mode, t.reports, plan.num_samples)]),
    )


class _State:
    """DIR/tune-state.json: the resolved spec, method and sample count, and the MLflow run ids."""

    def __init__(self, out_dir: Path) -> None:
        self.path = out_dir / STATE_FILE
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def save(self) -> None:
        from unlearn.atomic import write_json_atomic

        write_json_atomic(self.data, self.path)


def run_tune(spec: JobSpec, method: str | None = None, num_samples: int | None = None,
             out_dir: Path | None = None, capture: tuple[str, ...] = ()) -> dict[str, Any]:
    """Search `method`'s params on `spec`'s job; writes DIR/tune.json and DIR/best.yaml, returns tune.json.

    `capture` names method attributes (a saliency mask, a threshold) each trial writes with its result
    under DIR/trials/<trial id>/results/.
    """
    from unlearn.job import check_writable

    plan = plan_search(spec, method, num_samples)
    out_dir = Path(out_dir or Path("results") / f"{spec.name}-tune-{plan.method}")
    check_writable(out_dir)
    state = _State(out_dir)
    if state.data:
        previous = out_dir / "tune.json"
        if not previous.is_file() or json.loads(previous.read_text()).get("interrupted"):
            raise BadInput(f"{out_dir} holds an interrupted search: resume it with `unlearn tune --resume {out_dir}` "
                           f"or choose another --out")
        print(f"replacing the finished search in {out_dir}", file=sys.stderr, flush=True)
        for name in (SEARCH_DIR, TRIALS_DIR, "train"):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    state.data = {"spec": spec.model_dump(mode="json"), "method": plan.method, "num_samples": plan.num_samples,
                  "mlflow": {}}
    state.save()
    return _search(plan, out_dir, state, restore=False, capture=capture)


def resume_tune(out_dir: Path) -> dict[str, Any]:
    """Continue the search saved in `out_dir` (finished trials are kept, not run again)."""
    out_dir = Path(out_dir)
    state = _State(out_dir)
    if not state.data or not (out_dir / SEARCH_DIR).is_dir():
        raise BadInput(f"--resume {out_dir}: no search to resume there (expected {STATE_FILE} and {SEARCH_DIR}/)")
    plan = plan_search(validate(state.data["spec"]), state.data["method"], state.data["num_samples"])
    print(f"resuming the {plan.method} search in {out_dir}", file=sys.stderr, flush=True)
    return _search(plan, out_dir, state, restore=True)


def _search(plan: Plan, out_dir: Path, state: _State, restore: bool, capture: tuple[str, ...] = ()) -> dict[str, Any]:
    import ray
    from ray import tune

    from unlearn.atomic import write_json_atomic
    from unlearn.evaluation import ClassificationEvaluator, build_evaluator
    from unlearn.execution import new_model
    from unlearn.faults import armed_env
    from unlearn.job import prepare
    from unlearn.tracking import Tracker, flatten, make_tracker
    from unlearn.training import original_model, original_request

    spec, t0 = plan.spec, time.perf_counter()
    started = _ensure_ray(plan)
    try:
        # Every number the search reads uses the validation rows as its non-members (TA, MIA, KL): what the
        # reported tables use (the test split) is never read here.
        prep = prepare(spec)
        spec = prep.spec  # as the task bound it (a language model's tokenizer)
        prep = replace(prep, splits=prep.splits.for_tuning())
        executor = _LazyExecutor(spec)
        weights, _ = original_model(spec, prep.splits, prep.input_shape, executor, prep.task)
        classifier = prep.task == "classification"
        # classifiers: scored on the driver and by each trial's workers from the splits; other tasks (language
        # models): the task's evaluator, built here once and shipped to every trial's workers
        evaluator = (ClassificationEvaluator(prep.splits, mia=spec.eval.mia, seed=spec.seed) if classifier
                     else build_evaluator(prep.task, prep.splits, spec, prep.dataset))
        original_metrics, original_out = evaluator.evaluate(new_model(replace(original_request(spec, prep.splits, prep.input_shape, prep.task), initial_state=weights)))
        targets = proxy_targets(prep.splits, original_metrics, original_out, spec.seed) if classifier else None
        references: dict[str, dict[str, float]] = {"original": {**original_metrics,
                                                                "proxy": proxy_objective(original_metrics, targets)}}
        reference = None
        if plan.metric == "gap":
            retrain_entry = next((m for m in spec.methods if m.name == "retrain"), MethodSpec(name="retrain"))
            retrain_state, request = _retrain_reference(prep, retrain_entry, weights, executor)
            model = new_model(request)
            model.load_state_dict(retrain_state)
            reference = evaluator.evaluate(model)
            references["retrain"] = {**reference[0], **evaluator.compare(*reference, *reference),
                                     "proxy": proxy_objective(reference[0], targets)}
            references["original"].update(evaluator.compare(original_metrics, original_out, *reference))

        per_trial, max_concurrent = _capacity(plan)
        shared = Shared(prep=replace(prep, dataset=None, methods=[]), state=weights, method=plan.method,
                        fixed=plan.fixed, reports=spec.tune.reports, mia=spec.eval.mia, seed=spec.seed,
                        targets=targets, reference=reference, out_dir=str(out_dir.resolve()),
                        evaluator=None if classifier else evaluator,
                        ray_spec=None if plan.in_process else spec.ray,
                        failure_value=PENALTY if spec.tune.mode == "min" else 0.0, capture=tuple(capture),
                        fail=armed_env())
        shared_ref = ray.put(shared)
        trainable = tune.with_resources(tune.with_parameters(run_trial, shared_refs=[shared_ref]), per_trial)

        tracker = make_tracker(spec.tracking, spec.name)
        runs = state.data.setdefault("mlflow", {})
        if not runs.get("parent"):
            runs["parent"] = tracker.start(f"tune-{plan.method}", tags={"unlearn.kind": "tune", "unlearn.method": plan.method})
            tracker.params(runs["parent"], {**flatten(spec.model_dump(mode="json")), "tune.method": plan.method,
                                            "tune.num_samples": plan.num_samples,
                                            **{f"tune.space.{k}": json.dumps(d.describe()) for k, d in plan.space.items()}})
            tracker.text(runs["parent"], yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False), "spec.yaml")
            state.save()
        elif isinstance(tracker, Tracker):
            tracker.client.update_run(runs["parent"], status="RUNNING")
        print(f"tune {spec.name}: {plan.method}, {plan.num_samples} trials ({spec.tune.search}, {spec.tune.scheduler}, "
              f"{'in-process' if plan.in_process else f'{spec.ray.num_workers} Ray Train workers'} per trial, "
              f"{max_concurrent} at a time), {plan.metric} {spec.tune.mode}; searching "
              f"{', '.join(plan.space)}", file=sys.stderr, flush=True)

        grid = _tuner(plan, trainable, out_dir, max_concurrent, restore).fit()
        rows = _trial_rows(grid, out_dir)
        interrupted = len(rows) < plan.num_samples or any(r["status"] == "unfinished" for r in rows)
        best = _best(rows, plan.metric, spec.tune.mode)
        payload = {
            "job": spec.name, "method": plan.method, "metric": plan.metric, "mode": spec.tune.mode,
            "search": spec.tune.search, "scheduler": spec.tune.scheduler, "num_samples": plan.num_samples,
            "in_process": plan.in_process, "max_concurrent": max_concurrent, "reports": spec.tune.reports,
            "space": {k: d.describe() for k, d in plan.space.items()}, "fixed": plan.fixed,
            "defaults": {k: _plain(v) for k, v in plan.defaults.items()},
            "proxy_targets": {k: getattr(targets, k) for k in ("FA", "RA", "TA", "MIA", "labels_leave")}
            if targets is not None else None,
            "reference": references,
            "splits": SELECTED_ON | {"validation_rows": len(prep.splits.validation),
                                     "validation_fraction": spec.eval.validation_fraction},
            "interrupted": interrupted,
            "counts": {s: sum(r["status"] == s for r in rows)
                       for s in ("completed", "early_stopped", "diverged", "error", "unfinished")},
            "best": None, "wall_seconds": None, "trials": rows,
            "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                       "parent_run": runs["parent"] or None, "runs": runs.setdefault("trials", {})},
        }
        if best is not None:
            params = {**plan.fixed, **best["config"]}
            payload["best"] = {"trial_id": best["trial_id"], "config": best["config"], "params": params,
                               "metrics": best["metrics"], "status": best["status"]}
            text = yaml.safe_dump(best_spec(plan, params), sort_keys=False)
            # The trial's number, not its id (Tune draws a random id prefix per search): same search, same file.
            number = best["trial_id"].rsplit("_", 1)[-1]
            note = (f"# unlearn tune: best of {len(rows)} {plan.method} trials (trial {number}, "
                    f"{plan.metric} {_short(best['metrics'].get(plan.metric))}); run it with `unlearn run best.yaml`\n"
                    f"# selected on the validation split ({len(prep.splits.validation)} held-out test rows, "
                    f"eval.validation_fraction {spec.eval.validation_fraction}); the reported test split was not read\n")
            write_text_atomic(note + text, out_dir / "best.yaml")
        _log_mlflow(tracker, plan, rows, payload, out_dir, state)
        state.save()
        payload["wall_seconds"] = round(time.perf_counter() - t0, 1)
        write_json_atomic(payload, out_dir / "tune.json")
        if runs.get("parent"):
            tracker.artifact(runs["parent"], out_dir / "tune.json")
            if best is not None:
                tracker.artifact(runs["parent"], out_dir / "best.yaml")
            tracker.end(runs["parent"], "KILLED" if interrupted else "FINISHED")
    finally:
        if started:
            ray.shutdown()
    print(format_trials(rows, plan), flush=True)
    counts = payload["counts"]
    print(f"{len(rows)} trials: {counts['completed']} completed, {counts['early_stopped']} stopped early by "
          f"{spec.tune.scheduler.upper()}, {counts['diverged']} diverged, {counts['error']} failed "
          f"({payload['wall_seconds']:.0f}s)", flush=True)
    if interrupted:
        print(f"interrupted: resume with `unlearn tune --resume {out_dir}`", flush=True)
    elif best is not None:
        print(f"best: {best['trial_id']} {plan.metric}={_short(best['metrics'].get(plan.metric))} "
              f"{json.dumps(best['config'])}", flush=True)
        print(f"results: {out_dir / 'tune.json'}, {out_dir / 'best.yaml'}", flush=True)
    else:
        first = next((r["error"] for r in rows if r["error"]), None)
        raise RuntimeError(f"no trial reported {plan.metric}" + (f" (first error: {first})" if first else "")
                           + f"; see {out_dir / 'tune.json'}")
    return payload
