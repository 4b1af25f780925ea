"""Plumbing for tests that run a few gloo worker processes on this machine (imported by test modules as
`from gloo_workers import ...`: pytest puts tests/ on sys.path).

A worker out of step with the others hangs in a collective; `spawn` kills the workers at a deadline and fails the
test, so such a bug fails CI instead of hanging it.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, args: tuple, nprocs: int, timeout_s: float, what: str) -> None:
    """Run `worker(rank, *args)` in `nprocs` processes (as `mp.spawn`; a worker's exception is raised here); kill
    them and fail the test if they have not all finished within `timeout_s`."""
    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {what} workers did not finish in {timeout_s} s (a collective out of step?)")


@contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float = 60) -> Iterator[None]:
    """A gloo process group over 127.0.0.1:`port` for the body; a barrier after the body, then torn down."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    try:
        yield
        # Tearing gloo down while another rank is still in its last collective aborts that process (SIGABRT,
        # "terminate called without an active exception", seen about one run in ten without this barrier).
        dist.barrier()
    finally:
        dist.destroy_process_group()
