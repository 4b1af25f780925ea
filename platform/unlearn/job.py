"""One unlearning job, end to end: data, original model, every method, evaluation, tracking, results.

Reads straight down: data and splits (labels only), the queue of runs (the original's training when it
is not cached, the reference first, then every method), the executor runs the queue (in this process, or
on Ray Train worker groups via engine.py) and hands back each run as it finishes, when its MLflow run is
written; Gap and KL against the reference are computed at the end. The job never names a method.
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn import plots
from unlearn.atomic import write_json_atomic
from unlearn.data import load_dataset
from unlearn.data.scenarios import SPLIT_NAMES, Splits, SplitsRecipe, make_splits
from unlearn.errors import BadInput, SpecError
from unlearn.evaluation import build_evaluator
from unlearn.evaluation.identification import identification
from unlearn.execution import Executor, LocalExecutor, RunOutput, RunRequest, new_model
from unlearn.methods import Method, validate_methods
from unlearn.progress import Progress
from unlearn.resume import JobState, engine_folder, finished_on_storage, storage_for
from unlearn.spec import ForgetSpec, JobSpec, MethodSpec, dump
from unlearn.models import MODELS
from unlearn.tasks import get_task, task_of
from unlearn.tracking import flatten, make_tracker
from unlearn.training import cached_original, original_request, recipe_params, save_original
from unlearn.worker import GroupJob

TABLE_COLUMNS = ("FA", "RA", "TA", "ASR", "MIA", "ULiRA_BA", "ULiRA_TPR", "gap", "KL", "FD", "FU", "id_precision",
                 "id_recall", "forget_quality", "model_utility", "forget_ROUGE", "retain_ROUGE", "forget_prob",
                 "retain_prob", "privleak", "seconds", "speedup")


@dataclass
class Prepared:
    """Everything checked and loaded before the first optimisation step."""

    spec: JobSpec
    task: str
    methods: list[Method]
    dataset: Any  # the Parquet row store (or an in-memory ImageDataset)
    splits: Splits
    input_shape: tuple[int, ...]


def prepare(spec: JobSpec) -> Prepared:
    """Validate methods against the registry and build data and splits (BadInput on any problem)."""
    task = task_of(spec.model.name)
    methods = validate_methods(spec.methods, task, family=spec.model.name)
    spec = get_task(task).bound(spec)  # e.g. a language model and its dataset agree on one tokenizer
    dataset = open_dataset(spec)
    splits = make_splits(dataset, spec.forget, spec.seed, spec.eval.validation_fraction)
    methods = [tell_target(m, entry, spec.forget, splits, f"methods.{i}") for i, (m, entry) in
               enumerate(zip(methods, spec.methods))]
    for i, method in enumerate(methods):  # e.g. CURE needs classes outside the forget set
        try:
            method.check_data(splits.forget.y, splits.num_outputs)
        except SpecError as err:
            raise SpecError(f"methods.{i}.{err.field}", str(err).split(": ", 1)[-1]) from None
    if spec.eval.shadow_models:
        check_shadow_attack(spec, task, methods)
    return Prepared(spec, task, methods, dataset, splits, tuple(dataset.input_shape))


def check_shadow_attack(spec: JobSpec, task: str, methods: list[Method]) -> None:
    """U-LiRA (eval.shadow_models) scores a classifier's forget rows against retrained shadows and retrain."""
    if task != "classification":
        raise SpecError("eval.shadow_models", f"the per-example attack scores classifiers; {spec.model.name} is a "
                                              f"{task} model (set it to 0)")
    if not any(m.reference for m in methods):
        raise SpecError("eval.shadow_models", "the per-example attack needs the job's retrain (its negatives): add "
                                              "`- name: retrain` to methods")


def concept_known(entry: MethodSpec, forget: ForgetSpec) -> bool:
    """Whether a method is told the whole target concept (its entry's setting, else the job's)."""
    return forget.concept_known if entry.concept_known is None else entry.concept_known


