"""`unlearn register RUN_ID --name NAME [--alias ALIAS]`: a method run's logged model into the model registry.

The run's LoggedModel (the one `tracking.Tracker.model` linked to it; the newest READY one if there are
several) becomes a new version of registered model NAME (created if missing) from source `models:/<id>`
(MLflow 3's link from a version to its LoggedModel), with the run's id; ALIAS, if given, then points at it.

MLflow 3.17's SQL registry resolves a `models:/<id>` source through `MlflowClient()`, i.e. the process-global
tracking URI, whatever client asked: that one call runs with the global URI pointed at ours, under a lock,
and the global URI and MLFLOW_TRACKING_URI are put back as they were.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from unlearn.errors import BadInput
from unlearn.spec import TrackingSpec
from unlearn.tracking import resolve_uri


_GLOBAL_URI = threading.Lock()


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to `uri` for the block, then restored (and MLFLOW_TRACKING_URI, which
    `mlflow.set_tracking_uri` also writes)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    with _GLOBAL_URI:
        old, env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old)
            if env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = env


def logged_model_of(client: MlflowClient, run_id: str):
    """The run's LoggedModel (BadInput when the run is unknown or logged none)."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise BadInput(f"no MLflow run {run_id!r} in {client.tracking_uri}") from None
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}])
    ready = [m for m in found if str(m.status) in ("READY", "LoggedModelStatus.READY")]
    if not ready:
        raise BadInput(f"run {run_id} ({run.info.run_name}) has no logged model (a failed run, a job run, or "
                       "tracking.log_models: none)")
    return ready[0]


def register(run_id: str, name: str, alias: str | None = None, uri: str | None = None) -> dict[str, str]:
    """Registers the run's model as a new version of `name`; returns {name, version, alias, source, run_id}."""
    uri = uri or resolve_uri(TrackingSpec())
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    logged = logged_model_of(client, run_id)
    model_id = logged.model_id
    try:
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name)
        with _global_tracking_uri(uri):
            version = client.create_model_version(name, source=f"models:/{model_id}", run_id=run_id,
                                                  model_id=model_id, await_creation_for=0)
        if alias:
            client.set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:  # an invalid name or alias: MLflow's one line
        raise BadInput(f"cannot register {name!r}: {err.message.splitlines()[0]}") from None
    return {"name": name, "version": str(version.version), "alias": alias or "", "source": f"models:/{model_id}",
            "run_id": run_id}


__all__ = ["logged_model_of", "register"]
