"""Ray Tune search over one method's declared parameters (`unlearn tune JOB.yaml --method M`).

Search space: every parameter of M that declares a `search` range (params.py), minus those the
spec's entry for M pins in `methods[].params`, plus whatever `tune.space` names (which always wins
and may add parameters). Each range is checked against the parameter's hard bounds before any work:
an unknown parameter or a range outside the declared one ends with one line (exit code 2).

Objectives (both are reported by every trial at every report, with FA/RA/TA/MIA and KL):

* `gap`: Avg.D to the retrain reference, mean(|FA−FA_rt|, |RA−RA_rt|, |TA−TA_rt|, |MIA−MIA_rt|).
  The reference is retrained once per job (cached by content hash like the original model),
  evaluated once, and shared with every trial through the Ray object store.
* `proxy`: retrain-free, for users who cannot afford retraining. With the original model's
  RA₀, TA₀ (measured once):

      proxy = mean( |FA − FA*|, max(0, RA₀ − RA), max(0, TA₀ − TA), |MIA − MIA*| )

  where, if no retained sample carries a label of the target (the target's labels leave the
  model's output space: class forgetting, concept all_matched / target / data), FA* = 0 and
  MIA* = 100 (a retrained model never predicts those labels and the attack calls all of the
  target non-member); otherwise (random forgetting, concept `model` mismatch) FA* = TA₀ (a
  retrained model treats the target like unseen test data) and MIA* = the attack's non-member
  rate on held-out test data under the original model (cross-fitted: the attack is trained on
  retain vs one half of the test set and scored on the other half, both ways, averaged).
  Percent units like gap; 0 is ideal; the MIA term drops out when `eval.mia` is off. The retain
  and test terms are one-sided: a method is not rewarded for beating the original there.

Trials report `tune.reports` times, evenly over their run (ASHA acts on these reports, with
`training_iteration` = reports so far): in-process (`tune.in_process`, or `ray.enabled: false`)
each trial runs the method in its Tune actor (1 CPU); otherwise each trial runs a Ray Train
`TorchTrainer` with `ray.num_workers` workers whose rank 0 evaluates and reports through
`TuneReportCallback`, while the Tune function itself reserves almost no CPU (and aborts its Train
run when Tune stops the trial, so the workers' CPUs are freed at once). Concurrency is capped by
what the cluster can hold. A trial whose loss diverges reports a penalty (100) and ends.

Outputs in DIR: `tune.json` (every trial: config, final metrics, status, reports, executions),
`best.yaml` (the job spec with the best completed trial's params, runnable with `unlearn run`),
`trials.png`; MLflow: a parent run (tag unlearn.kind=tune) with one nested run per trial, the best
tagged `unlearn.best=true`. `unlearn tune --resume DIR` continues an interrupted search
(Ctrl-C, SIGUSR1, a lost driver) via `Tuner.restore`: finished trials are not run again.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
import yaml
from ray.train import UserCallback
from ray.tune import Callback

from unlearn.atomic import torch_save_atomic, write_text_atomic
from unlearn.errors import BadInput, SpecError
from unlearn.spec import JobSpec, MethodSpec, validate

STATE_FILE = "tune-state.json"
SEARCH_DIR = "search"  # Tune's experiment folder inside DIR
TRIALS_DIR = "trials"  # one execution log per trial: a line per start, one at the final report
KINDS = ("loguniform", "uniform", "choice", "randint")
SPACE_KEYS = ("kind", "low", "high", "values")
PENALTY = 100.0  # reported by a diverged trial (gap and proxy are percentages)
REPORTED = ("FA", "RA", "TA", "MIA", "gap", "KL", "proxy")
TOP_ROWS = 5
DRIVER_CPU = 0.01  # what an engine trial's Tune function reserves (Tune refuses 0; its TorchTrainer holds the CPUs)
ABORT_TIMEOUT_S = 60.0  # how long a stopped engine trial waits for its Train run to release its workers
MAILBOX_WAIT_S = 2.0  # how long it waits for the run's controller handle (none: the run never reported)


# ---------------------------------------------------------------------------------------------------
# the search space


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
    if task != "classification":
        raise SpecError("model.name", f"unlearn tune searches classification models (got {spec.model.name!r})")
    if task not in REGISTRY[name].tasks:
        raise SpecError(where, f"method {name!r} does not support {task} models")
    if num_samples is not None and num_samples < 1:
        raise BadInput(f"--num-samples must be at least 1 (got {num_samples})")
    index = next((i for i, m in enumerate(spec.methods) if m.name == name), None)
    entry = spec.methods[index] if index is not None else MethodSpec(name=name)
    fixed = dict(entry.params)
    untuned = build(name, fixed, field=f"methods.{index}.params" if index is not None else "params").params
    space = search_space(name, fixed, spec.tune.space)
    defaults = {p: getattr(untuned, p) for p in space}
    return Plan(spec, name, entry, fixed, space, defaults, num_samples or spec.tune.num_samples,
                in_process=spec.tune.in_process or not spec.ray.enabled)


# ---------------------------------------------------------------------------------------------------
# objectives


@dataclass
class ProxyTargets:
    """What a retrained model would score, estimated without retraining (see the module docstring)."""

    FA: float
    RA: float
    TA: float
    MIA: float | None
    labels_leave: bool  # no retained sample carries a target label


def proxy_targets(splits, metrics: dict[str, float], out, seed: int = 0) -> ProxyTargets:
    """Proxy targets from the original model's metrics and outputs (no retraining)."""
    from unlearn.evaluation.mia import mia_efficacy

    leave = bool(splits.target_labels) and not np.isin(splits.target_labels, splits.retain.y).any()
    mia = None
    if metrics.get("MIA") is not None and math.isfinite(metrics["MIA"]):
        if leave:
            mia = 100.0
        else:
            order = np.random.default_rng(seed).permutation(len(splits.test.y))
            halves = order[: len(order) // 2], order[len(order) // 2:]
            rates = [mia_efficacy(out.retain, splits.retain.y, out.test[a], splits.test.y[a],
                                  out.test[b], splits.test.y[b], seed=seed) for a, b in (halves, halves[::-1])]
            mia = float(np.mean(rates))
    return ProxyTargets(FA=0.0 if leave else metrics["TA"], RA=metrics["RA"], TA=metrics["TA"], MIA=mia,
                        labels_leave=leave)


def proxy_objective(metrics: dict[str, float], targets: ProxyTargets) -> float:
    """Retrain-free objective: mean(|FA−FA*|, max(0, RA₀−RA), max(0, TA₀−TA), |MIA−MIA*|)."""
    terms = [abs(metrics["FA"] - targets.FA), max(0.0, targets.RA - metrics["RA"]), max(0.0, targets.TA - metrics["TA"])]
    if targets.MIA is not None and metrics.get("MIA") is not None and math.isfinite(metrics["MIA"]):
        terms.append(abs(metrics["MIA"] - targets.MIA))
    return float(np.mean(terms))


@dataclass
class Shared:
    """What every trial needs, put once in the Ray object store."""

    prep: Any  # job.Prepared without the dataset images (splits are labels and row ids)
    state: dict  # the original model's weights
    method: str
    fixed: dict[str, Any]
    reports: int
    mia: bool
    seed: int
    targets: ProxyTargets
    reference: tuple[dict[str, float], Any] | None  # retrain's (metrics, outputs) for metric gap
    out_dir: str
    ray_spec: Any | None = None  # RaySpec for engine trials, None for in-process ones
    failure_value: float = PENALTY
    capture: tuple[str, ...] = ()  # method attributes a trial writes with its result (tests compare them)
    fail: dict[str, str] | None = None  # test-only failure injection armed on the driver (faults.py)


def report_index(epoch: int, epochs: int, reports: int) -> int:
    """How many of a run's `reports` evenly spaced reports are due after `epoch` of `epochs`."""
    return min(reports, epoch * reports // max(epochs, 1))


class TrialReports:
    """The engine's per-epoch hook in a trial: at each due report, evaluate (every worker its share) and
    add gap/KL vs retrain and the proxy (rank 0), for Tune's scheduler."""

    def __init__(self, shared: Shared) -> None:
        self.shared, self.done = shared, 0

    def due(self, summary) -> bool:
        due = report_index(summary.epoch, summary.epochs, self.shared.reports)
        final = summary.step >= summary.total_steps
        if due <= self.done and not final:
            return False
        self.done = due
        return True

    def metrics(self, evaluator, ctx, summary) -> dict[str, Any] | None:
        metrics, out = evaluator.evaluate(ctx.module)
        if metrics is None:  # not rank 0
            return None
        if self.shared.reference is not None:
            from unlearn.evaluation import versus_reference

            metrics.update(versus_reference(metrics, out, *self.shared.reference))
        else:
            metrics.update(gap=float("nan"), KL=float("nan"))
        metrics["proxy"] = proxy_objective(metrics, self.shared.targets)
        return {**metrics, "progress": summary.step / summary.total_steps, "final": summary.step >= summary.total_steps,
                "seconds": summary.seconds, "diverged": False}


def _penalty(shared: Shared) -> dict[str, Any]:
    return {**{k: shared.failure_value for k in ("gap", "proxy")}, "final": True, "diverged": True, "progress": 1.0}


# ---------------------------------------------------------------------------------------------------
# trials (run inside Ray Tune actors): one configuration through the engine's per-worker function


def _log_execution(shared: Shared, trial_id: str, event: str, metrics: dict[str, Any] | None = None) -> None:
    """Append one line to the trial's execution log (how resume is audited); best effort.

    The final line carries the final metrics as JSON, so a resumed search can replay a trial that
    ended after Tune last saved its experiment state instead of running it again.
    """
    try:
        folder = Path(shared.out_dir) / TRIALS_DIR
        folder.mkdir(parents=True, exist_ok=True)
        payload = f" {json.dumps({k: _plain(v) for k, v in metrics.items()})}" if metrics is not None else ""
        with open(folder / f"{trial_id}.log", "a") as f:
            f.write(f"{event} {time.strftime('%Y-%m-%dT%H:%M:%S')} pid={os.getpid()}{payload}\n")
    except (OSError, TypeError, ValueError):
        pass


def _logged_final(shared: Shared, trial_id: str) -> dict[str, Any] | None:
    """The final metrics an earlier execution of this trial logged, if it got that far."""
    path = Path(shared.out_dir) / TRIALS_DIR / f"{trial_id}.log"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        event, _, rest = line.partition(" ")
        if event in ("final", "diverged") and "{" in rest:
            try:
                return json.loads(rest[rest.index("{"):])
            except ValueError:
                return None
    return None


def trial_job(shared: Shared, config: dict[str, Any], trial_id: str):
    """The engine job of one trial: a queue of one run, the method with this configuration."""
    from unlearn.job import request_for
    from unlearn.worker import GroupJob

    splits = shared.prep.splits
    entry = MethodSpec(name=shared.method, params={**shared.fixed, **config})
    request = request_for(shared.prep, entry, None)
    return GroupJob(requests=[request], base_state=shared.state,
                    eval_splits={"target": splits.target, "retain": splits.retain, "test": splits.test},
                    mia=shared.mia, seed=shared.seed, storage=str(Path(shared.out_dir) / TRIALS_DIR / trial_id),
                    capture=shared.capture, epoch_metrics=TrialReports(shared))


def run_trial(config: dict[str, Any], shared_refs=()) -> None:
    """The Tune function trainable: one configuration of the method, reported `reports` times.

    `shared_refs` holds the one object-store reference to `Shared` (in a list, so Tune hands the
    reference itself to the trial and the trial can pass it on to its Ray Train workers).
    """
    import ray
    from ray import tune

    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")  # object-store arrays
    shared: Shared = ray.get(shared_refs[0])
    trial_id = tune.get_context().get_trial_id()
    finished = _logged_final(shared, trial_id)
    if finished is not None:
        # the search stopped between this trial's last report and Tune saving that it ended:
        # its work is done, so hand Tune the logged result rather than run it again
        tune.report(finished)
        return
    _log_execution(shared, trial_id, "start")
    job = trial_job(shared, config, trial_id)
    if shared.ray_spec is None:
        _in_process(shared, job, trial_id)
    else:
        _on_engine(shared, job, trial_id)


def _in_process(shared: Shared, job, trial_id: str) -> None:
    """The trial in this Tune actor: the engine's per-worker function with the local comm."""
    import torch
    from ray import tune

    from unlearn.comm import LocalComm
    from unlearn.engine import _call
    from unlearn.run_queue import RunQueue
    from unlearn.worker import WorkerEnv, serve

    torch.set_num_threads(1)
    reports = job.epoch_metrics

    def on_epoch(summary, ctx, method, request, evaluator) -> None:
        if reports.due(summary):
            metrics = reports.metrics(evaluator, ctx, summary)
            if metrics.get("final"):  # logged first: a scheduler may stop the trial at its last report
                _log_execution(shared, trial_id, "final", metrics)
            tune.report(metrics)

    queue = RunQueue([{"label": r.label, "role": r.role} for r in job.requests], base_ready=True)
    serve(job, queue, WorkerEnv(comm=LocalComm(), call=_call, on_epoch=on_epoch, verbose=False))
    _report_failure(shared, queue, trial_id, tune.report)


def _report_failure(shared: Shared, queue, trial_id: str, report) -> None:
    """A trial whose run failed (a NaN loss) reports the penalty, so the search ranks it last and goes on."""
    finished = dict(queue.take_finished())
    if any("error" in record for record in finished.values()):
        penalty = _penalty(shared)
        _log_execution(shared, trial_id, "diverged", penalty)
        report(penalty)


def _on_engine(shared: Shared, job, trial_id: str) -> None:
    """The trial as a Ray Train worker group running the engine's `group_loop`; rank 0's reports reach
    Tune via TuneReportCallback. Checkpoints and restarts are the engine's."""
    import ray
    from ray import tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback
    from ray.util.queue import Queue

    from unlearn.engine import DEFAULT_REPORT_EVERY_S, group_loop
    from unlearn.run_queue import RunQueue

    ray_spec = shared.ray_spec
    mailbox = Queue(maxsize=1, actor_options={"num_cpus": 0})
    _TRAIN_RUNS[trial_id] = mailbox
    queue = ray.remote(RunQueue).options(num_cpus=0).remote(
        [{"label": r.label, "role": r.role} for r in job.requests], True)
    job.base_state = ray.put(job.base_state)
    config = {"job": ray.put(job), "queue": queue, "group": 0, "strategy": ray_spec.strategy,
              "max_failures": ray_spec.max_failures, "fail": shared.fail or {},
              "report_every_s": DEFAULT_REPORT_EVERY_S}
    trainer = TorchTrainer(
        group_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=ray_spec.num_workers, use_gpu=ray_spec.use_gpu,
                                     resources_per_worker={"CPU": ray_spec.cpus_per_worker}),
        run_config=RunConfig(name=f"trial-{trial_id}", storage_path=str(Path(shared.out_dir).resolve() / "train"),
                             failure_config=FailureConfig(max_failures=ray_spec.max_failures + 1),
                             checkpoint_config=CheckpointConfig(num_to_keep=1),
                             # SendController first: the handle is posted before Tune sees a result to stop on
                             callbacks=[SendController(mailbox), TuneReportCallback()]))
    try:
        trainer.fit()
        finished = dict(ray.get(queue.take_finished.remote()))
        record = finished.get(0, {})
        if "error" in record:
            penalty = _penalty(shared)
            _log_execution(shared, trial_id, "diverged", penalty)
            tune.report(penalty)
        elif record.get("metrics") is not None:
            _log_execution(shared, trial_id, "final", record["metrics"])
    finally:
        ray.kill(queue)
        if _TRAIN_RUNS.pop(trial_id, None) is not None:
            mailbox.shutdown()


_TRAIN_RUNS: dict[str, Any] = {}  # trial id -> mailbox holding its running Train controller (in the trial's actor)


class SendController(UserCallback):
    """Runs in the Train controller: posts the controller's own handle to the trial once, at the first report."""

    def __init__(self, mailbox) -> None:
        self.mailbox, self.sent = mailbox, False

    def after_report(self, run_context, metrics, checkpoint) -> None:
        import ray

        if not self.sent:
            self.mailbox.put(ray.get_runtime_context().current_actor)
            self.sent = True


class AbortTrainOnStop:
    """Mixin of the trial's Tune trainable: when Tune stops an engine trial (ASHA, Ctrl-C), abort its Train run.

    Tune ends the trial's actor, and with it the Train controller, but not the placement group that
    holds the workers' CPUs: Ray Train's cleaner frees it only through the dashboard's state API,
    which a local session may lack (or not reach, with several Ray instances on one machine), and the
    next trials would wait for CPUs until the session ends. An aborted run frees its own.
    """

    def cleanup(self) -> None:
        import ray

        mailbox = _TRAIN_RUNS.pop(getattr(self, "trial_id", None), None)
        if mailbox is not None:
            try:
                controller = mailbox.get(timeout=MAILBOX_WAIT_S)
                ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
            except Exception:  # no report yet (nothing started), or the run already ended: nothing to free
                pass
            mailbox.shutdown()
        super().cleanup()


run_trial.__mixins__ = (AbortTrainOnStop,)  # read by Tune when it wraps the function into a Trainable class


# ---------------------------------------------------------------------------------------------------
# the search (driver side)


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
        how = ("diverged" if last.get("diverged") else "completed" if last.get("final")
               else f"stopped early at report {last.get('training_iteration', 0)}/{self.reports}")
        print(f"[tune] trial {self._done(trials, trial)}/{self.total} {trial.trial_id}: {how}, {self.metric}={_short(value)} "
              f"(best {_short(self.best)}) {_config_text(trial.config)}", file=sys.stderr, flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"[tune] trial {self._done(trials, trial)}/{self.total} {trial.trial_id}: ERROR {_config_text(trial.config)}",
              file=sys.stderr, flush=True)


def _config_text(config: dict[str, Any]) -> str:
    return " ".join(f"{k}={_short(v)}" for k, v in config.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return "-" if not math.isfinite(value) else f"{value:.4g}"
    return "-" if value is None else str(value)


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON, YAML and pydantic)."""
    return value.item() if hasattr(value, "item") else value


def _retrain_reference(prep, entry: MethodSpec, state, executor):
    """Retrain weights, cached by content hash next to the original model (once per job)."""
    import torch

    from unlearn.job import request_for
    from unlearn.training import original_key

    spec = prep.spec
    request = request_for(prep, entry, state)
    payload = {"original": original_key(spec, prep.splits), "forget": spec.forget.model_dump(mode="json"),
               "params": request.params}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(spec.cache_dir) / "models" / f"retrain-{key}.pt"
    if path.is_file():
        print(f"retrain reference: cached ({path})", file=sys.stderr, flush=True)
        return torch.load(path, map_location="cpu"), request
    print("retrain reference: training once for this job (shared by every trial)", file=sys.stderr, flush=True)
    out = executor.run(request)
    torch_save_atomic(out.state, path)
    return out.state, request


class _LazyExecutor:
    """The job's executor, built on first use: nothing starts when the original and retrain are cached."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec, self.executor = spec, None

    def run(self, request):
        from unlearn.job import make_executor

        if self.executor is None:
            self.executor = make_executor(self.spec)
        return self.executor.run(request)


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
        engine._lean_train_env()
        rs = plan.spec.ray
        num_cpus = max(os.cpu_count() or 1, math.ceil(rs.num_workers * rs.cpus_per_worker + DRIVER_CPU))
    # address "local": a fresh instance, never a stray cluster another process left registered on this machine
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
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


def _status(trial_status: str, metrics: dict[str, Any], error: Any) -> str:
    if trial_status == "ERROR" or error is not None:
        return "error"
    if metrics.get("diverged"):
        return "diverged"
    if metrics.get("final"):
        return "completed"
    if trial_status == "TERMINATED":
        return "early_stopped"
    return "unfinished"


def _executions(out_dir: Path, trial_id: str) -> int:
    path = out_dir / TRIALS_DIR / f"{trial_id}.log"
    return sum(1 for line in path.read_text().splitlines() if line.startswith("start")) if path.is_file() else 0


def _trial_rows(grid, out_dir: Path) -> list[dict[str, Any]]:
    """One row per trial of a ResultGrid: config, final metrics, status, reports, history.

    Statuses come from the experiment state Tune saved (an interrupted trial is saved as running or
    pending; in memory Tune has already marked it terminated while cleaning up).
    """
    from ray.tune import ExperimentAnalysis

    trials = {t.trial_id: t for t in ExperimentAnalysis(str((out_dir / SEARCH_DIR).resolve())).trials}
    rows = []
    for result in grid:
        metrics = dict(result.metrics or {})
        trial_id = metrics.get("trial_id") or Path(result.path).name
        trial = trials.get(trial_id)
        status = _status(trial.status if trial else "", metrics, result.error)
        history = []
        frame = result.metrics_dataframe
        if frame is not None and len(frame):
            keep = [c for c in ("training_iteration", *REPORTED, "progress") if c in frame.columns]
            history = [{k: _plain(v) for k, v in r.items()} for r in frame[keep].to_dict("records")]
        rows.append({
            "trial_id": trial_id,
            "config": {k: _plain(v) for k, v in (trial.config if trial else result.config or {}).items()},
            "status": status,
            "metrics": {k: _plain(metrics[k]) for k in REPORTED if k in metrics},
            "reports": int(metrics.get("training_iteration", 0) or 0),
            "seconds": _plain(metrics.get("seconds")),
            "executions": _executions(out_dir, trial_id),
            "error": str(result.error).strip().splitlines()[-1][:300] if result.error is not None else None,
            "history": history,
        })
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def _best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    """The best completed trial (an early-stopped trial's metric is from part of a run)."""
    def value(r):
        v = r["metrics"].get(metric)
        return v if v is not None and math.isfinite(v) else None

    for pool in ([r for r in rows if r["status"] == "completed"], [r for r in rows if r["status"] == "early_stopped"]):
        scored = [r for r in pool if value(r) is not None]
        if scored:
            return (min if mode == "min" else max)(scored, key=value)
    return None


def best_spec(plan: Plan, params: dict[str, Any]) -> dict[str, Any]:
    """The job spec with the tuned method's params replaced by `params`, retrain kept as the reference."""
    data = plan.spec.model_dump(mode="json")
    retrain = next((m.model_dump(mode="json", exclude_none=True) for m in plan.spec.methods if m.name == "retrain"),
                   {"name": "retrain"})
    entry = {"name": plan.method, "params": params}
    if plan.entry.label:
        entry["label"] = plan.entry.label
    data["methods"] = [retrain, entry]
    data["tune"]["method"] = plan.method
    validate(data)
    return data


def plot_trials(rows: list[dict[str, Any]], plan: Plan, path: Path) -> Path:
    """Objective vs each searched parameter, one subplot per parameter (log x for loguniform)."""
    from unlearn import plots  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt

    names = list(plan.space)
    cols = min(len(names), 3)
    lines = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.4 * lines), squeeze=False)
    styles = {"completed": ("o", "tab:blue"), "early_stopped": ("x", "tab:orange"), "diverged": ("s", "tab:red")}
    best = _best(rows, plan.metric, plan.spec.tune.mode)
    for ax, name in zip(axes.flat, names):
        dim = plan.space[name]
        for status, (marker, color) in styles.items():
            pts = [(r["config"].get(name), r["metrics"].get(plan.metric)) for r in rows if r["status"] == status]
            pts = [(x, y) for x, y in pts if x is not None and y is not None and math.isfinite(y)]
            if dim.kind == "choice":
                pts = [(list(dim.values).index(x), y) for x, y in pts if x in dim.values]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, color=color, label=status.replace("_", " "), alpha=0.8)
        if best is not None and name in best["config"]:
            x = best["config"][name]
            x = list(dim.values).index(x) if dim.kind == "choice" else x
            ax.scatter([x], [best["metrics"][plan.metric]], s=160, facecolors="none", edgecolors="black", label="best")
        if dim.kind == "choice":
            ax.set_xticks(range(len(dim.values)))
            ax.set_xticklabels([str(v) for v in dim.values], rotation=30, fontsize=8)
        elif dim.kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(name)
        ax.set_ylabel(plan.metric)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    if axes.flat[0].get_legend_handles_labels()[0]:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"{plan.spec.name}: {plan.method} trials ({plan.metric}, {plan.spec.tune.mode})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_trials(rows: list[dict[str, Any]], plan: Plan, top: int = TOP_ROWS) -> str:
    """The best trials as an aligned table: metrics, then the searched params."""
    metric, mode = plan.metric, plan.spec.tune.mode
    scored = [r for r in rows if r["metrics"].get(metric) is not None and math.isfinite(r["metrics"][metric])]
    scored.sort(key=lambda r: r["metrics"][metric], reverse=mode == "max")
    header = ["trial", "status", *REPORTED, *plan.space]
    table = [header] + [[r["trial_id"], r["status"], *(_short(r["metrics"].get(k)) for k in REPORTED),
                         *(_short(r["config"].get(k)) for k in plan.space)] for r in scored[:top]]
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    text = ["  ".join(str(v).ljust(w) if i < 2 else str(v).rjust(w) for i, (v, w) in enumerate(zip(line, widths)))
            for line in table]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text) if scored else "(no trial reported)"


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

    from unlearn.evaluation import ClassificationEvaluator
    from unlearn.execution import new_model
    from unlearn.atomic import write_json_atomic
    from unlearn.job import prepare
    from unlearn.tracking import Tracker, flatten, make_tracker
    from unlearn.faults import armed_env
    from unlearn.training import original_model, original_request

    spec, t0 = plan.spec, time.perf_counter()
    started = _ensure_ray(plan)
    try:
        prep = prepare(spec)
        executor = _LazyExecutor(spec)
        weights, _ = original_model(spec, prep.splits, prep.input_shape, executor, prep.task)
        evaluator = ClassificationEvaluator(prep.splits, mia=spec.eval.mia, seed=spec.seed)
        original_metrics, original_out = evaluator.evaluate(new_model(replace(original_request(spec, prep.splits, prep.input_shape, prep.task), initial_state=weights)))
        targets = proxy_targets(prep.splits, original_metrics, original_out, spec.seed)
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
            "proxy_targets": {k: getattr(targets, k) for k in ("FA", "RA", "TA", "MIA", "labels_leave")},
            "reference": references,
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
            note = (f"# unlearn tune: best of {len(rows)} {plan.method} trials (trial {best['trial_id']}, "
                    f"{plan.metric} {_short(best['metrics'].get(plan.metric))}); run it with `unlearn run best.yaml`\n")
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


