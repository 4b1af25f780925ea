"""One Ray session per job: join a cluster (failing fast, with one line, when none answers) or start one locally.

Trainers start lean: no preemption watcher, no Train metrics, 0.2 s controller polls (Ray's default is
2 s), and in the embedded local session no placement-group cleaner.
"""

from __future__ import annotations

import contextlib
import logging
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
    becomes BadInput within about PROBE_TIMEOUT_S seconds instead of Ray's long connection retries, and
    so does a worker group the session can never hold (`check_fits`, also run on a session already up).
    """
    import ray

    lean_train_env()
    # Ray's notice that token authentication is on (its default) says nothing the user must act on; the
    # authentication itself stays as Ray configures it.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    if ray.is_initialized():  # a session someone else started (tests, a Tune driver): the job must still fit it
        check_fits(spec)
        return False
    address = spec.address or os.environ.get("RAY_ADDRESS") or None
    # Workers' and Train controllers' output stays in Ray's log files (session_latest/logs): the driver draws
    # progress and says a lost worker in one line, where Ray would forward a 25-line controller traceback.
    # UNLEARN_DEBUG=1 forwards it all again.
    common = {"logging_level": "warning", "log_to_driver": bool(os.environ.get("UNLEARN_DEBUG")),
              "ignore_reinit_error": True}
    if address is None:  # embedded default: a fresh local instance, sized to this machine (never to the request)
        _refuse_short(spec, {"CPU": float(embedded_cpus(spec))}, _EMBEDDED)  # CPUs are known: no need to start Ray
        # No prestarted idle workers: the job's actors all start their own processes (Train's carry its
        # env vars), so Ray's warm pool would sit idle, a CPU-second of start-up apiece on a small machine.
        _init_keeping_sigterm(address="local", num_cpus=embedded_cpus(spec), include_dashboard=False,
                              _system_config={"prestart_worker_first_driver": False, "enable_worker_prestart": False},
                              **common)
        _EMBEDDED_SESSIONS.add(ray.get_runtime_context().gcs_address)
    else:
        target = _host_port(address)
        if target is not None:
            _probe(address, target)
        try:
            _init_keeping_sigterm(address=address, **common)
        except Exception as err:  # ConnectionError, RuntimeError: one line for the user
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BadInput(f"cannot reach Ray cluster at {address}: {first}") from None
    try:
        check_fits(spec)
    except BaseException:  # the caller never learns it started the session: end it here
        ray.shutdown()
        raise
    return True


def _init_keeping_sigterm(**kwargs) -> None:
    """`ray.init`, then the driver's SIGTERM handler put back: Ray installs `sys.exit` in its place, which would end
    a job stopped by `ray job stop` as a failure instead of like Ctrl-C (the CLI's handler: runs KILLED, resumable)."""
    import signal
    import threading

    import ray

    on_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if on_main else None
    ray.init(**kwargs)
    if handler is not None:
        signal.signal(signal.SIGTERM, handler)


def embedded_cpus(spec: RaySpec) -> int:
    """Logical CPUs of the embedded local session: this machine's, plus one when a worker group fills them.

    The extra one keeps a CPU beside the workers for Ray Data's read tasks (`data: streaming`) when a
    group takes the last core, as the quickstart's 2 workers do on 2 cores. A request larger than the
    machine gets nothing more (it used to get a session of its own size, and hours of oversubscription
    or a silent wait): `check_fits` refuses it.
    """
    cores = os.cpu_count() or 1
    group = spec.num_workers * spec.cpus_per_worker
    return cores + 1 if cores - 1 < group <= cores else cores


def _group_needs(spec: RaySpec) -> dict[str, float]:
    """Logical resources one worker group holds while it runs (Train places a group's workers all at once)."""
    return {"CPU": spec.num_workers * spec.cpus_per_worker, **({"GPU": float(spec.num_workers)} if spec.use_gpu else {})}


def _short_of(needs: dict[str, float], have: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in needs.items() if have.get(k, 0.0) + 1e-9 < v}


def _asked(spec: RaySpec, kind: str, amount: float) -> str:
    per = f"{spec.cpus_per_worker:g} CPU" if kind == "CPU" else "1 GPU"
    return f"{_count(amount, kind)} (1 group x {_count(spec.num_workers, 'worker')} x {per})"


def _count(amount: float, noun: str) -> str:
    return f"{amount:g} {noun}{'' if amount == 1 else 's'}"


_EMBEDDED = f"the embedded Ray session on this machine ({os.cpu_count() or 1} cores)"


def _fields(needs: dict[str, float]) -> str:
    return "ray.num_workers, ray.cpus_per_worker" + (", ray.use_gpu" if "GPU" in needs else "")


def _refuse_short(spec: RaySpec, have: dict[str, float], where: str) -> None:
    """BadInput when one worker group needs more than `have` holds in all."""
    needs = _group_needs(spec)
    short = _short_of(needs, have)
    if short:
        kind = next(iter(short))
        raise BadInput(f"the job asks for {_asked(spec, kind, needs[kind])} but {where} has "
                       f"{_count(have.get(kind, 0.0), kind)} in all ({_fields(needs)})")


def check_fits(spec: RaySpec, poll_s: float = 1.0) -> None:
    """BadInput before any work unless one worker group of the job can be placed on the Ray session.

    A group whose workers exceed the cluster's total logical resources never starts (Ray queues it
    silently). The embedded session cannot grow, so that is final there; a joined cluster may be
    autoscaling, or (total enough) busy with other work, so the check waits up to `ray.resource_wait_s`
    for the group to fit in free resources, with one line saying so. Several groups that together exceed
    the cluster only share it (the engine reports `groups_shared_cpus`).
    """
    import time

    import ray

    needs = _group_needs(spec)
    if in_embedded_session():  # it cannot grow; anything holding its CPUs now is the job's and gives them back
        _refuse_short(spec, ray.cluster_resources(), _EMBEDDED)
        return
    short = _short_of(needs, ray.cluster_resources())
    fields = _fields(needs)
    short_free = _short_of(needs, ray.available_resources())
    if not short_free:
        return
    kind = next(iter(short or short_free))  # CPU before GPU: the one the user most likely got wrong
    if spec.resource_wait_s > 0:
        total, free = ray.cluster_resources().get(kind, 0.0), ray.available_resources().get(kind, 0.0)
        reason = (f"the cluster has {total:g} in all and may be autoscaling" if short
                  else f"{free:g} of the cluster's {total:g} are free")
        print(f"waiting up to {spec.resource_wait_s:g} s for {_asked(spec, kind, needs[kind])}: {reason} "
              "(ray.resource_wait_s)", file=sys.stderr, flush=True)
    deadline = time.monotonic() + spec.resource_wait_s
    while time.monotonic() < deadline:
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        short, short_free = _short_of(needs, ray.cluster_resources()), _short_of(needs, ray.available_resources())
        if not short_free:
            return
        kind = next(iter(short or short_free))
    total, free = ray.cluster_resources().get(kind, 0.0), ray.available_resources().get(kind, 0.0)
    if short:
        raise BadInput(f"the job asks for {_asked(spec, kind, needs[kind])} but the Ray cluster has {_count(total, kind)} "
                       f"in all after {spec.resource_wait_s:g} s ({fields}, ray.resource_wait_s)")
    raise BadInput(f"the job asks for {_asked(spec, kind, needs[kind])} but only {free:g} of the Ray cluster's "
                   f"{_count(total, kind)} were free within {spec.resource_wait_s:g} s ({fields}, ray.resource_wait_s)")


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
