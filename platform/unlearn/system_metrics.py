"""System metrics of one run, sampled on the worker that runs it (rank 0 of its group).

`SystemSampler` is a background thread: one sample when it starts, one every `interval` seconds, one when it
stops (so even a run shorter than the interval has two points). A sample is a dict of MLflow's own system
metric names (`cpu_utilization_percentage`, `system_memory_usage_megabytes`, `gpu_0_memory_usage_megabytes`,
...) and a `timestamp` in ms; the driver logs them as `system/<name>` at step = sample index, which is where
MLflow's UI looks for its System metrics tab. `process_rss_megabytes` (this worker's resident memory) is ours.

psutil reads CPU and memory; without it only the GPU (torch.cuda, when the run is on one) is sampled.
Sampling never fails a run: a reading that raises is left out of that sample.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch

INTERVAL_S = 1.0
MB = 1e6  # MLflow's system metrics use 10^6 bytes


class SystemSampler:
    """Samples CPU %, memory, this process's RSS and the run's GPU in a daemon thread until `stop()`."""

    def __init__(self, device: torch.device | str | None = None, interval: float = INTERVAL_S) -> None:
        self.interval = interval
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.gpu = (device.index or 0) if device.type == "cuda" and torch.cuda.is_available() else None
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="unlearn-system-metrics", daemon=True)
        try:
            import psutil

            self._psutil, self._process = psutil, psutil.Process()
        except ImportError:
            self._psutil = self._process = None
        self._cpu = None  # CPU times at the previous reading

    def start(self) -> "SystemSampler":
        self._thread.start()
        return self

    def stop(self) -> list[dict[str, Any]]:
        """Ends sampling (after one last sample) and returns the samples in time order."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10.0)
        return list(self.samples)

    def __enter__(self) -> "SystemSampler":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _loop(self) -> None:
        self.samples.append(self.sample())  # the start
        while not self._stop.wait(self.interval):  # a stop wakes it at once
            self.samples.append(self.sample())
        self.samples.append(self.sample())  # the end

    def sample(self) -> dict[str, Any]:
        """One reading; CPU % is the whole machine's busy share since the previous reading (none in the first)."""
        out: dict[str, Any] = {"timestamp": int(time.time() * 1000)}
        ps = self._psutil
        if ps is not None:
            times = _try(ps.cpu_times)
            if times is not None and self._cpu is not None:
                busy, total = (b - a for a, b in zip(_busy_total(self._cpu), _busy_total(times)))
                if total > 0:
                    out["cpu_utilization_percentage"] = 100.0 * busy / total
            self._cpu = times
            memory = _try(ps.virtual_memory)
            if memory is not None:
                out["system_memory_usage_megabytes"] = memory.used / MB
                out["system_memory_usage_percentage"] = memory.percent
            _read(out, "process_rss_megabytes", lambda: self._process.memory_info().rss / MB)
        if self.gpu is not None:
            i = self.gpu
            free_total = _try(lambda: torch.cuda.mem_get_info(i))  # the whole device, as MLflow's GPU monitor
            if free_total is not None:
                free, total = free_total
                out[f"gpu_{i}_memory_usage_megabytes"] = (total - free) / MB
                out[f"gpu_{i}_memory_usage_percentage"] = 100.0 * (total - free) / total if total else 0.0
            _read(out, f"gpu_{i}_utilization_percentage", lambda: float(torch.cuda.utilization(i)))  # needs pynvml
        return out


def _busy_total(times: Any) -> tuple[float, float]:
    """(busy, total) CPU seconds; on Linux guest time is already inside user time."""
    parts = times._asdict()
    total = sum(v for k, v in parts.items() if k not in ("guest", "guest_nice"))
    return total - parts.get("idle", 0.0) - parts.get("iowait", 0.0), total


def _try(read: Any) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001: a reading that fails is left out, never the run
        return None


def _read(out: dict[str, Any], name: str, read: Any) -> None:
    value = _try(read)
    if value is not None:
        out[name] = float(value)
