"""Driver memory at 10k vs 100k images: does the job's driver stay flat as the dataset grows?

Done-when line measured: "With the Parquet cache built beforehand, the driver's peak memory (ru_maxrss)
and the object-store bytes the driver creates for the synthetic job at 10k and at 100k images differ by
less than 20%; the benchmark reports per-worker peak memory beside them."

Per size (num_train 10_000 and 100_000; num_test 2000, 32 px synthetic, cnn [16, 32, 64], train.epochs 1,
retrain / ft / ga at 20 steps each, 2 Ray Train workers, tracking disabled):

1. the Parquet store is built beforehand in its own process (`open_store` of the job's dataset spec);
2. a first, untimed run of the job trains and caches the original model (and warms the page cache);
3. the measured run: the same job again (original cached, only evaluated), in a fresh process that is
   this script in `--child` mode. That wrapper is the job's driver: it
   - counts every object the driver serialises for Ray (class-level wrap of Ray's
     `SerializationContext.serialize`, which both `ray.put` and the by-value arguments of tasks, actor
     constructors and actor methods go through), by `total_bytes` of the serialised object;
   - starts the local Ray session itself (`unlearn.ray_session.connect` with the job's RaySpec, so it
     stays up after the job for Ray's own object-store counters), then runs `unlearn.cli.main(["run", ...])`;
   - samples, every 0.5 s, VmHWM (peak RSS) of every descendant process (raylet, GCS, Ray workers) from
     /proc, and Ray's object-store stats (`FormatGlobalMemoryInfo`: bytes in use, cumulative created);
   - after the job: its own `getrusage(RUSAGE_SELF).ru_maxrss` (the driver process only: raylet, GCS and
     workers are other processes), and the Ray Train workers' VmHWM (pids from the engine's attempt
     records, `<out>/engine/<token>/attempts/*.json`).

    python benchmarks/memory.py                 # ~5-10 min on 2 cores; benchmarks/results/memory.{md,json}
    python benchmarks/memory.py --sizes 2000 4000 --no-write   # a quick smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PYTHON = sys.executable
THRESHOLD = 0.20  # the done-when line: the two sizes differ by less than 20%
INLINE_LIMIT = 100 * 1024  # Ray's max_direct_call_object_size: smaller task arguments travel inside the task spec

JOB_YAML = """\
name: memory-bench
seed: 0
cache_dir: {cache}
dataset: {{name: synthetic, num_train: 10000, num_test: 2000, image_size: 32}}
model: {{name: cnn, channels: [16, 32, 64]}}
train:
  epochs: 1
  batch_size: 64
  optimizer: {{name: sgd, lr: 0.05, momentum: 0.9, weight_decay: 5.0e-4}}
  lr_schedule: cosine
forget: {{kind: class, classes: [5]}}
methods:
  - name: retrain
    params: {{steps: 20}}
  - name: ft
    params: {{steps: 20}}
  - name: ga
    params: {{steps: 20}}
