"""What running a job on Ray costs: whole `unlearn run` processes on Ray Train workers vs in one process.

For the quickstart (8 runs) and a 4-method job on digits, each timed as a whole process (start-up, data,
every run, MLflow, results), the original model cached for both, paired (Ray and in-process back to back,
alternating which goes first) and repeated; the table reports medians, the ratio, the fixed Ray cost per
job (median Ray minus median in-process seconds) and the largest metric difference between the two.

    python benchmarks/scaling.py [--repeats 3]   # ~6-8 min on 2 cores; writes benchmarks/results/scaling.{md,json}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
UNLEARN = str(Path(sys.executable).parent / "unlearn")
METRICS = ("FA", "RA", "TA", "MIA", "gap")


def jobs(work: Path) -> dict[str, Path]:
    """The quickstart and a 4-method job (retrain, ft, ga, sfr_on) on the same data and cache."""
    quickstart = yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())
    four = dict(quickstart, name="four-methods",
                methods=[m for m in quickstart["methods"] if m["name"] in ("retrain", "ft", "ga", "sfr_on")])
    out = {}
    for name, data in (("quickstart (8 runs)", quickstart), ("4 methods", four)):
        path = work / f"{data['name']}.yaml"
        path.write_text(yaml.safe_dump({**data, "cache_dir": str(work / "cache"),
                                        "tracking": {"uri": f"sqlite:///{work / 'mlruns.db'}"}}))
        out[name] = path
    return out


def timed(job: Path, work: Path, ray: bool) -> dict:
    """Wall seconds of one whole `unlearn run` process and its results."""
    out = work / ("ray" if ray else "local") / job.stem
    command = [UNLEARN, "run", str(job), "--out", str(out)] + ([] if ray else ["--set", "ray.enabled=false"])
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, cwd=work)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-2000:]}")
    results = json.loads((out / "results.json").read_text())
    return {"seconds": seconds, "engine": results["engine"], "methods": results["methods"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="unlearn-scaling-"))
    specs = jobs(work)
    for job in specs.values():  # train and cache the original once, untimed
        timed(job, work, ray=False)
    rows = {}
    for name, job in specs.items():
        runs = {"ray": [], "local": []}
        for repeat in range(args.repeats):
            order = ("ray", "local") if repeat % 2 == 0 else ("local", "ray")
            for kind in order:
                runs[kind].append(timed(job, work, ray=kind == "ray"))
                print(f"{name} {kind} #{repeat + 1}: {runs[kind][-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
        ray_s = statistics.median(r["seconds"] for r in runs["ray"])
        local_s = statistics.median(r["seconds"] for r in runs["local"])
        diff = max(abs(a["methods"][m][k] - b["methods"][m][k])
                   for a, b in zip(runs["ray"], runs["local"], strict=True) for m in a["methods"] for k in METRICS
                   if a["methods"][m].get(k) is not None and b["methods"][m].get(k) is not None)
        rows[name] = {"ray_seconds": ray_s, "local_seconds": local_s, "ratio": ray_s / local_s,
                      "fixed_ray_cost_seconds": ray_s - local_s, "train_runs": runs["ray"][0]["engine"]["train_runs"],
                      "max_metric_difference": diff, "ray_all": [r["seconds"] for r in runs["ray"]],
                      "local_all": [r["seconds"] for r in runs["local"]]}
    load = os.getloadavg()
    lines = ["# Scaling: a whole job on Ray Train workers vs in one process", "",
             f"`python benchmarks/scaling.py --repeats {args.repeats}` on {os.cpu_count()} cores (load average "
             f"{load[0]:.1f} at the end). Whole `unlearn run` processes, original cached for both, paired, medians; "
             "Ray: 2 workers, one worker group (`ray.groups: 1`).", "",
             "| job | Ray s | in-process s | ratio | fixed Ray cost s | Train runs | max metric diff |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['ray_seconds']:.1f} | {r['local_seconds']:.1f} | {r['ratio']:.2f}x | "
                     f"{r['fixed_ray_cost_seconds']:.1f} | {r['train_runs']} | {r['max_metric_difference']:.2f} |")
    aim = all(r["ratio"] <= 2.0 for r in rows.values())
    lines += ["", f"Aim (each job at most 2x its in-process time): {'met' if aim else 'not met'}. "
              f"Metrics of Ray and in-process agree within 1 point: "
              f"{'met' if all(r['max_metric_difference'] <= 1.0 for r in rows.values()) else 'not met'}.",
              "", "Where the fixed cost goes (CPU-seconds per process) and what was cut or tried: README, 'Scaling out'."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "scaling.json").write_text(json.dumps({"repeats": args.repeats, "load_average": load, "jobs": rows},
                                                     indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
