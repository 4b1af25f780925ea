"""MLflow: one experiment per job, a parent run per job, a nested run per method (or Tune trial).

Embedded default: a SQLite store (./mlruns.db) and an artifact folder (./mlartifacts) in the working
directory (current MLflow refuses the plain ./mlruns file store). `tracking.uri` in the spec or
MLFLOW_TRACKING_URI point at a server instead (needed for multi-node clusters).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import logging

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from unlearn.spec import TrackingSpec

DEFAULT_DB = "mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
PARAM_VALUE_MAX = 6000  # MLflow's limit on one param value

# MLflow's own chatter (table creation, the pickle-format caution we chose knowingly) drowns the progress lines.
for _name in ("mlflow.store.db.utils", "mlflow.pytorch", "alembic.runtime.migration"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def resolve_uri(spec: TrackingSpec) -> str:
    """Spec URI, else MLFLOW_TRACKING_URI, else the embedded SQLite store in the working directory."""
    if spec.uri:
        return spec.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(DEFAULT_DB).resolve()}"


PROBE_TIMEOUT_S = 5.0
# Gateway answers: a proxy is up but the server behind it is not (MLflow's client retries these for minutes);
# 404: whatever answers is no MLflow server (every MLflow server has /health).
_NOT_ANSWERING = (404, 502, 503, 504)


def probe(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """BadInput within `timeout_s` unless the MLflow server at an http(s) `uri` answers; other URIs pass.

    MLflow's client retries a silent server with backoff for minutes; one GET of its /health page, in a
    thread joined with a deadline (DNS included), tells the user at once. Any HTTP answer but a gateway
    error or a 404 counts: authentication and TLS are the client's business, not the probe's.
    """
    import ssl
    import threading
    import urllib.error
    import urllib.parse
    import urllib.request

    from unlearn.errors import BadInput

    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])  # no credentials: in the message, or needed
    shown = parts.geturl()
    health = parts._replace(path=parts.path.rstrip("/") + "/health", query="", fragment="").geturl()
    failure: list[str] = []

    def get() -> None:
        try:
            context = ssl._create_unverified_context() if parts.scheme == "https" else None  # liveness only
            urllib.request.urlopen(health, timeout=timeout_s, context=context).close()
        except urllib.error.HTTPError as err:
            if err.code in _NOT_ANSWERING:
                failure.append(f"HTTP {err.code} {err.reason} for {health}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, ssl.SSLError):
                return  # a TLS server answered
            text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
            failure.append(text[:1].lower() + text[1:])
        except Exception as err:  # a malformed URL, a bad port: still one line
            failure.append(str(err) or type(err).__name__)

    worker = threading.Thread(target=get, name="unlearn-mlflow-probe", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        failure.append(f"no reply within {timeout_s:g} s")
    if failure:
        raise BadInput(f"MLflow tracking server at {shown} does not answer ({failure[0]}); "
                       "check tracking.uri or MLFLOW_TRACKING_URI")


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """Nested spec -> {'a.b.c': 'value'} for MLflow params."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(v, dict) for v in data):
        for i, v in enumerate(data):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(data) if not isinstance(data, str) else data
    return {k: v[:PARAM_VALUE_MAX] for k, v in out.items()}



# Characters MLflow refuses in a LoggedModel's name; a method's run name may hold them (a label like
# "sfr_on-clip0.01"), and a refused name would fail the job after the run's work is done.
_MODEL_NAME_FORBIDDEN = str.maketrans({c: "_" for c in "/:.%\"'"})


def logged_model_name(run_name: str) -> str:
    """The run name as MLflow accepts it for a LoggedModel (forbidden characters become '_')."""
    return run_name.translate(_MODEL_NAME_FORBIDDEN) or "model"

