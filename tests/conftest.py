"""Shared fixtures. Keep each fixture self-contained: several test modules add their own here."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Small workloads: one intra-op thread, so parallel test runs share the cores politely (a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for every engine test (starting Ray costs seconds; Train runs reuse it).

    Started the way the engine starts Ray (`unlearn.engine.connect`); shut down at the end of the session
    if it is still up (a test that needs Ray gone, e.g. the `ray start --head` one, may shut it earlier).
    """
    import ray

    from unlearn.engine import connect
    from unlearn.spec import RaySpec

    started = connect(RaySpec(num_workers=2))
    yield
    if started and ray.is_initialized():
        ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """Slow checks get 30 minutes before the hang guard (pyproject's `timeout`) ends them."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(1800))
