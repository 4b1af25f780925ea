"""What running on Ray Train costs and buys: the table behind docs/scaling.md.

1. Fixed cost: a trivial run (ft, 1 step, digits MLP) through one `TorchTrainer` vs the same loop in
   this process; the first run after `ray.init` (cold worker processes, Ray Data start-up) and the
   runs after it in the same Ray session (what every further method of a job pays).
2. Step throughput (images/s of the step loop, the run's own `seconds`, start-up excluded): `ft` on the
   synthetic dataset with the small CNN and with ResNet-18 (16 px images, to keep it short on CPU), in
   process (torch's default threads: every core) and on Ray Train with 1 worker x 1 CPU, 1 worker x 2 CPUs
   and 2 workers x 1 CPU (DDP; the same global batch, split in two).

    python benchmarks/scaling.py            # ~3-6 min on 2 cores; writes benchmarks/results/scaling.{md,json}

The machine's load average is recorded with the figures: on a shared machine they move with it.
"""

from __future__ import annotations

import argparse
import os
import platform as std_platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from unlearn.data.scenarios import Split  # noqa: E402
from unlearn.engine import RayExecutor, connect  # noqa: E402
from unlearn.execution import LocalExecutor, RunRequest  # noqa: E402
from unlearn.job import write_json_atomic  # noqa: E402
from unlearn.spec import ModelSpec, RaySpec  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def synthetic(num_train: int, image_size: int, cache_dir: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Training images of the synthetic dataset (random tensors if its loader is unavailable)."""
    try:
        from unlearn.data.synthetic import load_synthetic

        ds = load_synthetic(num_train, 200, image_size, seed=0, cache_dir=cache_dir)
        return ds.x_train, ds.y_train, f"synthetic ({num_train} images, {image_size} px)"
    except ImportError:
        rng = np.random.default_rng(0)
        return (rng.random((num_train, 3, image_size, image_size), dtype=np.float32), rng.integers(0, 20, num_train),
                f"random tensors ({num_train} x 3x{image_size}x{image_size}; synthetic loader unavailable)")


def request(model: ModelSpec, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int) -> RunRequest:
    """`ft` for `steps` steps: plain SGD steps on the retain stream (the bulk of every method's work)."""
    n_forget = max(1, len(y) // 10)
    split = lambda a, b: Split(x[a:b], y[a:b], np.arange(a, b))  # noqa: E731
    return RunRequest(label="bench", method="ft", params={"steps": steps, "batch_size": batch_size, "lr": 0.01},
                      model=model, num_outputs=int(y.max()) + 1, input_shape=tuple(x.shape[1:]), initial_state=None,
                      forget=split(0, n_forget), retain=split(n_forget, len(y)), seed=0)


def fixed_cost(ray_spec: RaySpec, runs: int) -> dict:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    req = request(ModelSpec(name="mlp"), x, y, steps=1, batch_size=64)
    local = LocalExecutor("cpu").run(req, verbose=False)
    executor = RayExecutor(ray_spec)
    rows = []
    for i in range(runs):
        out = executor.run(req)
        rows.append({"run": i + 1, "wall_s": out.wall_seconds, "loop_s": out.seconds,
                     "fixed_s": out.wall_seconds - out.seconds, **executor.timings["bench"]})
        print(f"  fixed cost, run {i + 1}: {rows[-1]['fixed_s']:.1f}s", file=sys.stderr, flush=True)
    return {"in_process": {"wall_s": local.wall_seconds, "loop_s": local.seconds,
                           "fixed_s": local.wall_seconds - local.seconds},
            "ray": rows, "workers": ray_spec.num_workers}


def throughput(name: str, model: ModelSpec, x: np.ndarray, y: np.ndarray, steps: int, batch_size: int) -> dict:
    req = request(model, x, y, steps, batch_size)
    images = steps * batch_size
    LocalExecutor("cpu").run(request(model, x, y, 3, batch_size), verbose=False)  # warm-up: kernels, allocator
    rows = []
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        out = LocalExecutor("cpu").run(req, verbose=False)
        rows.append({"setting": f"in process ({n} thread{'s' if n > 1 else ''})", "workers": 0, "cpus": n,
                     "loop_s": out.seconds, "images_per_s": images / out.seconds, "wall_s": out.wall_seconds})
    torch.set_num_threads(threads)
    for workers, cpus in ((1, 1), (1, 2), (2, 1)):
        out = RayExecutor(RaySpec(num_workers=workers, cpus_per_worker=cpus)).run(req)
        rows.append({"setting": f"Ray Train {workers} worker{'s' if workers > 1 else ''} x {cpus} CPU",
                     "workers": workers, "cpus": cpus, "loop_s": out.seconds, "images_per_s": images / out.seconds,
                     "wall_s": out.wall_seconds})
        print(f"  {name}: {rows[-1]['setting']}: {rows[-1]['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)
    base = max(r["images_per_s"] for r in rows if r["workers"] == 0)  # the best in-process setting
    for r in rows:
        r["vs_in_process"] = r["images_per_s"] / base
    return {"model": name, "steps": steps, "batch_size": batch_size, "rows": rows}


def markdown(result: dict) -> str:
    fc = result["fixed_cost"]
    lines = [
        "# Scaling: what a Ray Train run costs and what two workers buy",
        "",
        f"Machine: {result['machine']}. Load average before / after: {result['load_before']} / "
        f"{result['load_after']} (a shared machine: other work runs beside these figures).",
        f"`ray.init` (local session, no dashboard): {result['ray_init_s']:.1f} s. Total benchmark time: "
        f"{result['total_s'] / 60:.1f} min. Produced by `python benchmarks/scaling.py`.",
        "",
        f"## Fixed cost of one Train run ({fc['workers']} workers; ft, 1 step, digits MLP)",
        "",
        "Fixed cost = the run's wall-clock minus its step loop (worker processes, process group, Ray Data "
        "shards, checkpoint, teardown).",
        "",
        "Where it goes: *start* = `fit()` until the training function runs (Train controller, placement group, "
        "worker processes importing torch and Ray Train, torch process group); *data* = reading the two Ray Data "
        "shards; *setup* = model, DDP wrap (its first use imports torch._dynamo, ~2 s here) and the loop; *end* = "
        "from the loop's end until `fit()` returns (result, controller poll, teardown).",
        "",
        "| run | wall s | loop s | fixed s | start | data | setup | end |",
        "|---|---|---|---|---|---|---|---|",
        f"| in process | {fc['in_process']['wall_s']:.2f} | {fc['in_process']['loop_s']:.2f} | "
        f"{fc['in_process']['fixed_s']:.2f} | | | | |",
    ]
    for r in fc["ray"]:
        label = "Ray Train, first run after ray.init" if r["run"] == 1 else f"Ray Train, run {r['run']} (same session)"
        lines.append(f"| {label} | {r['wall_s']:.2f} | {r['loop_s']:.2f} | {r['fixed_s']:.2f} | {r['start']:.1f} | "
                     f"{r['data']:.1f} | {r['setup_and_loop'] - r['loop']:.1f} | {r['end']:.1f} |")
    later = [r["fixed_s"] for r in fc["ray"][1:]]
    if later:
        lines += ["", f"Later runs in the same session: {np.mean(later):.1f} s on average (aim: <= 10 s)."]
    for tp in result["throughput"]:
        lines += ["", f"## Step throughput: {tp['model']} ({tp['steps']} steps, global batch {tp['batch_size']}; "
                      f"{result['data']})", "",
                  "Ratios are to the best in-process setting (warmed up first; Ray runs start cold).", "",
                  "| setting | loop s | images/s | vs in process |", "|---|---|---|---|"]
        for r in tp["rows"]:
            lines.append(f"| {r['setting']} | {r['loop_s']:.2f} | {r['images_per_s']:.0f} | "
                         f"{r['vs_in_process']:.2f}x |")
    lines += ["", "## Checks", ""]
    lines += [f"- {c['name']}: {c['value']} — {'met' if c['met'] else 'not met'}" for c in result["checks"]]
    return "\n".join(lines) + "\n"


def checks(result: dict) -> list[dict]:
    later = [r["fixed_s"] for r in result["fixed_cost"]["ray"][1:]] or [result["fixed_cost"]["ray"][0]["fixed_s"]]
    out = [{"name": "fixed cost of a Train run after the first <= 10 s", "value": f"{np.mean(later):.1f} s",
            "met": bool(np.mean(later) <= 10.0)}]
    for tp in result["throughput"]:
        two = next(r for r in tp["rows"] if r["workers"] == 2)
        out.append({"name": f"{tp['model']}: 2 workers >= 0.9x the best in-process throughput",
                    "value": f"{two['vs_in_process']:.2f}x", "met": bool(two["vs_in_process"] >= 0.9)})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixed-runs", type=int, default=4, help="Train runs for the fixed cost (first = cold)")
    parser.add_argument("--cnn-steps", type=int, default=60)
    parser.add_argument("--resnet-steps", type=int, default=30)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "unlearn"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]
    result: dict = {"machine": f"{os.cpu_count()} CPU cores, {std_platform.machine()}, torch {torch.__version__}",
                    "load_before": load_before}
    t = time.perf_counter()
    connect(RaySpec(num_workers=2))
    result["ray_init_s"] = time.perf_counter() - t
    result["fixed_cost"] = fixed_cost(RaySpec(num_workers=2), args.fixed_runs)
    x32, y32, data32 = synthetic(2000, 32, args.cache_dir)
    x16, y16, _ = synthetic(2000, 16, args.cache_dir)
    result["data"] = data32.replace(", 32 px", "; ResNet-18 at 16 px")
    result["throughput"] = [
        throughput("cnn", ModelSpec(name="cnn"), x32, y32, args.cnn_steps, 128),
        throughput("resnet18", ModelSpec(name="resnet18"), x16, y16, args.resnet_steps, 32),
    ]
    result["load_after"] = [round(v, 2) for v in os.getloadavg()]
    result["total_s"] = time.perf_counter() - t0
    result["checks"] = checks(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(result, RESULTS / "scaling.json")
    (RESULTS / "scaling.md").write_text(markdown(result))
    print(markdown(result))
    import ray

    ray.shutdown()


if __name__ == "__main__":
    main()
