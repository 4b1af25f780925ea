"""The private Ray APIs the engine leans on (ray_session.py) still exist where it looks for them.

Ray is pinned in pyproject.toml; a Ray upgrade that moves any of these fails here, not in a user's job.
"""

from __future__ import annotations

import ray


def test_ray_is_the_pinned_version():
    assert ray.__version__ == "2.60.0"


def test_the_gcs_client_the_address_probe_uses_delegates_internal_kv_get():
    from ray._raylet import GcsClient, InnerGcsClient

    assert callable(getattr(InnerGcsClient, "internal_kv_get"))
    assert "__getattr__" in dir(GcsClient)  # GcsClient forwards calls to its inner client


def test_the_placement_group_cleaner_is_a_default_callback_the_local_trainer_can_drop():
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    assert isinstance(PlacementGroupCleanerCallback, type)
    assert callable(getattr(TorchTrainer, "_create_default_callbacks"))


def test_the_train_context_module_has_the_logger_the_worker_quiets():
    from ray.train.v2._internal.execution import context as train_context

    assert hasattr(train_context, "logger")


def test_the_local_trainer_leaves_out_the_actors_a_local_session_has_no_use_for(monkeypatch):
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy import FixedScalingPolicy

    from unlearn.local_trainer import LocalFixedScalingPolicy, LocalTorchTrainer

    def kinds(trainer):
        return {type(cb) for cb in trainer._create_default_callbacks()}

    exact = LocalTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1))
    assert PlacementGroupCleanerCallback not in kinds(exact) and DatasetsCallback not in kinds(exact)
    assert PlacementGroupCleanerCallback in kinds(TorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1)))
    streamed = LocalTorchTrainer(lambda: None, scaling_config=ScalingConfig(num_workers=1),
                                 datasets={"retain": lambda: None})  # a dataset factory (not called here)
    assert DatasetsCallback in kinds(streamed)  # streamed runs still get their shards

    seen = {}
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kw: seen.update(kw))
    exact._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling_config=exact.scaling_config))
    assert type(seen["scaling_policy"]) is LocalFixedScalingPolicy
    # what the local policy overrides must exist on Ray's (else the override silently stops applying)
    for name in ("_maybe_send_resource_request", "after_controller_start", "before_controller_shutdown",
                 "before_controller_abort"):
        assert callable(getattr(FixedScalingPolicy, name)), name
