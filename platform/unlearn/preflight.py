"""Checks a command makes before any work (before Ray starts): each failure is one `BadInput` line, exit 2.

What is checked here: the output folder, the engine's checkpoint storage (a local `ray.storage`) and an
http(s) MLflow tracking server. Whether the Ray session can hold the job's worker group is checked once
Ray is up (`ray_session.check_fits`). Nothing here imports torch or Ray, and nothing is created: a job
that stops here leaves no folder behind (write tests use a temporary file, removed at once).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from unlearn.errors import BadInput
from unlearn.resume import STORAGE_ENV  # the variable the engine reads (resume.py imports neither Ray nor torch)
from unlearn.spec import JobSpec


def preflight(spec: JobSpec, out_dir: Path | None, *, engine_storage: bool = True) -> None:
    """BadInput unless `out_dir` (when given), the engine's storage (when `engine_storage` and Ray runs the
    job) and the MLflow tracking server can be used. Cheap checks first; the server probe takes up to 5 s."""
    if out_dir is not None:
        check_folder(Path(out_dir), "output folder")
    if engine_storage and spec.ray.enabled:
        storage = spec.ray.storage or os.environ.get(STORAGE_ENV)  # none: <out>/engine, checked with the output
        local = _local_path(storage) if storage else None
        if local is not None:
            check_folder(local, "ray.storage" if spec.ray.storage else STORAGE_ENV)
    if spec.tracking.enabled:
        uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or ""  # tracking.resolve_uri's order
        if uri.startswith(("http://", "https://")):  # sqlite and file stores are local files: nothing to probe
            from unlearn.tracking import probe  # imports MLflow: only for jobs that log to a server

            probe(uri)


def _local_path(storage: str) -> Path | None:
    """The folder of a local storage location; None for remote ones (s3://, gs://: not probed)."""
    if storage.startswith("file://"):
        return Path(storage.removeprefix("file://"))
    return None if "://" in storage else Path(storage)


def check_folder(folder: Path, what: str) -> None:
    """BadInput unless `folder` is, or can be made, a writable folder; creates nothing.

    A missing folder is judged by its nearest existing ancestor (the job creates the rest later). A
    temporary file written and removed there tests the write itself (read-only mounts, permissions).
    """
    nearest = folder
    try:
        while not nearest.exists() and nearest != nearest.parent:
            nearest = nearest.parent
        if not nearest.is_dir():
            where = "it is" if nearest == folder else f"{nearest} is"
            raise BadInput(f"{what} is not writable: {folder} ({where} a file, not a folder)")
        with tempfile.NamedTemporaryFile(dir=nearest, prefix=".write-test-"):
            pass
    except OSError as err:
        raise BadInput(f"{what} is not writable: {folder} ({err.strerror or err})") from None
