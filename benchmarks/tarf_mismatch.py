"""TARF under label-domain mismatch: the paper's identification rule and the `otsu` option, on held-out settings.

Two steps, never mixed:

1. `--select`: the option's settings are chosen on the validation split (`Splits.for_tuning`: TA, MIA and KL on
   the held-out validation rows, never the test split) of the jobs' own setting (jobs/synthetic-concept-target.yaml
   and jobs/synthetic-concept-data.yaml: target superclass 1, seed 0). Every grid point runs TARF with
   `identify: otsu` on both scenarios; the retrain reference of each is computed once and cached. Rule, fixed
   before the grid ran: among the points with FA <= 10 on both tuning cases (the issue's bar), the lowest mean Gap;
   if none, the lowest mean Gap. Writes benchmarks/results/tarf-mismatch-selection.md and .json.
2. (default) the held-out report: the same two jobs with another target superclass (`--target`, not the jobs' 1)
   and seeds other than 0 (`--seeds`, 3 of them), rows retrain, FT and GA (declared defaults), TARF (the paper's
   rule, declared defaults) and TARF with the option at the chosen settings; run with `unlearn.job.run_job` (test
   split, mean ± std). Writes benchmarks/results/tarf-mismatch.md and .json with the issue's done-when line
   evaluated on the figures (met / not met; never bent).

    python benchmarks/tarf_mismatch.py --select                 # validation split, jobs' target 1, seed 0
    python benchmarks/tarf_mismatch.py --target 3 --seeds 1 2 3 # held-out report
    python benchmarks/tarf_mismatch.py --render                 # rewrite the .md from the .json

Set OMP_NUM_THREADS=1 on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from unlearn import loop  # noqa: E402
from unlearn import spec as spec_mod  # noqa: E402
from unlearn.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from unlearn.errors import DivergedError  # noqa: E402
from unlearn.evaluation import ClassificationEvaluator, gap  # noqa: E402
from unlearn.evaluation.identification import identification  # noqa: E402
from unlearn.execution import LocalExecutor, execute  # noqa: E402
from unlearn.job import prepare, request_for, run_job  # noqa: E402
from unlearn.spec import MethodSpec  # noqa: E402
from unlearn.training import original_model  # noqa: E402

SCENARIOS = {"target": "jobs/synthetic-concept-target.yaml", "data": "jobs/synthetic-concept-data.yaml"}
OUT = ROOT / "benchmarks" / "results"
CACHE = ROOT / ".cache" / "unlearn"
# The option's grid (identify: otsu, the per-sample |Δloss| score, re-identified every quarter epoch of phase II):
# per sample or per retain label, and the phase-II length (t0; an oracle run on the tuning case, τ = 0 on exactly
# the hidden rows, still left FA 42 under target mismatch at t0 = 2 and FA 1 at t0 = 4). Cut to 4 points to fit
# the session; exploratory runs on the same tuning cases (once at t1, log ratio) are in tarf-mismatch-selection.md.
GRID = {"identify_by": ["sample", "label"], "identify_every": [0.25], "t0_epochs": [2.0, 4.0]}
FA_BAR = 10.0


def points(grid: dict[str, list]) -> list[dict]:
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def key_of(point: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items())


def job_data(scenario: str, target: int | None = None) -> dict:
    data = spec_mod.load(ROOT / SCENARIOS[scenario]).model_dump(mode="json")
    if target is not None:
        data["forget"] = {**data["forget"], "target": target}
    data.update(ray={"enabled": False}, tracking={"enabled": False})
    return data


def tuning_case(scenario: str, executor: LocalExecutor):
    """(prep on the validation split, evaluator, original weights, retrain's validation metrics) of a job's own setting."""
    data = job_data(scenario)
    data["methods"] = [{"name": "retrain"}]
    spec = spec_mod.validate(data)
    prep = prepare(spec)
    prep = replace(prep, splits=prep.splits.for_tuning())  # validation rows stand in for the test split
    evaluator = ClassificationEvaluator(prep.splits, mia=spec.eval.mia, seed=spec.seed)
    state, info = original_model(spec, prep.splits, prep.input_shape, executor, prep.task)
    path = CACHE / "references" / (f"tarf-mismatch-{info['key']}-{scenario}{spec.forget.target}-"
                                   f"validation{spec.eval.validation_fraction:g}.json")
    if path.exists():
        reference = json.loads(path.read_text())
    else:
        reference = score(prep, evaluator, state, "retrain", {})
        write_json_atomic(reference, path)
    return prep, evaluator, state, reference


def score(prep, evaluator, state, name: str, params: dict) -> dict:
    """One run on the tuning case: validation metrics and the method's identification precision / recall."""
    request = request_for(prep, MethodSpec(name=name, params=params), state)
    batch = request.params.batch_size
    streams = [loop.array_stream(s.x, s.y, batch, seed=request.seed + k, index=s.index)
               for k, s in enumerate((request.forget, request.retain))]
    try:
        run = execute(request, *streams, verbose=False)
    except DivergedError:
        return {"FA": 100.0, "gap": float("inf"), "seconds": float("nan"), "diverged": True}
    metrics, _ = evaluator.evaluate(run.module)
    splits = prep.splits
    return {**metrics, "seconds": run.result.seconds,
            **identification(run.method.diagnostics(), splits.target.index, splits.forget.index)}


def select(scores: dict[str, dict[str, dict]]) -> str:
    """The chosen grid key under the rule in the docstring."""
    rows = {k: (np.mean([m["gap"] for m in v.values()]), max(m["FA"] for m in v.values())) for k, v in scores.items()}
    eligible = [k for k, (_, fa) in rows.items() if fa <= FA_BAR] or list(rows)
    return min(eligible, key=lambda k: rows[k][0])


def run_select() -> None:
    t0 = time.perf_counter()
    executor = LocalExecutor("cpu")
    scores: dict[str, dict[str, dict]] = {}
    references = {}
    for scenario in SCENARIOS:
        prep, evaluator, state, reference = tuning_case(scenario, executor)
        references[scenario] = reference
        for point in [{"identify": "otsu", **p} for p in points(GRID)]:
            metrics = score(prep, evaluator, state, "tarf", point)
            if not metrics.get("diverged"):
                metrics["gap"] = gap(metrics, reference)
            key = key_of(point) or "paper rule (declared defaults)"
            scores.setdefault(key, {})[scenario] = metrics
            print(f"{scenario}: {key}: FA {metrics['FA']:.2f} RA {metrics.get('RA', 0):.2f} Gap {metrics['gap']:.2f} "
                  f"id P/R {metrics.get('id_precision', float('nan')):.0f}/{metrics.get('id_recall', float('nan')):.0f}",
                  file=sys.stderr, flush=True)
    option_scores = {k: v for k, v in scores.items() if k.startswith("identify=otsu")}
    chosen = select(option_scores)
    report = {"jobs": SCENARIOS, "target": 1, "seed": 0, "split": "validation", "grid": GRID, "rule":
              f"FA <= {FA_BAR:g} on both tuning cases, then the lowest mean Gap (none: the lowest mean Gap)",
              "references": references, "scores": scores, "chosen": chosen,
              "chosen_params": {"identify": "otsu", **next(p for p in points(GRID) if key_of({"identify": "otsu", **p}) == chosen)},
              "measured": time.strftime("%Y-%m-%d"), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(report, OUT / "tarf-mismatch-selection.json")
    write_text_atomic(render_selection(report), OUT / "tarf-mismatch-selection.md")
    print(render_selection(report))


def render_selection(report: dict) -> str:
    lines = ["# TARF `identify: otsu`: settings chosen on the validation split", "",
             f"Tuning cases ({report['measured']}): the jobs' own setting (target superclass {report['target']}, seed "
             f"{report['seed']}) of {', '.join(report['jobs'].values())}; FA and RA on the training data, TA and MIA on "
             "the validation split (never the test split), Gap against retrain on the same splits. Rule: "
             f"{report['rule']}."]
    if report.get("how"):
        lines[-1] += f" How: {report['how']}."
    lines += ["", "| params | target: FA | RA | Gap | id P / R | data: FA | RA | Gap | id P / R | mean Gap |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    rows = dict(report["scores"])
    if report.get("paper_rule"):
        rows = {"paper rule (declared defaults; reference, not a candidate)": report["paper_rule"], **rows}
    if report.get("exploratory"):  # measured before the grid with the same scoring; shown, never candidates
        rows.update({f"{k} (exploratory, not a candidate)": v for k, v in report["exploratory"].items()})
    for key, by in rows.items():
        cells = []
        for scenario in SCENARIOS:
            m = by.get(scenario)
            cells += (["–"] * 4 if m is None else [f"{m['FA']:.2f}", f"{m['RA']:.2f}", f"{m['gap']:.2f}",
                                                   f"{m.get('id_precision', float('nan')):.0f} / "
                                                   f"{m.get('id_recall', float('nan')):.0f}"])
        mean_gap = f"{np.mean([m['gap'] for m in by.values()]):.2f}" if len(by) == len(SCENARIOS) else "–"
        name = f"{key} **(chosen)**" if key == report["chosen"] else key
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_gap} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- held-out report
ROWS = ("retrain", "ft", "ga", "tarf", "tarf-otsu")
COLUMNS = ("FA", "RA", "TA", "gap", "id_precision", "id_recall", "seconds")


def run_report(target: int, seeds: list[int]) -> None:
    selection = json.loads((OUT / "tarf-mismatch-selection.json").read_text())
    option = selection["chosen_params"]
    results = {}
    t0 = time.perf_counter()
    for scenario in SCENARIOS:
        if target == job_data(scenario)["forget"]["target"]:
            raise SystemExit("the held-out report needs a target other than the jobs' own")
        data = job_data(scenario, target)
        if 0 in seeds:
            raise SystemExit("the held-out report needs seeds other than the jobs' own (0)")
        data.update(name=f"tarf-mismatch-{scenario}-t{target}", seeds=seeds, methods=[
            {"name": "retrain"}, {"name": "ft"}, {"name": "ga"}, {"name": "tarf"},
            {"name": "tarf", "label": "tarf-otsu", "params": option}])
        spec = spec_mod.validate(data)
        res = run_job(spec, ROOT / "results" / "benchmarks" / spec.name, progress="quiet")
        results[scenario] = {"job": SCENARIOS[scenario], "target": target, "seeds": seeds, "sizes": res["sizes"],
                             "methods": {k: v for k, v in res["methods"].items() if k in ROWS}}
        write_json_atomic({"option": option, "selection": "tarf-mismatch-selection.md", "results": results},
                          OUT / "tarf-mismatch.json")
    report = {"option": option, "selection": "tarf-mismatch-selection.md", "results": results,
              "measured": time.strftime("%Y-%m-%d"), "wall_seconds": round(time.perf_counter() - t0, 1)}
    write_json_atomic(report, OUT / "tarf-mismatch.json")
    write_text_atomic(render_report(report), OUT / "tarf-mismatch.md")
    print(render_report(report))


def checks(report: dict) -> list[tuple[str, bool, str]]:
    """The issue's done-when line, per scenario and TARF row, on the measured means."""
    out = []
    for scenario, res in report["results"].items():
        m = res["methods"]
        for row in ("tarf", "tarf-otsu"):
            if row not in m or "FA" not in m[row]:
                continue
            others = {k: m[k]["gap"] for k in ("ft", "ga") if "gap" in m.get(k, {})}
            ok = (m[row]["FA"] <= FA_BAR and all(m[k]["FA"] >= 30 for k in ("ft", "ga"))
                  and all(m[row]["gap"] < g for g in others.values()))
            out.append((f"{scenario} mismatch, {row}: FA ≤ {FA_BAR:g} while FT and GA FA ≥ 30, lowest Gap of the three",
                        ok, f"{row} FA {m[row]['FA']:.2f} Gap {m[row]['gap']:.2f}; ft FA {m['ft']['FA']:.2f} Gap "
                            f"{m['ft']['gap']:.2f}; ga FA {m['ga']['FA']:.2f} Gap {m['ga']['gap']:.2f}"))
    return out


def _cell(m: dict, column: str) -> str:
    v = m.get(column)
    if v is None:
        return "–"
    std = m.get(f"{column}_std")
    return f"{v:.2f}" + (f" ± {std:.2f}" if isinstance(std, (int, float)) else "")


def render_report(report: dict) -> str:
    option = ", ".join(f"{k}: {v}" for k, v in report["option"].items())
    lines = ["# TARF under label-domain mismatch: the paper's rule and the `otsu` option on held-out settings", "",
             f"Produced by `python benchmarks/tarf_mismatch.py` ({report.get('measured', '?')}; in-process executor, "
             "2-core CPU). Held out: a target superclass other than the jobs' (1) and seeds other than 0; the option's "
             f"settings ({option}) were chosen on the validation split of the jobs' own setting "
             f"({report['selection']}), never on these figures. FT and GA at their declared defaults, TARF (paper "
             "rule) at its declared defaults. Cells: mean ± std (ddof 1) over the seeds; TA on the test split; id P / "
             "R: precision / recall of the rows TARF gave τ = 0 against the hidden part of the target (scored by the "
             "job, which alone knows it).", ""]
    for scenario, res in report["results"].items():
        lines += [f"## {scenario} mismatch ({res['job']}, forget.target = {res['target']}, seeds {res['seeds']})", "",
                  f"sizes {json.dumps(res['sizes'])}", "",
                  "| method | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
        names = {"tarf": "tarf (paper rule)", "tarf-otsu": "tarf-otsu (option)"}
        for row in ROWS:
            m = res["methods"].get(row)
            if m is None:
                continue
            if "error" in m and "FA" not in m:
                lines.append(f"| {names.get(row, row)} | FAILED: {m['error']} |")
                continue
            lines.append(f"| {names.get(row, row)} | " + " | ".join(_cell(m, c) for c in COLUMNS) + " |")
        lines.append("")
        for row in ("ga", "tarf", "tarf-otsu"):
            per_seed = res["methods"].get(row, {}).get("per_seed", {})
            if per_seed:
                lines.append(f"- {names.get(row, row)} per seed ({', '.join(per_seed)}): FA "
                             + " / ".join(f"{m.get('FA', float('nan')):.1f}" for m in per_seed.values()) + ", RA "
                             + " / ".join(f"{m.get('RA', float('nan')):.1f}" for m in per_seed.values())
                             + ("" if row == "ga" else ", identified rows "
                                + " / ".join(f"{m.get('identified', float('nan')):.0f}" for m in per_seed.values())))
        lines.append("")
    lines += ["## Done-when check (issue 14, first line)", ""]
    results = checks(report)
    for text, ok, detail in results:
        lines.append(f"- {'met' if ok else 'NOT met'}: {text} ({detail})")
    both = {s: any(ok for text, ok, _ in results if text.startswith(s)) for s in report["results"]}
    overall = all(both.values()) and len(both) == len(SCENARIOS)
    lines += ["", f"Overall: {'met' if overall else 'NOT met'} (a TARF row must meet the line under both target and "
                  "data mismatch)."]
    lines += ["", "## What was measured on the tuning case (validation split, target 1, seed 0) before choosing", ""]
    lines += [f"- {note}" for note in NOTES]
    return "\n".join(lines) + "\n"


# Exploratory measurements on the tuning case only (jobs' target 1, seed 0, validation split), kept because they
# explain the option's shape; none of them read the held-out settings.
NOTES = [
    "The paper's rule: the phase-I ascent (k0 0.2, clip 1) disturbs far more than the target: at t1 the accuracy of "
    "the whole remain stream is 35% (hidden target 2.5%), so |Δloss| separates the hidden rows only with AUC 0.76 "
    "(target mismatch); under data mismatch AUC 0.99 (tarf-identification.md).",
    "An oracle (τ = 0 on exactly the hidden rows at t1, every other setting declared) reaches FA 0 / Gap 0.2 under "
    "data mismatch but only FA 42 under target mismatch at t0 = 2; at t0 = 4 it reaches FA 1.4 (Gap 3.8). So under "
    "target mismatch identification alone is not enough: phase II must be longer (hence t0 in the grid).",
    "Per-sample Otsu cuts: |Δloss| once at t1 drops 28% of the stream (P 31 / R 54, FA 68); on the log loss ratio "
    "70% (R 98, RA 55); re-identified every 0.25 epoch the per-sample set shrinks to P 43-48 / R 24-26 (FA 67-71).",
    "Per label (the mean |Δloss| of each retain label), target mismatch: the cut keeps 9-10 labels (1800-2000 rows) "
    "at every re-identification: the hidden 5, 6, 7 together with 0, 8, 12 (the other solid variants, like the given "
    "class 4) and 1, 3, 19. Given only solid squares, 'squares' and 'solid shapes' are both consistent with the "
    "loss changes; a smaller ascent (k0 0.05) or an earlier t1 (0.25) keeps the same labels. Hence recall 100 with "
    "precision ~30: FA reaches 0 by forgetting other classes too (RA 54 on the tuning case).",
    "Per label, data mismatch: exactly the hidden rows (P 100 / R 100) at every re-identification.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--select", action="store_true", help="choose the option's settings on the validation split")
    ap.add_argument("--target", type=int, default=3, help="held-out target superclass (the jobs use 1)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--render", action="store_true", help="rewrite the .md files from the .json files")
    args = ap.parse_args()
    if args.render:
        for stem, render in (("tarf-mismatch-selection", render_selection), ("tarf-mismatch", render_report)):
            if (OUT / f"{stem}.json").exists():
                write_text_atomic(render(json.loads((OUT / f"{stem}.json").read_text())), OUT / f"{stem}.md")
        return
    if args.select:
        run_select()
    else:
        run_report(args.target, args.seeds)


if __name__ == "__main__":
    main()
