"""One Ray session per job: join a cluster (failing fast, with one line, when none answers) or start one locally.

Trainers start lean: no preemption watcher, no Train metrics, 0.2 s controller polls (Ray's default is
2 s), and in the embedded local session no placement-group cleaner.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
from typing import Iterator, Sequence

from unlearn.errors import BadInput
from unlearn.spec import RaySpec

PROBE_TIMEOUT_S = 5.0
# Ray Train knobs that cut the fixed cost of a run; set only where the user has not set them.
LEAN_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one actor less per run; preemption is a cloud-spot feature
    "RAY_TRAIN_METRICS_ENABLED": "0",  # Prometheus metrics callbacks
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",  # controller polls (default 2 s): reports register, fit returns sooner
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",  # rank 0's progress lines reach the driver once, not twice
}


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for a cluster address, None for 'auto'/'local'; BadInput when malformed."""
    if address in ("auto", "local"):
        return None
    if address.startswith(("http://", "https://")):
        raise BadInput(f"ray.address {address!r} is a dashboard (job submission) URL; give the cluster's "
                       "GCS address host:6379 or a Ray client address ray://host:10001")
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise BadInput(f"ray.address {address!r}: expected host:port, ray://host:port, 'auto' or null")
    return host.strip("[]"), int(port)


def _probe(address: str, target: tuple[str, int]) -> None:
    """Fail fast, with one line, unless a Ray cluster answers at `address` (ray.init would retry for long).

    A TCP connect first (refused, unreachable, silent: PROBE_TIMEOUT_S at most), then, for a GCS address,
    one GCS call with the same timeout: some networks accept any TCP connection through a proxy.
    """
    try:
        socket.create_connection(target, timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        raise BadInput(f"cannot reach Ray cluster at {address}: {err.strerror or err}") from None
    if address.startswith("ray://"):
        return
    from ray._raylet import GcsClient

    try:
        with _native_stderr_silenced():  # Ray's C++ client logs each failed attempt to stderr
            GcsClient(address=f"{socket.gethostbyname(target[0])}:{target[1]}").internal_kv_get(
                b"unlearn-probe", namespace=None, timeout=PROBE_TIMEOUT_S)
    except Exception as err:  # RpcError, timeouts: no GCS there, or one that wants a token
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "AuthToken" in first or "uthenticat" in first:
            raise BadInput(f"cannot connect to Ray cluster at {address}: it requires its authentication token "
                           "(export RAY_AUTH_MODE=token, with the token in ~/.ray/auth_token or RAY_AUTH_TOKEN)"
                           ) from None
        raise BadInput(f"cannot reach Ray cluster at {address}: no Ray GCS answers there ({first})") from None


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for a moment (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect(spec: RaySpec) -> bool:
    """Join the spec's cluster, or RAY_ADDRESS's (set by `ray job submit`), or start Ray locally.

    True when this call started the session (the caller shuts it down). An address that does not answer
    becomes BadInput within about PROBE_TIMEOUT_S seconds instead of Ray's long connection retries.
    """
    import ray

    lean_train_env()
    if ray.is_initialized():
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or None
    common = {"logging_level": "warning", "log_to_driver": True, "ignore_reinit_error": True}
    if address is None:  # embedded default: a fresh local instance, sized so Ray Data keeps a CPU beside the workers
        needed = math.ceil(spec.groups * spec.num_workers * spec.cpus_per_worker) + 1
        # No prestarted idle workers: the job's actors all start their own processes (Train's carry its
        # env vars), so Ray's warm pool would sit idle, a CPU-second of start-up apiece on a small machine.
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, needed), include_dashboard=False,
                 _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False}, **common)
        _EMBEDDED_SESSIONS.add(ray.get_runtime_context().gcs_address)
        return True
    target = _host_port(address)
    if target is not None:
        _probe(address, target)
    try:
        ray.init(address=address, **common)
    except Exception as err:  # ConnectionError, RuntimeError: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInput(f"cannot reach Ray cluster at {address}: {first}") from None
    return True


@contextlib.contextmanager
def session_while_importing(spec: RaySpec, modules: Sequence[str], optional: Sequence[str] = ()) -> Iterator[bool]:
    """Join or start the job's Ray session while a thread imports `modules`; ends the session it started.

    `optional` modules are imported best effort (a backend the job may not use, e.g. MLflow's SQL store).

    Starting local Ray (GCS, raylet, agents: ~5 s) is mostly waiting on other processes, and the job's
    imports (torch, MLflow: ~6 s) are one core's work: side by side on a 2-core machine the job's first
    step comes ~5 s sooner. Yields whether this call started the session. Import errors surface here.
    """
    import importlib
    import threading

    failed: list[BaseException] = []

    def load() -> None:
        try:
            for name in modules:
                importlib.import_module(name)
        except BaseException as err:  # re-raised in the caller's thread
            failed.append(err)
            return
        for name in optional:
            try:
                importlib.import_module(name)
            except Exception:  # the job imports it itself if it needs it, and reports errors there
                pass

    loader = threading.Thread(target=load, name="unlearn-imports", daemon=True)
    loader.start()
    started = False
    try:
        started = connect(spec)
        loader.join()
        if failed:
            raise failed[0]
        yield started
    finally:
        if started:
            import ray

            ray.shutdown()


_EMBEDDED_SESSIONS: set[str] = set()  # GCS addresses of the local sessions `connect` started


def in_embedded_session() -> bool:
    """Whether the current Ray session is a local one started by `connect` (no dashboard, ends with the job)."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _EMBEDDED_SESSIONS


def lean_train_env() -> None:
    for key, value in LEAN_TRAIN_ENV.items():
        os.environ.setdefault(key, value)


def quiet_ray_data() -> None:
    """No per-dataset progress bars in the job's output (the step loop prints its own progress).

    Called where a job builds Ray Datasets (`data: streaming`), before its trainer captures the DataContext:
    importing Ray Data costs the driver ~1 s that exact-mode jobs need not pay.
    """
    from ray.data import DataContext

    data = DataContext.get_current()
    data.enable_progress_bars = False
    data.enable_operator_progress_bars = False
    data.print_on_execution_start = False



def local_trainer_class():
    """TorchTrainer for the embedded local session: without the actors it has no use for (local_trainer.py)."""
    try:
        from unlearn.local_trainer import LocalTorchTrainer
    except ImportError:  # a Ray that moved the private classes (the pin and tests/test_ray_private_apis.py guard it)
        from ray.train.torch import TorchTrainer

        return TorchTrainer
    return LocalTorchTrainer


def quiet_worker_logs() -> None:
    """Keep rank 0's progress lines readable: no INFO line per report, no Ray Data notice per dataset."""
    from ray.train.v2._internal.execution import context as train_context

    getattr(train_context, "logger", logging.getLogger("ray.train")).setLevel(logging.WARNING)
    logging.getLogger("ray.data").setLevel(logging.ERROR)