ray: {{enabled: true, num_workers: 2}}
tracking: {{enabled: false}}
"""


# ---------------------------------------------------------------------------------------------------------
# the child: the measured driver


class SerializeCounter:
    """Every object this process serialises for Ray, with its size and what asked for it."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.lock = threading.Lock()

    def install(self) -> None:
        import pickle
        import traceback

        from ray._private import serialization

        original = serialization.SerializationContext.serialize
        counter = self

        def serialize(ctx, value):
            out = original(ctx, value)
            try:
                size, how = int(out.total_bytes), "total_bytes"
            except Exception:  # noqa: BLE001 - a Ray without total_bytes: the pickle's length instead
                size, how = len(pickle.dumps(value, protocol=5)), "pickle"
            stack = traceback.extract_stack(limit=25)[:-1]
            via_put = any(f.name == "put_object" and f.filename.endswith("_private/worker.py") for f in stack)
            where = next((f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(stack)
                          if "/unlearn/" in f.filename or "/ray/train/" in f.filename), "?")
            record = {"bytes": size, "measure": how, "via": "ray.put" if via_put else "argument",
                      "type": type(value).__name__, "where": where, "thread": threading.current_thread().name}
            if record["type"] == "GroupJob":
                record["parts"] = _job_parts(value)
            with counter.lock:
                counter.records.append(record)
            return out

        serialization.SerializationContext.serialize = serialize

    def jobs(self) -> list[dict]:
        """What the GroupJob objects the driver shipped are made of."""
        with self.lock:
            return [r["parts"] for r in self.records if "parts" in r]

    def summary(self) -> dict:
        with self.lock:
            records = list(self.records)
        plasma = [r for r in records if r["via"] == "ray.put" or r["bytes"] >= INLINE_LIMIT]
        by_site: dict[str, dict] = {}
        for r in records:
            key = f"{r['via']} {r['type']} @ {r['where']}"
            site = by_site.setdefault(key, {"count": 0, "bytes": 0})
            site["count"] += 1
            site["bytes"] += r["bytes"]
        return {"objects": len(records), "bytes": sum(r["bytes"] for r in records),
                "plasma_objects": len(plasma), "plasma_bytes": sum(r["bytes"] for r in plasma),
                "ray_put_bytes": sum(r["bytes"] for r in records if r["via"] == "ray.put"),
                "argument_bytes": sum(r["bytes"] for r in records if r["via"] == "argument"),
                "measures": sorted({r["measure"] for r in records}),
                "by_site": dict(sorted(by_site.items(), key=lambda kv: -kv[1]["bytes"]))}


def _job_parts(job) -> dict:
    """Pickled bytes of each distinct split object a GroupJob carries (labels and row ids; a job that names its
    splits for the workers to rebuild from its recipe carries none), and of the rest."""
    import pickle

    splits: dict[int, tuple[str, object]] = {}
    for request in job.requests:
        for part in ("forget", "retain"):
            split = getattr(request, part)
            if not isinstance(split, str):  # a split name: rebuilt by the workers
                splits.setdefault(id(split), (f"{request.label}.{part}", split))
    evaluation = job.eval_splits if isinstance(job.eval_splits, dict) else {}
    for name, split in evaluation.items():
        splits.setdefault(id(split), (f"eval.{name}", split))
    parts = {}
    for name, split in splits.values():
        arrays = {k: v.nbytes for k, v in vars(split).items() if hasattr(v, "nbytes")}
        parts[name] = {"rows": len(split), "pickle_bytes": len(pickle.dumps(split, protocol=5)),
                       "array_bytes": sum(arrays.values()),
                       "dtypes": {k: str(getattr(split, k).dtype) for k in arrays}}
    return {"splits": parts,
            "split_array_bytes": sum(p["array_bytes"] for p in parts.values())}


def _status_kb(pid: int | str, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
        first = args[0].decode(errors="replace")
        if first.startswith("ray::"):
            return first.split()[0]
        return " ".join(a.decode(errors="replace") for a in args[:2])[:80]
    except OSError:
        return "?"


class Sampler(threading.Thread):
    """Every `every_s`: VmHWM of each descendant process, and Ray's object-store stats."""

    def __init__(self, every_s: float = 0.5) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.every_s = every_s
        self.stop = threading.Event()
        self.procs: dict[int, dict] = {}
        self.store = {"max_bytes_used": 0, "cumulative_created_bytes": 0, "cumulative_created_objects": 0,
                      "samples": 0, "error": None}
        self.driver_rss_kb: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self._state = None

    def sample(self) -> None:
        me = os.getpid()
        for pid in _descendants(me):
            hwm = _status_kb(pid, "VmHWM")
            if hwm is None:
                continue
            rec = self.procs.setdefault(pid, {"pid": pid, "vmhwm_kb": 0, "names": []})
            rec["vmhwm_kb"] = max(rec["vmhwm_kb"], hwm)
            name = _name(pid)
            if name not in rec["names"]:
                rec["names"].append(name)
        rss = _status_kb(me, "VmRSS")
        if rss is not None:
            self.driver_rss_kb.append((round(time.monotonic() - self.t0, 1), rss))
        self._sample_store()

    def _sample_store(self) -> None:
        try:
            import ray
            from ray._private import internal_api

            if not ray.is_initialized():
                return
            if self._state is None:
                self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
            stats = internal_api.get_memory_info_reply(self._state, timeout_seconds=10).store_stats
            self.store["max_bytes_used"] = max(self.store["max_bytes_used"], int(stats.object_store_bytes_used))
            self.store["cumulative_created_bytes"] = int(stats.cumulative_created_bytes)
            self.store["cumulative_created_objects"] = int(stats.cumulative_created_objects)
            self.store["samples"] += 1
        except Exception as err:  # noqa: BLE001 - the counters are a cross-check only
            self.store["error"] = f"{type(err).__name__}: {err}"[:300]

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.every_s)