def _log_mlflow(tracker, plan: Plan, rows: list[dict[str, Any]], payload: dict[str, Any], out_dir: Path,
                state: _State) -> None:
    """DIR/trials.png; nested runs for trials not logged yet (from the driver: no store contention), best tags."""
    runs = state.data["mlflow"]
    parent = runs.get("parent")
    plot = plot_trials(rows, plan, out_dir / "trials.png") if rows else None
    if not parent:
        return
    logged: dict[str, str] = runs.setdefault("trials", {})
    for row in rows:
        if row["trial_id"] in logged or row["status"] == "unfinished":
            continue
        run_id = tracker.start(f"trial-{row['trial_id']}", parent=parent,
                               tags={"unlearn.kind": "tune-trial", "unlearn.method": plan.method,
                                     "unlearn.trial_id": row["trial_id"], "unlearn.status": row["status"]})
        tracker.params(run_id, {**row["config"], **{f"fixed.{k}": v for k, v in plan.fixed.items()}})
        for point in row["history"]:
            tracker.metrics(run_id, {k: v for k, v in point.items() if k != "training_iteration"},
                            step=int(point.get("training_iteration", 0)))
        tracker.metrics(run_id, {**row["metrics"], "reports": row["reports"]})
        tracker.end(run_id, "FAILED" if row["status"] == "error" else "FINISHED")
        logged[row["trial_id"]] = run_id
    best = payload["best"]
    previous = runs.get("best")
    if best is not None and best["trial_id"] != previous and best["trial_id"] in logged:
        if previous in logged:
            tracker.tag(logged[previous], "unlearn.best", "false")
        tracker.tag(logged[best["trial_id"]], "unlearn.best", "true")
        runs["best"] = best["trial_id"]
        tracker.tag(parent, "unlearn.best_trial", best["trial_id"])
        for k, v in best["config"].items():
            tracker.tag(parent, f"unlearn.best.{k}", str(v))
        tracker.metrics(parent, {f"best.{k}": v for k, v in best["metrics"].items() if v is not None})
    if plot is not None:
        tracker.artifact(parent, plot)
