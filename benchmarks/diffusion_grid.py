"""Choose a diffusion method's settings on a validation class: a small grid, never on the reported classes.

    .venv/bin/python benchmarks/diffusion_grid.py --job jobs/dit-digits.yaml --classes 7 --seed 0 \
        --grid clip_grad=0.01,0.02 --grid lr=5e-5,1e-4 --cache .cache/unlearn --tag dit

Every point of the grid (the product of the `--grid` lists, applied over the job's own params of `--method`)
runs as one method entry of a single job that forgets the validation class (`ray.enabled=false`, the job's
original from the cache). The rule: among the points that bring the validation class to FA <= `--max-fa`,
the lowest FD / original's FD; if none does, the lowest FA. Writes benchmarks/results/diffusion-<tag>-grid.md
and .json (every point's FA, CA, FD, seconds, and the chosen one).
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
    p.add_argument("--threads", type=int, default=1)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
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
    data.update(name=f"{base.name}-grid", seed=args.seed, methods=entries,
                forget={**data["forget"], "classes": args.classes})
    spec = spec_mod.JobSpec.model_validate(data)
    old = os.getcwd()
    os.chdir(work)
    try:
        t0 = time.perf_counter()
        results = run_job(spec, work / "results")
        seconds = time.perf_counter() - t0
    finally:
        os.chdir(old)
    original = results["methods"]["original"]
    rows = []
    for point, entry in zip(grid, entries):
        m = results["methods"].get(entry["label"], {})
        rows.append({"point": point, "label": entry["label"], **{k: m.get(k) for k in ("FA", "CA", "FD", "seconds")},
                     "FD_ratio": m["FD"] / original["FD"] if "FD" in m else None, "error": m.get("error")})
    ok = [r for r in rows if r["FA"] is not None and r["FA"] <= args.max_fa]
    pick = (min(ok, key=lambda r: r["FD_ratio"]) if ok
            else min((r for r in rows if r["FA"] is not None), key=lambda r: r["FA"]))
    payload = {"job_file": str(args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job),
               "method": args.method, "validation_classes": args.classes, "seed": args.seed, "max_fa": args.max_fa,
               "base_params": chosen[0].params, "original": {k: original[k] for k in ("FA", "CA", "FD")},
               "rows": rows, "chosen": pick, "seconds": round(seconds, 1)}
    stem = f"diffusion-{args.tag}-grid"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [f"# `{args.method}` settings for `{payload['job_file']}`, chosen on validation class "
             f"{', '.join(map(str, args.classes))} (seed {args.seed})", "",
             f"Run by `benchmarks/diffusion_grid.py` ({seconds:.0f} s). The job reports other classes; this grid only "
             f"reads class {', '.join(map(str, args.classes))}. Rule: among points with FA ≤ {args.max_fa:g}%, the "
             "lowest FD / original's (else the lowest FA). Base params (the job file's): "
             + ", ".join(f"{k} {v}" for k, v in chosen[0].params.items()) + ".", "",
             f"Original on this class: FA {original['FA']:.1f}, CA {original['CA']:.1f}, FD {original['FD']:.2f}.", "",
             "| point | FA % | CA % | FD | FD / original | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r["FA"] is None:
            lines.append(f"| {r['label']} | failed: {r['error']} | | | | |")
            continue
        mark = " **(chosen)**" if r is pick else ""
        lines.append(f"| {r['label']}{mark} | {r['FA']:.1f} | {r['CA']:.1f} | {r['FD']:.2f} | {r['FD_ratio']:.2f} "
                     f"| {r['seconds']:.1f} |")
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / stem}.md: chosen {pick['label']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