def tell_target(method: Method, entry: MethodSpec, forget: ForgetSpec, splits: Splits, field: str) -> Method:
    """Hand a method what the spec says it knows of a concept target (see ForgetSpec.concept_known).

    Told: a method with `mask_classes` gets the concept's classes (unless its params name them). Not told: its
    params may not name the concept's hidden classes (that would tell it after all), so the table never mixes
    the two unawares."""
    if forget.kind != "concept" or "mask_classes" not in type(method.params).model_fields:
        return method
    hidden = sorted(set(splits.target_labels) - set(np.unique(splits.forget.y).tolist()))
    named = method.params.mask_classes
    if concept_known(entry, forget):
        if named is None:
            method.params = method.params.model_copy(update={"mask_classes": [int(c) for c in splits.target_labels]})
    elif named and set(named) & set(hidden):
        raise SpecError(f"{field}.params.mask_classes",
                        f"names classes {sorted(set(named) & set(hidden))} of the target concept that the methods "
                        "are not told (forget.concept_known is false); set concept_known: true on this method "
                        "entry to tell it")
    return method


def open_dataset(spec: JobSpec) -> Any:
    """The job's data as a Parquet row store (built once into the cache): the driver reads labels only."""
    try:
        from unlearn.data.store import open_store
    except ImportError:  # a store-less install still runs, with the data in memory
        return load_dataset(spec.dataset, spec.seed, spec.cache_dir)
    return open_store(spec.dataset, spec.seed, spec.cache_dir)


def check_writable(folder: Path) -> None:
    """Fail before any work if results cannot be written (preflight's check), then create the folder."""
    from unlearn.preflight import check_folder

    check_folder(folder, "output folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # e.g. taken by a file since the check
        raise BadInput(f"output folder is not writable: {folder} ({err.strerror or err})") from None


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else
                round(float(v), 4) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}


def make_executor(spec: JobSpec, out_dir: Path | None = None) -> Executor:
    """Ray Train worker groups when `ray.enabled`, else this process."""
    if spec.ray.enabled:
        from unlearn.engine import RayExecutor

        return RayExecutor(spec.ray, seed=spec.seed, storage=storage_for(out_dir, spec.ray) if out_dir else None)
    return LocalExecutor("cuda" if spec.ray.use_gpu and torch.cuda.is_available() else "cpu")


def request_for(prep: Prepared, entry: MethodSpec, state: dict[str, torch.Tensor] | None,
                method: Method | None = None) -> RunRequest:
    """The run of one spec entry: the reference gets the train recipe and the retain set, others the remain stream."""
    from unlearn.methods import get

    spec, splits = prep.spec, prep.splits
    method = method or next((m for m, e in zip(prep.methods, spec.methods) if e is entry), None)
    cls = get(entry.name)
    if cls.reference:
        params = cls.Params.model_validate({**recipe_params(spec.train), **entry.params})
        retain = splits.retain
    else:
        params, retain = (method.params if method is not None else dict(entry.params)), splits.remain
    return RunRequest(label=entry.run_name, method=entry.name, params=params, model=spec.model,
                      num_outputs=splits.num_outputs, input_shape=prep.input_shape, initial_state=state,
                      forget=splits.forget, retain=retain, task=prep.task, seed=spec.seed)


def build_queue(prep: Prepared) -> tuple[GroupJob, dict[str, Any]]:
    """The job's runs in order (the original when not cached, the reference, the methods) and the cache info."""
    spec, splits = prep.spec, prep.splits
    pretrained = getattr(spec.model, "path", None) and not MODELS.lookup(spec.model.name).fine_tunes_base
    base, info = pretrained_original(prep) if pretrained else cached_original(spec, splits)
    first = [original_request(spec, splits, prep.input_shape, prep.task)]
    if base is not None:  # the cached original is only evaluated
        first[0] = replace(first[0], role="evaluate")
    entries = sorted(zip(spec.methods, prep.methods), key=lambda pair: not pair[1].reference)
    requests = first + [request_for(prep, entry, None, method) for entry, method in entries]
    # The job names its splits; workers rebuild them from the recipe (what is shipped does not grow with the data).
    names = {id(getattr(splits, name)): name for name in SPLIT_NAMES}
    requests = [replace(r, forget="empty" if r.role == "evaluate" or not len(r.forget) else names[id(r.forget)],
                        retain="empty" if r.role == "evaluate" else names[id(r.retain)]) for r in requests]
    classifier = prep.task == "classification"  # other tasks: an evaluator built here, run on the workers
    evaluated = ("target", "retain", "test") + (("triggered",) if splits.triggered is not None else ())
    job = GroupJob(requests=requests, base_state=base, eval_splits=evaluated if classifier else None,
                   evaluator=None if classifier else build_evaluator(prep.task, prep.splits, spec, prep.dataset),
                   mia=spec.eval.mia, seed=spec.seed, splits_recipe=SplitsRecipe(prep.dataset, spec.forget, spec.seed,
                                                                    spec.eval.validation_fraction),
                   data_mode=spec.ray.data if spec.ray.enabled else "exact")
    return job, info


