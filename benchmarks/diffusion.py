"""Diffusion unlearning benchmark: forget one digit of a class-conditional DDPM or DiT (jobs/ddpm-digits.yaml,
jobs/dit-digits.yaml).

    .venv/bin/python benchmarks/diffusion.py                       # the DDPM job, in this process (~12 min)
    .venv/bin/python benchmarks/diffusion.py --job jobs/dit-digits.yaml --tag dit --cache .cache/unlearn
    .venv/bin/python benchmarks/diffusion.py --set methods.1.params.steps=100

Trains the original DDPM from scratch (a fresh cache in the work folder, so its training time is measured),
then runs the job through `unlearn.job.run_job` with `ray.enabled=false` (every method in this process: on a
2-core machine Ray Train adds ~20 s of start-up per run and nothing else; tests/test_diffusion.py runs SFR-on
on 2 Ray Train workers). Writes benchmarks/results/diffusion.json (results.json of the job, with the
original model's row, plus a `benchmark` section), diffusion.md (table, target check, sample grids) and the
grids under benchmarks/results/diffusion/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _stdlib_platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from unlearn import spec as spec_mod
from unlearn.execution import LocalExecutor
from unlearn.job import prepare, run_job
from unlearn.training import original_model

ROOT = Path(__file__).resolve().parents[1]
TARGET_FA = 5.0  # the bar: SFR-on FA <= 5% where the original's FA >= 70%,
TARGET_ORIGINAL_FA = 70.0
TARGET_FD_RATIO = 1.2  # and FD of the kept classes <= 1.2x the original's


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--job", type=Path, default=ROOT / "jobs" / "ddpm-digits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="spec override key=value")
    p.add_argument("--work", type=Path, default=None, help="work folder (cache, MLflow store); default: a temp folder")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--tag", default="", help="suffix of the result files (diffusion-<tag>.md): one file per backbone")
    p.add_argument("--cache", type=Path, default=None,
                   help="an existing cache folder (a cached original is reused; its training time is then not measured)")
    p.add_argument("--throughput", action="store_true", help="also time sampling on 1 and 2 worker processes")
    p.add_argument("--original-note", default=None, help="with --cache: how the cached original was trained")
    p.add_argument("--note", dest="notes", action="append", default=[],
                   help="a finding to list under Notes (kept in the JSON; with --rewrite, replaces the stored ones)")
    p.add_argument("--job-results", type=Path, default=None,
                   help="a finished run of this job (its results folder): take its results.json instead of running "
                        "the job again (e.g. after the throughput step failed)")
    p.add_argument("--rewrite", action="store_true",
                   help="only re-render diffusion[-tag].md from its existing JSON (no run)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.rewrite:
        stem = "diffusion" + (f"-{args.tag}" if args.tag else "")
        results = json.loads((args.out / f"{stem}.json").read_text())
        if args.notes:
            results["benchmark"]["notes"] = args.notes
        write(results, None, args.out, args.tag)
        return 0
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="unlearn-diffusion-"))
    work.mkdir(parents=True, exist_ok=True)
    cache = args.cache.resolve() if args.cache else work / "cache"
    spec = spec_mod.load(args.job, ["ray.enabled=false", f"cache_dir={cache}", *args.overrides])
    old = os.getcwd()
    os.chdir(work)  # the embedded MLflow store lands in the work folder
    try:
        t0 = time.perf_counter()
        prep = prepare(spec)
        _, info = original_model(spec, prep.splits, prep.input_shape, LocalExecutor("cpu"), prep.task)
        original_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        job_out = args.job_results or work / "results"
        results = (json.loads((job_out / "results.json").read_text()) if args.job_results
                   else run_job(spec, job_out))
        job_s = time.perf_counter() - t0
    finally:
        os.chdir(old)
    from unlearn.evaluation.diffusion import train_judge  # cached by now: read its held-out accuracy

    judge = train_judge(prep.splits, spec.seed, spec.cache_dir)
    results["benchmark"] = {
        "job_file": str(args.job.relative_to(ROOT) if args.job.is_relative_to(ROOT) else args.job),
        "overrides": args.overrides,
        "machine": f"{_stdlib_platform.machine()}, {torch.get_num_threads()} torch threads, cpu",
        "original_train_seconds": round(original_s, 1), "original_was_cached": info["cached"],
        "job_seconds": None if args.job_results else round(job_s, 1), "judge_test_accuracy": round(judge.test_accuracy, 2),
        "parameters": sum(p.numel() for p in _model(spec, prep).parameters()),
        "spec": spec.model_dump(mode="json"),
    }
    if args.original_note:
        results["benchmark"]["original_note"] = args.original_note
    if args.notes:
        results["benchmark"]["notes"] = args.notes
    if args.throughput:
        from sampling_throughput import measure

        results["benchmark"]["sampling"] = measure(spec, prep)
    write(results, job_out, args.out, args.tag)
    return 0


def _model(spec, prep):
    from unlearn.models import build_model

    return build_model(spec.model, prep.splits.num_outputs, prep.input_shape)


def verdict(methods: dict) -> list[str]:
    """The issue's target, checked on the SFR-on row against the original's."""
    original = methods["original"]
    lines = []
    for name, m in methods.items():
        if not name.startswith("sfr_on"):
            continue
        ratio = m["FD"] / original["FD"]
        ok = original["FA"] >= TARGET_ORIGINAL_FA and m["FA"] <= TARGET_FA and ratio <= TARGET_FD_RATIO
        lines.append(f"- **{name}**: FA {m['FA']:.1f}% (target ≤ {TARGET_FA:.0f}%, original {original['FA']:.1f}% "
                     f"≥ {TARGET_ORIGINAL_FA:.0f}%), FD {m['FD']:.2f} = {ratio:.2f}× the original's "
                     f"(target ≤ {TARGET_FD_RATIO}×): **{'met' if ok else 'not met'}**.")
    return lines


def speeds(sampling: dict) -> dict[str, float]:
    """images/s by worker count (keys are ints in a fresh run, strings once read back from JSON)."""
    return {str(k): v["images_per_s"] for k, v in sampling["workers"].items()}


def describe_data(dataset: dict) -> str:
    """The dataset in a few words."""
    if dataset["name"] == "digits":
        return f"scikit-learn's digits, upsampled to {dataset['resize']}x{dataset['resize']}"
    if dataset["name"] == "synthetic":
        return (f"the procedural synthetic set: {dataset['num_train']} training images, {dataset['image_size']}x"
                f"{dataset['image_size']} RGB, 20 classes of 5 shape families")
    return f"dataset `{dataset['name']}`"


def describe_model(model: dict, parameters: int) -> str:
    """One line on the backbone the job ran."""
    if model["name"] == "dit":
        return (f"diffusers `DiTTransformer2DModel`, {model['layers']} layers, width {model['hidden']}, "
                f"{model['heads']} heads, {model['patch']}x{model['patch']} patches, {parameters:,} parameters, "
                f"label table + 1 null row (its own label dropout off), {model['train_timesteps']} DDPM steps")
    return (f"diffusers `UNet2DModel`, block widths {model['channels']}, {model['layers_per_block']} layer per block, "
            f"{parameters:,} parameters, class embedding + 1 unconditional id, {model['train_timesteps']} DDPM steps")


def write(results: dict, job_out: Path | None, out: Path, tag: str = "") -> None:
    stem = "diffusion" + (f"-{tag}" if tag else "")
    grids = out / stem
    grids.mkdir(parents=True, exist_ok=True)
    for png in sorted(job_out.glob("grid_*.png")) if job_out else []:
        shutil.copyfile(png, grids / png.name)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    b, methods = results["benchmark"], results["methods"]
    s = b["spec"]
    model, train = s["model"], s["train"]
    original = methods["original"]
    rows = ["| method | FA % | FU % | CA % | FD | FD / original | seconds | speed-up vs retrain |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in methods.items():
        speed = f"{m['speedup']:.1f}×" if m.get("speedup") else "-"
        secs = (f"{m['seconds']:.1f}" if name != "original" else "(cached)" if b["original_was_cached"]
                else f"({b['original_train_seconds']:.0f} to train)")
        unreadable = f"{m['FU']:.1f}" if "FU" in m else "-"
        rows.append(f"| {name} | {m['FA']:.1f} | {unreadable} | {m['CA']:.1f} | {m['FD']:.2f} "
                    f"| {m['FD'] / original['FD']:.2f} | {secs} | {speed} |")
    params = {e.get("label") or e["name"]: e["params"] for e in s["methods"]}
    unset = {"retrain": "the original's training recipe"}  # an entry without params: what it runs with
    settings = [f"- `{name}`: " + (", ".join(f"{k} {v}" for k, v in p.items()) or unset.get(name, "its declared defaults"))
                for name, p in params.items()]
    grid_lines = [f"![grid_{name}]({stem}/grid_{name}.png)" for name in methods if (grids / f"grid_{name}.png").is_file()]
    sampling = b.get("sampling")
    throughput = ([f"Sampling throughput (DDIM {model['sample_steps']} steps, guidance {model['guidance_scale']}, "
                   f"{sampling['images']} images, each worker its share; identical images: max |Δ| "
                   f"{sampling['max_abs_difference']:.1e}):", "",
                   "| workers | seconds | images/s |", "|---:|---:|---:|",
                   *[f"| {w} | {r['seconds']:.1f} | {r['images_per_s']:.1f} |" for w, r in sampling["workers"].items()],
                   ""] if sampling else [])
    unit = "digit" if s["dataset"]["name"] == "digits" else "class"
    lines = [
        f"# Diffusion unlearning: forget one {unit} of a class-conditional {'DiT' if model['name'] == 'dit' else 'DDPM'}",
        "",
        f"Job `{b['job_file']}` (forget {unit} {', '.join(map(str, results['forget']['classes']))} of "
        f"{describe_data(s['dataset'])}), run by `benchmarks/diffusion.py` on {b['machine']}, "
        "every method in one process (`ray.enabled=false`; the Ray Train path is tested on 2 workers in "
        "tests/test_diffusion.py). Sizes: " + ", ".join(f"{k} {v}" for k, v in results["sizes"].items()) + ".",
        "",
        f"Model: {describe_model(model, b['parameters'])}. Original and retrain recipe: {train['epochs']} epochs, "
        f"batch {train['batch_size']}, {train['optimizer']['name']} lr {train['optimizer']['lr']}, "
        f"{train['lr_schedule']} schedule, label dropout {model['cond_dropout']}; "
        + (f"the original took {b['original_train_seconds']:.0f} s to train here" if not b["original_was_cached"]
           else f"the original was read from the cache ({b.get('original_note', 'trained before this run')})")
        + " (retrain uses the full recipe on the retain set).",
        "",
        f"Evaluation: {s['eval']['samples_per_class']} samples per class, DDIM {model['sample_steps']} steps, "
        f"classifier-free guidance {model['guidance_scale']}, the same starting noise for every model (each "
        "sample's seeded by the job seed, its class and its index). The judge "
        f"is the platform's `cnn` trained on the same training images plus generated noise images as an extra "
        f"*unreadable* class (held-out accuracy {b['judge_test_accuracy']:.1f}%). **FA**: share of the samples drawn "
        f"for the forgotten {unit} that the judge calls that {unit}; **FU**: share of them it reads as no {unit} "
        f"(noise); **CA**: the same for the kept {unit}s (their own label); **FD**: Fréchet distance "
        f"between the judge's penultimate features of generated kept-{unit} samples and real held-out kept-{unit} "
        "images (no Inception weights here, so no FID). Seconds: wall-clock of the unlearning run itself.",
        "",
        *rows,
        "",
        *throughput,
        "Target of the issue (SFR-on FA ≤ 5% where the original's FA ≥ 70%, FD ≤ 1.2× the original's):",
        "",
        *verdict(methods),
        "",
        "Method settings:",
        "",
        *settings,
        "",
        "Notes:",
        "",
        "- The seeds' DDPM code sums the noise-prediction error over the C·H·W pixels; ours is the per-pixel mean "
        "(256× smaller here), so a gradient-norm clip does not transfer as a number. `sfr_on` keeps every released "
        "setting but the clip (0.02 instead of 1, chosen on the DDPM job: 0.01 forgot too little, 0.05 forgot with "
        "more damage); `sfr_on-clip1`, where a job has it, is the released clip taken literally."
        + (" On the DiT, SFR-on's clip 0.01, lr 5e-5 and 300 steps were chosen on validation digits 2, 7, 9 of the "
           "digits job, each forgotten on its own (diffusion-dit-grid.md, diffusion-dit-grid-b.md); the other "
           "methods carry the DDPM job's settings over."
           if model["name"] == "dit" else ""),
        "- `salun` steers the forgotten label to a random other class: the prediction under the forgotten label "
        "is pulled to the detached prediction under a pseudo label (SalUn's DDPM relabelling, "
        "`unlearn.models.ddpm.pseudo_label_loss`), on the top-50% saliency mask, with the release's other settings.",
        f"- `ga` ascends the forgotten {unit}'s noise-prediction loss without any retain term.",
        *([f"- Throughput: the 1-worker timing ran beside another benchmark process on the 2 cores, so the 2-worker "
           "speed-up above 2x is contention, not a property of sharding."]
          if sampling and speeds(sampling)["2"] > 2.2 * speeds(sampling)["1"]
          else []),
        f"- FD is measured on {s['eval']['samples_per_class']} samples per class (with 64, its spread over sampling "
        "seeds for the original was about ±0.05; with 32, ±0.2).",
        *[f"- {note}" for note in b.get("notes", [])],
        "",
        f"Sample grids (one row per {unit}, the forgotten row in red):",
        "",
        *grid_lines,
        "",
    ]
    (out / f"{stem}.md").write_text("\n".join(lines))
    print(f"wrote {out / stem}.md, {out / stem}.json and {grids}/", flush=True)


if __name__ == "__main__":
    sys.exit(main())
