"""Choose a diffusion method's settings on validation classes: a small grid, never on the reported classes.

    .venv/bin/python benchmarks/diffusion_grid.py --job jobs/dit-digits.yaml --classes 2 7 9 --seed 0 \
        --grid clip_grad=0.01,0.02 --grid steps=75,100,150 --cache .cache/unlearn --tag dit

Each validation class is forgotten on its own, by one job whose method entries are the grid's points (the product
of the `--grid` lists over the job's own params of `--method`; `ray.enabled=false`, the original from the cache),
`--jobs` classes at once. The rule: among the points with FA <= `--max-fa` on every validation class, the lowest
mean FD / original's FD; if none, the lowest worst FA. Writes benchmarks/results/diffusion-<tag>-grid.md and .json
(every point's FA, CA, FD per class, and the chosen one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from unlearn import spec as spec_mod
from unlearn.job import run_job

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=ROOT / "jobs" / "dit-digits.yaml")
    p.add_argument("--classes", type=int, nargs="+", required=True, help="the validation class(es) to forget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method", default="sfr_on")
    p.add_argument("--grid", action="append", default=[], help="param=v1,v2,... (values parsed as YAML)")
    p.add_argument("--max-fa", type=float, default=5.0)
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads per class job")
    p.add_argument("--jobs", type=int, default=2, help="class jobs at once (processes)")
    p.add_argument("--tag", default="dit")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    return p.parse_args(argv)


def points(grid: list[str]) -> list[dict]:
    axes = []
    for item in grid:
        key, _, values = item.partition("=")
        axes.append([(key, scalar(v)) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] if axes else [{}]


def scalar(text: str):
    """int, float (YAML reads 5e-5 as a string), else YAML."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def label(point: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in point.items()) or "job"


def run_class(job: dict, klass: int, work: Path, threads: int) -> dict:
    """One validation class's job (every grid point a method entry), in its own process and folder."""
    torch.set_num_threads(threads)
    job = {**job, "name": f"{job['name']}-{klass}", "forget": {**job["forget"], "classes": [klass]}}
    spec = spec_mod.JobSpec.model_validate(job)
    folder = work / f"class-{klass}"
    folder.mkdir(parents=True, exist_ok=True)
    os.chdir(folder)  # the embedded MLflow store lands here
    return run_job(spec, folder / "results", progress="quiet")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="unlearn-grid-"))
    cache = args.cache.resolve() if args.cache else work / "cache"
    base = spec_mod.load(args.job, ["ray.enabled=false", f"cache_dir={cache}"])
    chosen = [m for m in base.methods if m.run_name == args.method]
    if not chosen:
        raise SystemExit(f"{args.job}: no method named {args.method!r}")
    if set(args.classes) & set(base.forget.classes):
        raise SystemExit(f"--classes {args.classes}: the job reports {base.forget.classes}; tune on another class")
    grid = points(args.grid)
    entries = [{"name": chosen[0].name, "label": f"{args.method}-{label(p)}", "params": {**chosen[0].params, **p}}
               for p in grid]
    data = base.model_dump(mode="json")
    data.update(name=f"{base.name}-grid", seed=args.seed, methods=entries)
    t0 = time.perf_counter()
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {k: pool.submit(run_class, data, k, work, args.threads) for k in args.classes}
        results = {k: f.result() for k, f in futures.items()}
    seconds = time.perf_counter() - t0
    originals = {k: r["methods"]["original"] for k, r in results.items()}
    rows = []
    for point, entry in zip(grid, entries):
        per = {}
        for k, r in results.items():
            m = r["methods"].get(entry["label"], {})
            per[k] = {**{key: m.get(key) for key in ("FA", "FU", "CA", "FD", "seconds")}, "error": m.get("error"),
                      "FD_ratio": m["FD"] / originals[k]["FD"] if "FD" in m else None}
        done = [v for v in per.values() if v["FA"] is not None]
        rows.append({"point": point, "label": entry["label"], "per_class": {str(k): v for k, v in per.items()},
                     "FA_max": max(v["FA"] for v in done) if len(done) == len(per) else None,
                     "FA_mean": float(np.mean([v["FA"] for v in done])) if done else None,
                     "CA_mean": float(np.mean([v["CA"] for v in done])) if done else None,
                     "FD_ratio_mean": float(np.mean([v["FD_ratio"] for v in done])) if done else None})
    complete = [r for r in rows if r["FA_max"] is not None]
    ok = [r for r in complete if r["FA_max"] <= args.max_fa]
    pick = min(ok, key=lambda r: r["FD_ratio_mean"]) if ok else min(complete, key=lambda r: r["FA_max"])
    payload = {"job_file": str(args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job),
               "method": args.method, "validation_classes": args.classes, "seed": args.seed, "max_fa": args.max_fa,
               "base_params": chosen[0].params,
               "originals": {str(k): {key: o[key] for key in ("FA", "CA", "FD")} for k, o in originals.items()},
               "rows": rows, "chosen": pick, "seconds": round(seconds, 1)}
    stem = f"diffusion-{args.tag}-grid"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    classes = ", ".join(map(str, args.classes))
    lines = [f"# `{args.method}` settings for `{payload['job_file']}`, chosen on validation classes {classes} "
             f"(seed {args.seed})", "",
             f"Run by `benchmarks/diffusion_grid.py` ({seconds:.0f} s; one job per class, the original from the "
             f"cache). The job reports class {', '.join(map(str, base.forget.classes))} and the held-out check another "
             f"class; this grid reads only classes {classes}, each forgotten on its own. Rule: among the points whose "
             f"FA is ≤ {args.max_fa:g}% on every validation class, the lowest mean FD / original's (else the lowest "
             "worst FA). Base params (the job file's): "
             + ", ".join(f"{k} {v}" for k, v in chosen[0].params.items()) + ".", "",
             "Originals: " + "; ".join(f"class {k}: FA {o['FA']:.1f}, CA {o['CA']:.1f}, FD {o['FD']:.2f}"
                                       for k, o in originals.items()) + ".", "",
             "| point | worst FA % | mean FA % | mean CA % | mean FD / original | per class: FA / FD ratio |",
             "|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["FA_max"] is None:
            lines.append(f"| {r['label']} | failed | | | | " + "; ".join(
                f"{k}: {v['error']}" for k, v in r["per_class"].items() if v["FA"] is None) + " |")
            continue
        mark = " **(chosen)**" if r is pick else ""
        cells = "; ".join(f"{k}: {v['FA']:.1f} / {v['FD_ratio']:.2f}" for k, v in r["per_class"].items())
        lines.append(f"| {r['label']}{mark} | {r['FA_max']:.1f} | {r['FA_mean']:.1f} | {r['CA_mean']:.1f} "
                     f"| {r['FD_ratio_mean']:.2f} | {cells} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.md: chosen {pick['label']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