def pretrained_original(prep: Prepared) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A model loaded from `model.path` is the original: evaluated, never trained (retrain starts from scratch)."""
    from unlearn.models import build_model

    model = build_model(prep.spec.model, prep.splits.num_outputs, prep.input_shape)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, \
        {"cached": True, "key": "pretrained", "path": str(prep.spec.model.path)}


def format_table(methods: dict[str, dict[str, Any]]) -> str:
    """The results as an aligned text table (a failed run's row says why)."""
    cols = [c for c in TABLE_COLUMNS if any(m.get(c) is not None for m in methods.values())]
    header = ["method", *cols]
    rows = [[name, *(_fmt(m.get(c)) for c in cols)] if "error" not in m else [name, f"FAILED: {m['error']}"]
            for name, m in methods.items()]
    widths = [max(len(str(r[i])) for r in [header, *rows] if i < len(r) and len(r) > 2) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).rjust(w) if i else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    shown = [line(r) if len(r) > 2 else f"{r[0].ljust(widths[0])}  {r[1]}" for r in rows]
    return "\n".join([line(header), "  ".join("-" * w for w in widths), *shown])


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if isinstance(v, float) else str(v)


class Recorder:
    """Writes each run's results and MLflow run as the executor hands it back (the driver's only job)."""

    def __init__(self, prep: Prepared, job: GroupJob, tracker: Any, parent: str, info: dict[str, Any],
                 out_dir: Path, state: JobState | None = None, progress: Progress | None = None) -> None:
        self.prep, self.job, self.tracker, self.parent, self.info = prep, job, tracker, parent, info
        self.state, self.progress = state, progress
        self.results: dict[str, dict[str, Any]] = {}
        self.outputs: dict[str, Any] = {}
        self.run_ids: dict[str, str] = {}
        self.model_uris: dict[str, str] = {}  # label -> models:/<id> of its LoggedModel (tracking.log_models)
        self.engine_rows: dict[str, dict[str, Any]] = {}
        self.task_evaluator = job.evaluator  # diffusion: compares and saves the grids the workers drew
        # eval.shadow_models: each model's φ on the forget rows, what the per-example attack reads (shadows.py)
        self.attacked_phi: dict[str, np.ndarray] | None = {} if prep.spec.eval.shadow_models else None
        if self.task_evaluator is not None:
            self.task_evaluator.out_dir = out_dir

    def __call__(self, index: int, out: RunOutput) -> None:
        request = self.job.requests[index]
        if request.role == "original" and out.error is None:
            save_original(self.info, out.state)
        model = None
        if out.error is None:
            state = out.state if out.state is not None else self.job.base_state  # "evaluate": the cached original
            model = new_model(replace(request, initial_state=state))
            metrics, outputs = out.metrics, out.outputs
            if self.attacked_phi is not None:
                from unlearn.shadows import forget_phi

                label = "original" if request.role in ("original", "evaluate") else request.label
                self.attacked_phi[label] = forget_phi(model, self.prep.splits.forget)
            if metrics is not None:  # a method's own identification, scored against what it was not told
                splits = self.prep.splits
                metrics = {**metrics, **identification(out.captured.get("diagnostics"), splits.target.index,
                                                       splits.forget.index)}
        if request.role in ("original", "evaluate"):
            if out.error is not None:
                raise RuntimeError(f"the original model could not be trained: {out.error['message']}")
            self.results["original"] = {**metrics, "seconds": 0.0}
            self.outputs["original"] = outputs
            self._artifacts(self.parent, model, "original", None, outputs)
            self._finished(request, out, "trained" if request.role == "original" else "evaluated (cached)")
            return
        if self.state is not None and request.label in self.state.recorded and out.error is None:
            # a resumed job: this run's MLflow run is complete already; only its numbers are needed here
            self.run_ids[request.label] = self.state.runs[request.label]
            self.model_uris.update({request.label: self.state.models[request.label]}
                                   if request.label in self.state.models else {})
            self.results[request.label] = {**metrics, "seconds": out.seconds}
            self.outputs[request.label] = outputs
            self._finished(request, out, "done (recorded before the resume)")
            return
        known = self.state.runs.get(request.label) if self.state is not None else None
        run_id = self.tracker.reopen(known) if known else self.tracker.start(
            request.label, parent=self.parent, tags={"unlearn.method": request.method})
        self.run_ids[request.label] = run_id
        if self.state is not None and run_id:  # before anything is logged: a resume reopens this run, not a new one
            self.state.run_created(request.label, run_id)
        self.tracker.params(run_id, {"method": request.method, **flatten(request.params.model_dump(mode="json"), "params.")})
        self.engine_rows[request.label] = {"starts": out.starts, "resumed_from_step": out.resumed_from_step}
        if out.error is not None:
            self.results[request.label] = {"error": f"{out.error['error']}: {out.error['message']}"}
            self.tracker.tag(run_id, "unlearn.error", self.results[request.label]["error"][:5000])
            self.tracker.end(run_id, "FAILED")
            if self.progress is not None:
                self.progress.finished(request.label, f"[{request.label}] FAILED: {self.results[request.label]['error']}")
            else:
                print(f"  [{request.label}] FAILED: {self.results[request.label]['error']}", file=sys.stderr,
                      flush=True)
            return
        self.results[request.label] = {**metrics, "seconds": out.seconds}
        self.outputs[request.label] = outputs
        self.tracker.history(run_id, out.history)
        self.tracker.system(run_id, out.system)
        self.tracker.metrics(run_id, metrics | {"seconds": out.seconds})
        if out.resumed_from_step:
            self.tracker.tag(run_id, "unlearn.resumed_from_step", str(out.resumed_from_step))
            self.tracker.metrics(run_id, {"restarts": out.restarts})
        self._artifacts(run_id, model, request.label, out.history, outputs)
        uri = self.tracker.model(run_id, model, request.input_shape, request.task, name=request.label)
        if uri:
            self.model_uris[request.label] = uri
        self.tracker.end(run_id, "FINISHED")
        if self.state is not None:
            if uri:
                self.state.models[request.label] = uri
            self.state.run_recorded(request.label)
        self._finished(request, out, "done")

    def _finished(self, request: RunRequest, out: RunOutput, what: str) -> None:
        """The run's one line when it ends (its bar, on a terminal, goes)."""
        if self.progress is None:
            return
        metrics = self.results.get(request.label if request.role == "method" else "original", {})
        shown = ", ".join(f"{k} {metrics[k]:.2f}" for k in ("FA", "RA", "TA", "FD", "CA")
                          if isinstance(metrics.get(k), (int, float)))
        took = f" in {out.seconds:.1f}s" if out.seconds else ""
        resumed = f", resumed from step {out.resumed_from_step}" if out.resumed_from_step else ""
        self.progress.finished(request.label, f"[{request.label}] {what}{took}{resumed}" + (f": {shown}" if shown else ""))

    def _artifacts(self, run_id: str, model: torch.nn.Module, name: str, history: list | None, outputs: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            if history:
                self.tracker.artifact(run_id, plots.loss_curves(history, Path(tmp) / "losses.png", name))
            if self.task_evaluator is not None:  # diffusion: its sample grid
                for path in self.task_evaluator.artifacts(model, name, Path(tmp), outputs):
                    self.tracker.artifact(run_id, path)

    def compare(self, reference: str | None) -> None:
        """Gap and KL against the reference, and speed-ups, once every run is in."""
        evaluator = self.task_evaluator
        ok = {name: m for name, m in self.results.items() if "error" not in m}
        ref = ok.get(reference) if reference else None
        compared: dict[str, set[str]] = {name: set() for name in ok}  # what each run's MLflow run gets now
        for name, m in ok.items():
            if ref is not None:
                compare = evaluator.compare if evaluator is not None else _versus_reference
                versus = compare(m, self.outputs[name], ref, self.outputs[reference])
                m.update(versus)
                compared[name].update(versus)
            if ref is not None and name not in ("original", reference) and m["seconds"] > 0:
                m["speedup"] = ref["seconds"] / m["seconds"]
                compared[name].add("speedup")
        for name, run_id in self.run_ids.items():
            if name in ok:
                self.tracker.metrics(run_id, {k: v for k, v in ok[name].items() if k in compared[name]})


def _versus_reference(metrics: dict, out: Any, ref_metrics: dict, ref_out: Any) -> dict[str, float]:
    from unlearn.evaluation import versus_reference

    return versus_reference(metrics, out, ref_metrics, ref_out)


def shadow_attack(prep: Prepared, recorder: Recorder, reference: str | None, say: Any) -> None:
    """U-LiRA on every finished run (eval.shadow_models): shadows on Ray tasks, numbers into the results and
    the runs' MLflow metrics (see shadows.py and evaluation/ulira.py)."""
    from unlearn import shadows
    from unlearn.training import original_key

    spec, splits = prep.spec, prep.splits
    if reference is None or reference not in recorder.attacked_phi:
        say("[u-lira] skipped: the job's retrain did not finish")
        return
    entries = [(e, m) for e, m in zip(spec.methods, prep.methods)
               if not m.reference and e.run_name in recorder.attacked_phi]
    ref_entry = next(e for e, m in zip(spec.methods, prep.methods) if e.run_name == reference)
    ref_request = request_for(prep, ref_entry, None)
    keys = {"original": original_key(spec, splits),
            "retrain": shadows.cache_key({"original": original_key(spec, splits),
                                          "forget": spec.forget.model_dump(mode="json"),
                                          "validation": spec.eval.validation_fraction,
                                          "params": ref_request.params.model_dump(mode="json")})}
    plan = shadows.plan_shadows(spec.eval.shadow_models, spec.seed, splits.train, splits.forget, splits.retain,
                                splits.remain, original_request(spec, splits, prep.input_shape, prep.task),
                                ref_request, [request_for(prep, e, None, m) for e, m in entries], keys,
                                spec.cache_dir, share=spec.eval.shadow_share,
                                use_gpu=spec.ray.enabled and spec.ray.use_gpu)
    say(f"[u-lira] {spec.eval.shadow_models} shadow models x ({len(entries)} methods + original + retrain) and an "
        f"independent retrain, {len(splits.forget)} forget rows attacked")
    use_ray = spec.ray.enabled and _ray_running()
    results = shadows.run_works(plan, use_ray, say)
    for label in sorted({label for r in results for label in r.failed}):
        why = next(r.failed[label] for r in results if label in r.failed)
        say(f"[u-lira] {label}: no per-example numbers, its run failed on a shadow model ({why})")
    scores, curves = shadows.score(plan, results, recorder.attacked_phi, reference, [e.run_name for e, _ in entries])
    for label, numbers in scores.items():
        recorder.results[label].update(numbers)
        if label in recorder.run_ids:
            recorder.tracker.metrics(recorder.run_ids[label], numbers)
    with tempfile.TemporaryDirectory() as tmp:
        recorder.tracker.artifact(recorder.parent, plots.roc_curves(
            curves, Path(tmp) / "ulira_roc.png", f"{spec.name}: U-LiRA, each model vs retrain per forget row"))


def _ray_running() -> bool:
    import ray

    return ray.is_initialized()


def resume_queue(job: GroupJob) -> None:
    """Hand the runs an interrupted attempt finished straight back (their results are on the job's storage)."""
    from unlearn.worker import read_result

    job.finished = finished_on_storage(job.storage, [r.label for r in job.requests])
    for index in job.finished:
        if job.requests[index].role == "original" and job.base_state is None:  # trained, not yet cached
            job.base_state = read_result(job.finished[index]["path"])["state"]


def run_job(spec: JobSpec, out_dir: Path | None = None, executor: Executor | None = None, *,
            resume: bool = False, progress: str | Progress = "auto") -> dict[str, Any]:
    """Run a whole job; writes results.json in `out_dir` and returns its content (`failed` lists failed runs).

    With `seeds`, the job runs once per seed (see `unlearn.seeds`) and results.json holds the mean ± std.
    `resume`: finish the job an interrupted driver left in `out_dir` (see `unlearn.resume`). `progress`: how runs
    show their progress (progress.MODES, or a Progress)."""
    progress = progress if isinstance(progress, Progress) else Progress(progress)
    if spec.seeds is not None:
        from unlearn.seeds import run_seeds

        return run_seeds(spec, out_dir, executor, resume=resume, progress=progress)
    return run_one_seed(spec, out_dir, executor, resume=resume, progress=progress)


def run_one_seed(spec: JobSpec, out_dir: Path | None = None, executor: Executor | None = None,
                 parent_run: str | None = None, *, resume: bool = False,
                 progress: Progress | None = None) -> dict[str, Any]:
    """The job at `spec.seed` (`parent_run`: the MLflow run of a multi-seed job to nest under)."""
    out_dir = Path(out_dir or Path("results") / spec.name)
    check_writable(out_dir)
    state = JobState.begin(out_dir, spec, resume)
    prep = prepare(spec)
    tracker = make_tracker(spec.tracking, spec.name)
    own_executor = executor is None
    executor = executor or make_executor(spec, out_dir)  # joins Ray first: an unreachable cluster stops here
    job, info = build_queue(prep)
    job.storage = engine_folder(storage_for(out_dir, spec.ray), state, resume)
    if resume:
        resume_queue(job)
    splits = prep.splits
    say = progress.note if progress is not None else (lambda line: print(line, file=sys.stderr, flush=True))
    say(f"job {spec.name}: {spec.dataset.name} / {spec.model.name}, forget {splits.describe}, "
        f"sizes {splits.sizes()}, {len(job.requests)} runs" + (f", {len(job.finished)} finished before the resume"
                                                               if resume else ""))
    if not info["cached"] and not any(job.requests[i].role == "original" for i in job.finished):
        say(f"original model: training {spec.model.name} on {len(splits.train)} samples "
            f"({spec.train.epochs} epochs), first in the queue")
    try:
        name = spec.name if parent_run is None else f"{spec.name}-seed{spec.seed}"
        with tracker.run(name, parent=parent_run, tags={"unlearn.kind": "job", "unlearn.seed": str(spec.seed)},
                         run_id=state.parent_run) as parent:
            state.parent_run = parent or None
            state.save()
            tracker.params(parent, flatten(spec.model_dump(mode="json")))
            tracker.text(parent, dump(spec), "spec.yaml")
            recorder = Recorder(prep, job, tracker, parent, info, out_dir, state, progress)
            try:
                engine = executor.run_queue(job, recorder, progress=progress)
            finally:
                if progress is not None:
                    progress.close()
            reference = next((r.label for r in job.requests if r.role == "method" and r.method_class.reference), None)
            if spec.eval.shadow_models:
                shadow_attack(prep, recorder, reference, say)
            recorder.compare(reference)
            results = {"original": recorder.results.pop("original"), **recorder.results}
            tracker.metrics(parent, {f"{name}.{k}": v for name, m in results.items() for k, v in m.items()
                                     if isinstance(v, (int, float))})
            failed = sorted(name for name, m in results.items() if "error" in m)
            payload = {
                "job": spec.name,
                "dataset": spec.dataset.name,
                "model": spec.model.name,
                "forget": splits.describe,
                "label_level": splits.label_level,
                "sizes": {k: v for k, v in splits.sizes().items()
                          if k in ("forget", "retain", "test", "remain", "target", "validation")},
                "original_cached": info["cached"],
                "methods": {name: _clean(m) for name, m in results.items()},
                "engine": {k: (round(v, 2) if isinstance(v, float) else v) for k, v in engine.items()}
                | {"runs": recorder.engine_rows},
                "failed": failed,
                "mlflow": {"tracking_uri": tracker.uri, "experiment_id": tracker.experiment_id,
                           "parent_run": parent or None, "runs": recorder.run_ids, "models": recorder.model_uris},
            }
            if spec.forget.kind == "concept":  # what each run was told of the target concept
                payload["concept_known"] = {e.run_name: concept_known(e, spec.forget) for e in spec.methods}
            write_json_atomic(payload, out_dir / "results.json")
            with tempfile.TemporaryDirectory() as tmp:
                shown = {n: m for n, m in payload["methods"].items() if "error" not in m}
                bars = plots.metric_bars(shown, Path(tmp) / "metrics.png", f"{spec.name}: metrics vs retrain")
                tracker.artifact(parent, bars)
                tracker.artifact(parent, out_dir / "results.json")
    finally:
        if own_executor and hasattr(executor, "close"):
            executor.close()
    print(format_table(payload["methods"]), flush=True)
    print(f"engine: {engine['executor']}, {engine['worker_groups']} worker group(s), {engine['train_runs']} Train "
          f"run(s), {engine['wall_seconds']:.1f}s" + (" (groups shared CPUs: their seconds include waiting for a "
                                                      "core)" if engine.get("groups_shared_cpus") else ""), flush=True)
    print(f"results: {out_dir / 'results.json'}", flush=True)
    return payload
