"""What one trial does (inside a Ray Tune actor): the inputs every trial shares, its reports and execution
log, and one configuration run in-process or as a Ray Train worker group that Tune can stop."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.train import UserCallback

from unlearn.spec import MethodSpec
from unlearn.tuning.objectives import PENALTY, ProxyTargets, proxy_objective

TRIALS_DIR = "trials"  # one execution log per trial: a line per start, one at the final report
DRIVER_CPU = 0.01  # what an engine trial's Tune function reserves (Tune refuses 0; its TorchTrainer holds the CPUs)
ABORT_TIMEOUT_S = 60.0  # how long a stopped engine trial waits for its Train run to release its workers
MAILBOX_WAIT_S = 2.0  # how long it waits for the run's controller handle (none: the run never reported)


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
    targets: ProxyTargets | None  # None: a task the proxy does not score (language models)
    reference: tuple[dict[str, float], Any] | None  # retrain's (metrics, outputs) for metric gap
    out_dir: str
    ray_spec: Any | None = None  # RaySpec for engine trials, None for in-process ones
    failure_value: float = PENALTY
    capture: tuple[str, ...] = ()  # method attributes a trial writes with its result (tests compare them)
    fail: dict[str, str] | None = None  # test-only failure injection armed on the driver (faults.py)
    evaluator: Any = None  # a task evaluator run by the trials' workers (language models); None: classifiers


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

            compare = self.shared.evaluator.compare if self.shared.evaluator is not None else versus_reference
            metrics.update(compare(metrics, out, *self.shared.reference))
        else:
            metrics.update(gap=float("nan"), KL=float("nan"))
        metrics["proxy"] = proxy_objective(metrics, self.shared.targets)
        return {**metrics, "progress": summary.step / summary.total_steps, "final": summary.step >= summary.total_steps,
                "seconds": summary.seconds, "diverged": False}


def _penalty(shared: Shared, record: dict[str, Any]) -> dict[str, Any]:
    """What a failed run reports: the penalty, and why it failed (the run's error message)."""
    error = record["error"]  # the queue records a failed run as {"error": {"error": kind, "message": ...}}
    why = error.get("message", "") if isinstance(error, dict) else str(error)
    return {**{k: shared.failure_value for k in ("gap", "proxy")}, "final": True, "diverged": True, "progress": 1.0,
            "why": why[:500]}


def _plain(value: Any) -> Any:
    """numpy scalars -> Python values (for JSON, YAML and pydantic)."""
    return value.item() if hasattr(value, "item") else value


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
    classifier = shared.evaluator is None
    return GroupJob(requests=[request], base_state=shared.state, evaluator=shared.evaluator,
                    eval_splits={"target": splits.target, "retain": splits.retain, "test": splits.test}
                    if classifier else None,
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
    failed = [record for record in finished.values() if "error" in record]
    if failed:
        penalty = _penalty(shared, failed[0])
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
            penalty = _penalty(shared, record)
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
