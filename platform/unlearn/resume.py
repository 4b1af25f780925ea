"""What a job leaves in its output folder so that `unlearn run JOB --resume DIR` can finish it after its driver died.

A driver can die at any moment (a preempted node, `ray job stop`, Ctrl-C, SIGKILL). The job therefore keeps,
under its output folder:
- `job-state.json` (written atomically whenever it changes): the spec's hash, the engine token (which
  names the job's Train runs and its engine folder, so a resumed job finds the same checkpoints), the MLflow
  parent run id, each method's MLflow run id as soon as it exists, and which runs are fully recorded;
- `<engine storage>/<token>/`: each finished run's weights, metrics and test outputs (written atomically by
  rank 0 as it finishes, worker.write_result) and the worker groups' Train checkpoints (engine.py).
On resume the runs whose results are on storage are handed straight back to the driver (those already in
MLflow are not logged again), a run cut off mid-way restarts from its group's last checkpoint (Ray Train
restores a run of the same name and storage path), the rest run, and MLflow runs are reopened by id.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from unlearn.atomic import write_json_atomic
from unlearn.errors import BadInput

STATE_FILE = "job-state.json"
STORAGE_ENV = "UNLEARN_RAY_STORAGE"


def storage_for(out_dir: Path, spec: Any) -> str:
    """Where a job's engine files go (RaySpec `spec`): `ray.storage`, UNLEARN_RAY_STORAGE, else `<out>/engine`."""
    return spec.storage or os.environ.get(STORAGE_ENV) or str(Path(out_dir).resolve() / "engine")


def spec_hash(spec: Any) -> str:
    """What must not change between a job and its resume: everything the results depend on."""
    data = spec.model_dump(mode="json")
    for volatile in ("tracking",):  # where results are recorded, not what they are
        data.pop(volatile, None)
    data.get("ray", {}).pop("address", None)  # a resumed driver may join the cluster by another address
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class JobState:
    """The resumable record of one job (one seed) in its output folder."""

    folder: str
    spec_hash: str
    token: str
    parent_run: str | None = None
    runs: dict[str, str] = field(default_factory=dict)  # label -> MLflow run id (created, maybe not finished)
    recorded: list[str] = field(default_factory=list)  # labels whose MLflow run is complete (FINISHED)
    models: dict[str, str] = field(default_factory=dict)  # label -> models:/ URI of its logged model
    resumed: int = 0  # how often this job was resumed

    @classmethod
    def begin(cls, folder: Path, spec: Any, resume: bool) -> "JobState":
        """A fresh state (any old one in the folder is replaced), or the folder's state when resuming."""
        path = Path(folder) / STATE_FILE
        digest = spec_hash(spec)
        if not resume:
            return cls(str(folder), digest, f"job-{digest[:10]}")
        if not path.is_file():
            raise BadInput(f"nothing to resume in {folder}: no {STATE_FILE} (was the job started with this --out?)")
        data = json.loads(path.read_text())
        if data["spec_hash"] != digest:
            raise BadInput(f"cannot resume {folder}: the job spec differs from the one it was started with "
                           "(give the same JOB.yaml and --set overrides)")
        data["folder"] = str(folder)
        state = cls(**data)
        state.resumed += 1
        return state

    def save(self) -> None:
        write_json_atomic({k: v for k, v in asdict(self).items() if k != "folder"}, Path(self.folder) / STATE_FILE)

    def run_created(self, label: str, run_id: str) -> None:
        self.runs[label] = run_id
        self.save()

    def run_recorded(self, label: str) -> None:
        if label not in self.recorded:
            self.recorded.append(label)
        self.save()


def engine_folder(root: str, state: JobState, resume: bool) -> str:
    """The job's engine folder under `root` (results and checkpoints); a fresh job starts it empty."""
    folder = f"{root.rstrip('/')}/{state.token}"
    if not resume and "://" not in folder and os.path.isdir(folder):  # leftovers of an earlier, unresumed attempt
        shutil.rmtree(folder)
    return folder


def finished_on_storage(storage: str, labels: list[str]) -> dict[int, dict[str, Any]]:
    """Queue records of the runs whose results an interrupted attempt wrote (index -> {"path": ...})."""
    from unlearn.worker import result_path

    if "://" in storage:
        return {}  # remote storage is not listed here: those runs run again
    return {i: {"path": result_path(storage, label)} for i, label in enumerate(labels)
            if os.path.isfile(result_path(storage, label))}