def child(job: str, out: str, sets: list[str], result_path: str) -> None:
    sys.path.insert(0, str(ROOT / "platform"))
    counter = SerializeCounter()
    counter.install()
    import ray
    from unlearn import cli
    from unlearn import spec as spec_mod
    from unlearn.ray_session import connect

    spec = spec_mod.load(job, sets)
    connect(spec.ray)  # this process owns the session: it outlives the job, for Ray's counters
    sampler = Sampler()
    sampler.start()
    codes: list[int] = []
    t0 = time.perf_counter()
    cli.main(["run", job, "--out", out, *[a for s in sets for a in ("--set", s)]], exit=codes.append)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    sampler.sample()  # the workers may be gone by now; VmHWM seen while they lived stays
    attempts = []
    for folder in Path(out, "engine").glob("*/attempts"):
        attempts += [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    worker_pids = sorted({int(a["pid"]) for a in attempts})
    workers = [{"pid": pid, "ranks": sorted({a["rank"] for a in attempts if a["pid"] == pid}),
                "runs": sorted({a["label"] for a in attempts if a["pid"] == pid}),
                "vmhwm_kb": sampler.procs.get(pid, {}).get("vmhwm_kb"),
                "names": sampler.procs.get(pid, {}).get("names", [])} for pid in worker_pids]
    objects = counter.summary()
    result = {
        "exit_code": codes[0] if codes else None,
        "wall_s": wall,
        "driver_ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "driver_vmhwm_kb": _status_kb("self", "VmHWM"),
        "driver_rss_timeline_kb": sampler.driver_rss_kb[:: max(1, len(sampler.driver_rss_kb) // 60)],
        "driver_objects": objects,
        "group_jobs": counter.jobs(),
        "object_store": sampler.store,
        "workers": workers,
        "other_processes": sorted(({"pid": p["pid"], "vmhwm_kb": p["vmhwm_kb"], "names": p["names"]}
                                   for pid, p in sampler.procs.items() if pid not in worker_pids),
                                  key=lambda p: -p["vmhwm_kb"]),
    }
    Path(result_path).write_text(json.dumps(result, indent=1))
    ray.shutdown()


# ---------------------------------------------------------------------------------------------------------
# the parent: build caches, run the job twice per size, write the table


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-25:]
        raise SystemExit(f"{' '.join(cmd[:4])}... exited {proc.returncode} (log {log}):\n" + "\n".join(tail))
    return seconds


def measure_size(n: int, work: Path, job: Path) -> dict:
    sets = [f"dataset.num_train={n}"]
    env = {**os.environ, "UNLEARN_DEBUG": "1", "PYTHONPATH": str(ROOT / "platform")}
    build = ("import sys; from unlearn import spec; from unlearn.data.store import open_store; "
             "s = spec.load(sys.argv[1], sys.argv[2:]); print(open_store(s.dataset, s.seed, s.cache_dir))")
    print(f"[{n}] building the Parquet store ...", file=sys.stderr, flush=True)
    store_s = _run([PYTHON, "-c", build, str(job), *sets], work / f"store-{n}.log", env)
    runs = {}
    for phase in ("first", "measured"):
        out = work / f"out-{n}-{phase}"
        shutil.rmtree(out, ignore_errors=True)
        result = work / f"child-{n}-{phase}.json"
        print(f"[{n}] {phase} run ...", file=sys.stderr, flush=True)
        _run([PYTHON, __file__, "--child", str(job), str(out), str(result), *sets], work / f"run-{n}-{phase}.log", env)
        data = json.loads(result.read_text())
        job_results = json.loads((out / "results.json").read_text())
        data["original_cached"] = job_results["original_cached"]
        data["failed"] = job_results["failed"]
        data["sizes"] = job_results["sizes"]
        data["engine_wall_s"] = job_results["engine"]["wall_seconds"]
        if data["exit_code"] != 0:
            raise SystemExit(f"[{n}] {phase} run: unlearn run exited {data['exit_code']} (log {work}/run-{n}-{phase}.log)")
        runs[phase] = data
        w = [x["vmhwm_kb"] or 0 for x in data["workers"]]
        print(f"[{n}] {phase}: {data['wall_s']:.1f}s, driver {data['driver_ru_maxrss_kb'] / 1024:.0f} MB, "
              f"objects {data['driver_objects']['bytes'] / 1e6:.2f} MB, workers {max(w, default=0) / 1024:.0f} MB, "
              f"original cached: {data['original_cached']}", file=sys.stderr, flush=True)
    if not runs["measured"]["original_cached"]:
        raise SystemExit(f"[{n}] the measured run trained the original again (cache miss)")
    return {"num_train": n, "store_build_s": store_s, **runs}


def row(entry: dict) -> dict:
    m = entry["measured"]
    workers = [w["vmhwm_kb"] for w in m["workers"] if w["vmhwm_kb"]]
    return {"num_train": entry["num_train"], "driver_peak_rss_mb": m["driver_ru_maxrss_kb"] / 1024,
            "driver_object_bytes": m["driver_objects"]["bytes"],
            "driver_plasma_bytes": m["driver_objects"]["plasma_bytes"],
            "worker_peak_rss_mb": max(workers) / 1024 if workers else None,
            "worker_peak_rss_mb_each": [round(w / 1024, 1) for w in workers],
            "store_created_bytes": m["object_store"]["cumulative_created_bytes"],
            "store_max_used_bytes": m["object_store"]["max_bytes_used"],
            "wall_s": m["wall_s"], "first_run_wall_s": entry["first"]["wall_s"],
            "first_run_driver_peak_rss_mb": entry["first"]["driver_ru_maxrss_kb"] / 1024}


def report(entries: list[dict], total_s: float) -> tuple[str, dict]:
    rows = [row(e) for e in entries]
    small, large = rows[0], rows[-1]
    ratio = {k: (large[k] / small[k] if small[k] else None) for k in
             ("driver_peak_rss_mb", "driver_object_bytes", "driver_plasma_bytes", "worker_peak_rss_mb", "wall_s")}
    rss_ok = ratio["driver_peak_rss_mb"] is not None and abs(ratio["driver_peak_rss_mb"] - 1) < THRESHOLD
    obj_ok = ratio["driver_object_bytes"] is not None and abs(ratio["driver_object_bytes"] - 1) < THRESHOLD
    verdict = "met" if rss_ok and obj_ok else "not met"
    fmt_mb = lambda b: f"{b / 1e6:.2f} MB"
    lines = [
        "# Driver memory vs dataset size",
        "",
        ("Written by `python benchmarks/memory.py`. Synthetic job, 32 px, num_test 2000, cnn [16, 32, 64], "
        "retrain / ft / ga at 20 steps each, 2 Ray Train workers (1 CPU each), tracking disabled, on "
        f"{os.cpu_count()} CPU cores. Parquet store and original model cached beforehand; the numbers are "
        "from the second run of the job (original cached, evaluated by the workers)."),
        "",
        ("| num_train | driver peak RSS (MiB) | driver object bytes (to plasma) | per-worker peak RSS, MiB (each) | "
        "Ray store: created / peak in use (all processes) | wall |"),
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['num_train']:,} | {r['driver_peak_rss_mb']:.0f} | {fmt_mb(r['driver_object_bytes'])} "
                     f"({fmt_mb(r['driver_plasma_bytes'])}) | {r['worker_peak_rss_mb']:.0f} "
                     f"({', '.join(f'{w:.0f}' for w in r['worker_peak_rss_mb_each'])}) | "
                     f"{fmt_mb(r['store_created_bytes'])} / {fmt_mb(r['store_max_used_bytes'])} | {r['wall_s']:.1f} s |")
    fr = lambda k: f"{ratio[k]:.2f}" if ratio[k] is not None else "-"
    lines.append(f"| ratio {large['num_train'] // 1000}k/{small['num_train'] // 1000}k | "
                 f"{fr('driver_peak_rss_mb')} | {fr('driver_object_bytes')} ({fr('driver_plasma_bytes')}) | "
                 f"{fr('worker_peak_rss_mb')} | | {fr('wall_s')} |")
    measured = entries[-1]["measured"]["driver_objects"]["by_site"]
    small_sites = entries[0]["measured"]["driver_objects"]["by_site"]
    lines += [
        "",
        (f"**Criterion (< 20% apart at {small['num_train']:,} and {large['num_train']:,} images): {verdict}.** "
        f"Driver peak RSS {small['driver_peak_rss_mb']:.0f} -> {large['driver_peak_rss_mb']:.0f} MiB "
        f"({(ratio['driver_peak_rss_mb'] - 1) * 100:+.1f}%: {'met' if rss_ok else 'not met'}); driver object bytes "
        f"{fmt_mb(small['driver_object_bytes'])} -> {fmt_mb(large['driver_object_bytes'])} "
        f"({(ratio['driver_object_bytes'] - 1) * 100:+.1f}%: {'met' if obj_ok else 'not met'})."),
        "",
        "MB = 10^6 bytes; RSS in MiB (2^20 bytes).",
        "",
        "Objects the driver serialised, largest sources (bytes at each size):",
        "",
        "| source | " + " | ".join(f"{r['num_train']:,}" for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for site in list(measured)[:8]:
        cells = [entries[i]["measured"]["driver_objects"]["by_site"].get(site, {"bytes": 0, "count": 0})
                 for i in range(len(entries))]
        lines.append(f"| `{site}` | " + " | ".join(f"{fmt_mb(c['bytes'])} ({c['count']}x)" for c in cells) + " |")
    del small_sites
    jobs = [e["measured"].get("group_jobs") or [{}] for e in entries]
    if all(j[0].get("splits") for j in jobs):
        lines += [
            "",
            "Inside the `GroupJob` (pickled bytes of each distinct split it carries: labels and row ids, no images):",
            "",
            "| split | " + " | ".join(f"{r['num_train']:,}" for r in rows) + " |",
            "|---|" + "---:|" * len(rows),
        ]
        for name in jobs[-1][0]["splits"]:
            cells = [j[0]["splits"].get(name) for j in jobs]
            lines.append(f"| {name} | " + " | ".join(
                f"{c['rows']:,} rows, {fmt_mb(c['pickle_bytes'])} ({'/'.join(sorted(set(c['dtypes'].values())))})"
                if c else "-" for c in cells) + " |")
    held = []
    for e in entries:
        sizes = e["measured"]["sizes"]
        rows_per_worker = sum(-(-sizes[k] // 2) for k in ("retain", "target", "test"))
        held.append((rows_per_worker, rows_per_worker * 3 * 32 * 32 * 4 / 1e6))
    grow_peak = large["worker_peak_rss_mb"] * 1.048576 - small["worker_peak_rss_mb"] * 1.048576
    lines += [
        "",
        "Evaluation rows each worker reads and keeps (its half of retain + target + test, float32 3x32x32): "
        + "; ".join(f"{r['num_train']:,} images: {n:,} rows = {mb:.0f} MB" for r, (n, mb) in zip(rows, held))
        + f". From the smallest to the largest size the worker peak grows by {grow_peak:.0f} MB for "
        f"{held[-1][1] - held[0][1]:.0f} MB more rows kept ({grow_peak / max(held[-1][1] - held[0][1], 1e-9):.1f}x).",
    ]
    lines += [
        "",
        ("How each number is measured (the measured run's driver is `benchmarks/memory.py --child`, which runs "
        "`unlearn.cli.main(['run', JOB, '--set', 'dataset.num_train=N', '--out', DIR])` in-process):"),
        "",
        ("- **driver peak RSS**: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the driver process after the job "
        "(the raylet, GCS and Ray workers are separate processes and not included). It includes the "
        "interpreter and imports (torch, Ray, pyarrow), which dominate."),
        ("- **driver object bytes**: every object the driver process serialised for Ray, i.e. what `ray.put` "
        "stores and the by-value arguments of tasks, actor constructors and actor method calls (the queue "
        "actor, Ray Train's controller): Ray's `SerializationContext.serialize` is wrapped in the driver and "
        "`total_bytes` of each serialised object summed. In parentheses: the part that goes to the plasma "
        f"store (`ray.put`, and arguments >= {INLINE_LIMIT // 1024} KiB; smaller arguments travel inline in "
        "the task spec). Objects workers create (results, checkpoints) are not the driver's and not counted."),
        ("- **per-worker peak RSS**: VmHWM from `/proc/<pid>/status` of each Ray Train worker process (pids "
        "from the engine's attempt records), sampled every 0.5 s while the job runs; max over the workers, "
        "each in parentheses. It includes the worker's imports and, here, the rows it reads for evaluating "
        "its share of the retain / target / test splits."),
        ("- **Ray store created / peak in use**: Ray's own counters (`FormatGlobalMemoryInfo` store stats: "
        "`cumulative_created_bytes` at the end, max of `object_store_bytes_used` over 0.5 s samples), for "
        "every process of the session, the driver's objects included; a cross-check."),
        "- **wall**: the measured `unlearn run` in the driver (Ray already started by the wrapper).",
        "",
        f"Whole benchmark (store builds, first runs that train the originals, measured runs): {total_s:.0f} s.",
    ]
    payload = {"rows": rows, "ratio_large_over_small": ratio, "criterion": {
        "threshold": THRESHOLD, "driver_rss_met": rss_ok, "driver_object_bytes_met": obj_ok, "verdict": verdict},
        "benchmark_wall_s": total_s, "cpus": os.cpu_count(), "runs": entries}
    return "\n".join(lines) + "\n", payload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--work", default="/tmp/unlearn-memory-bench", help="caches, job outputs and logs")
    p.add_argument("--no-write", action="store_true", help="print the table, do not write benchmarks/results")
    p.add_argument("--report-only", action="store_true", help="rewrite the table from <work>/entries.json")
    p.add_argument("--child", nargs="+", metavar="ARG", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        job, out, result, *sets = args.child
        child(job, out, sets, result)
        return
    t0 = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    job = work / "job.yaml"
    job.write_text(JOB_YAML.format(cache=work / "cache"))
    saved = work / "entries.json"
    if args.report_only:  # the table again from the last benchmark's measurements
        data = json.loads(saved.read_text())
        entries, total_s = data["entries"], data["total_s"]
    else:
        entries = [measure_size(n, work, job) for n in args.sizes]
        total_s = time.perf_counter() - t0
        saved.write_text(json.dumps({"entries": entries, "total_s": total_s}))
    text, payload = report(entries, total_s)
    print(text)
    if not args.no_write:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "memory.md").write_text(text)
        (RESULTS / "memory.json").write_text(json.dumps(payload, indent=1))
        print(f"wrote {RESULTS / 'memory.md'} and memory.json", file=sys.stderr)


if __name__ == "__main__":
    main()
