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
