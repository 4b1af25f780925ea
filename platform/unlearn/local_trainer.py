"""TorchTrainer for the local Ray session a job starts itself: three actor processes fewer per run.

What it leaves out, each a Python process that imports Ray Train (~3-4 CPU-seconds apiece on a 2-core
machine, all on the way to the first step):
- the PlacementGroupCleaner, which frees a dead controller's placement groups through the dashboard's state
  API; the embedded session starts no dashboard (it would only log warnings) and ends with the job;
- the autoscaling coordinator the scaling policy sends resource requests to: a local session has fixed
  resources and no autoscaler to read them;
- the DatasetManager actor, when the run is handed no Ray Datasets (`data: exact`).
Runs on a cluster use Ray's TorchTrainer with all three. These are private Ray classes: Ray is pinned in
pyproject.toml and tests/test_ray_private_apis.py fails when they move.
"""

from __future__ import annotations

from ray.train.torch import TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy


class LocalFixedScalingPolicy(FixedScalingPolicy):
    """A fixed-size worker group that never asks an autoscaling coordinator for resources."""

    def _maybe_send_resource_request(self) -> None:
        pass

    def after_controller_start(self, train_run_context) -> None:
        pass

    async def before_controller_shutdown(self) -> None:
        pass

    def before_controller_abort(self) -> None:
        pass


class LocalTorchTrainer(TorchTrainer):
    def _create_default_callbacks(self):
        dropped = (PlacementGroupCleanerCallback,) + (() if self.datasets else (DatasetsCallback,))
        return [cb for cb in super()._create_default_callbacks() if not isinstance(cb, dropped)]

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        policy = controller_init_kwargs.get("scaling_policy")
        if type(policy) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = LocalFixedScalingPolicy(scaling_config=policy.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)