class Tracker:
    """Thin wrapper over MlflowClient with the project's run layout."""

    def __init__(self, spec: TrackingSpec, experiment: str) -> None:
        self.uri = resolve_uri(spec)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_name = spec.experiment or experiment
        self.experiment_id = self._experiment()
        self.log_models = spec.log_models
        self._noted_no_adapter = False
        self._open: set[str] = set()  # runs started or reopened here and not yet ended

    def _experiment(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment_name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            location = Path(DEFAULT_ARTIFACTS).resolve().as_uri()
        return self.client.create_experiment(self.experiment_name, artifact_location=location)

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        """A new run (nested under `parent` if given); returns its id."""
        all_tags = dict(tags or {})
        if parent:
            all_tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags)
        self._open.add(run.info.run_id)
        return run.info.run_id

    def params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:PARAM_VALUE_MAX]) for k, v in params.items()]
        for start in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _log(self, run_id: str, points: Iterable[tuple[str, Any, int, int]]) -> None:
        """(name, value, timestamp ms, step) points in batches of 1,000 (MLflow's limit); None and non-finite
        values are left out (MLflow refuses NaN)."""
        import math

        items = [Metric(k, float(v), t, step) for k, v, t, step in points
                 if v is not None and math.isfinite(float(v))]
        for start in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[start:start + 1000])

    def metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        now = int(time.time() * 1000)
        self._log(run_id, ((k, v, now, step) for k, v in metrics.items()))

    def history(self, run_id: str, rows: list[dict[str, float]]) -> None:
        """Per-step losses: rows of {'step': s, name: value, ...}."""
        import time

        now = int(time.time() * 1000)
        self._log(run_id, ((k, v, now, int(r["step"])) for r in rows for k, v in r.items() if k != "step"))

    def artifact(self, run_id: str, path: str | Path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    def text(self, run_id: str, text: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / name
            p.write_text(text)
            self.client.log_artifact(run_id, str(p))

    def model(self, run_id: str, model: Any, input_shape: tuple[int, ...] | None = None,
              task: str = "classification", name: str = "model") -> str | None:
        """The run's unlearned model as an MLflow 3 LoggedModel linked to the run; returns `models:/<id>`.

        `tracking.log_models` says what: `full` the whole model (classifiers: the `pytorch` flavor; diffusion: a
        pyfunc of noise, timestep and labels), `adapter` its adapter weights only, `none` nothing (None).
        Done with the client alone (create the LoggedModel, save locally, upload to its artifact location,
        finalize READY, or FAILED if any step raises), so no global fluent-API state (tracking URI, active run,
        active model) is touched: several trackers can live in one process, in threads.
        """
        if self.log_models == "none":
            return None
        if self.log_models == "adapter":
            from unlearn.model_logging import adapter_state

            state = adapter_state(model)
            if state is None:
                if not self._noted_no_adapter:
                    self._noted_no_adapter = True
                    print(f"tracking.log_models: adapter: {type(model).__name__} has no adapters; no model is "
                          "logged (set log_models: full to log the whole model)", file=sys.stderr, flush=True)
                return None
        from mlflow.entities import LoggedModelOutput

        from unlearn.model_logging import save_adapter, save_full

        logged = self.client.create_logged_model(
            self.experiment_id, name=logged_model_name(name), source_run_id=run_id,
            model_type="adapter" if self.log_models == "adapter" else task,
            tags={"unlearn.task": task, "unlearn.log_models": self.log_models})
        try:
            self.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            with tempfile.TemporaryDirectory() as tmp:
                local = Path(tmp) / "model"
                if self.log_models == "adapter":
                    save_adapter(state, local)
                else:
                    save_full(model, local, logged, run_id, input_shape, task)
                self.client.log_model_artifacts(logged.model_id, str(local))
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        return f"models:/{logged.model_id}"

    def system(self, run_id: str, samples: list[dict[str, Any]]) -> None:
        """A worker's system metrics samples as `system/<name>` at step = sample index (MLflow's System tab)."""
        self._log(run_id, ((f"system/{k}", v, int(s["timestamp"]), i) for i, s in enumerate(samples)
                           for k, v in s.items() if k != "timestamp"))

    def tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, value)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)
        self._open.discard(run_id)

    def reopen(self, run_id: str) -> str:
        """An existing run back to RUNNING (a resumed job continues its own runs rather than adding new ones)."""
        self.client.update_run(run_id, status="RUNNING")
        self._open.add(run_id)
        return run_id

    @contextlib.contextmanager
    def run(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None,
            run_id: str | None = None) -> Iterator[str]:
        """A run (or `run_id` reopened) that ends FINISHED, KILLED if interrupted (Ctrl-C, SIGTERM), else FAILED.

        Interrupted or failed, it first ends the same way every run opened inside it and not yet ended (a method's
        run the driver was still logging when `ray job stop` came), so none is left RUNNING."""
        before = set(self._open)
        run_id = self.reopen(run_id) if run_id else self.start(name, parent, tags)
        try:
            yield run_id
        except KeyboardInterrupt:
            self._end_inside(run_id, before, "KILLED")
            raise
        except BaseException:
            self._end_inside(run_id, before, "FAILED")
            raise
        self.end(run_id, "FINISHED")

    def _end_inside(self, run_id: str, before: set[str], status: str) -> None:
        for inner in sorted(self._open - before - {run_id}):
            with contextlib.suppress(Exception):  # the job's own run is ended whatever happens to these
                self.end(inner, status)
        self.end(run_id, status)


class NullTracker:
    """Tracking switched off (`tracking.enabled: false`): same calls, nothing recorded."""

    uri = None
    experiment_id = None

    def start(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None) -> str:
        return ""

    def __getattr__(self, name: str):  # params, metrics, history, system, artifact, text, model, tag, end
        return lambda *args, **kwargs: None

    @contextlib.contextmanager
    def run(self, name: str, parent: str | None = None, tags: dict[str, str] | None = None,
            run_id: str | None = None) -> Iterator[str]:
        yield ""


def make_tracker(spec: TrackingSpec, experiment: str) -> Tracker | NullTracker:
    return Tracker(spec, experiment) if spec.enabled else NullTracker()
