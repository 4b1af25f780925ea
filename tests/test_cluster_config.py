"""cluster.yaml is a valid Ray cluster launcher config (Ray's own validation) with the nodes the docs promise."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_ray_accepts_the_cluster_config_as_written_and_as_ray_up_prepares_it(config):
    validate_config(config)
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` does: merge defaults, then validate


def test_the_cluster_has_a_head_cpu_workers_and_gpu_workers(config):
    nodes = config["available_node_types"]
    assert config["head_node_type"] == "head" and set(nodes) == {"head", "cpu_worker", "gpu_worker"}
    assert nodes["cpu_worker"]["max_workers"] > 0 and nodes["gpu_worker"]["max_workers"] > 0
    assert "gpu" in nodes["gpu_worker"]["docker"]["worker_image"]
    assert nodes["gpu_worker"]["node_config"]["InstanceType"].startswith(("g", "p"))


def test_every_node_installs_this_package_and_sees_the_mlflow_server(config):
    assert config["file_mounts"] == {"~/ray-unlearn": "."}
    for commands in (config["setup_commands"], config["available_node_types"]["gpu_worker"]["worker_setup_commands"]):
        assert any(c.startswith("pip install") and c.endswith("-e ~/ray-unlearn") for c in commands)
    env = [o for o in config["docker"]["run_options"] if o.startswith("--env ")]
    assert any(o.startswith("--env MLFLOW_TRACKING_URI=http") for o in env)
    assert any(o.startswith("--env UNLEARN_RAY_STORAGE=") for o in env)
