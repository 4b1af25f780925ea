"""Per-example privacy on digits (U-LiRA): is each method's model distinguishable from retrain, row by row?

Runs jobs/digits-class.yaml and jobs/digits-random.yaml unchanged (every method at the job's settings) with
`eval.shadow_models: 16` over seeds 0, 1, 2 on Ray (the jobs' engine: Train worker groups for the job, one
Ray task per shadow), plus the random job with the paper's random halves (`eval.shadow_share: 0.5`) for the
original and retrain rows. Writes benchmarks/results/ulira.md and ulira.json: balanced accuracy of the attack
(50 = indistinguishable from retrain) and TPR at 1% FPR beside MIA-efficacy (the population attack), then the
issue's acceptance checks, each marked met or not met.

    python benchmarks/ulira.py                  # ~20 min on 2 cores
    python benchmarks/ulira.py --report         # rewrite ulira.md from ulira.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from unlearn import spec as spec_mod  # noqa: E402
from unlearn.job import run_job, write_json_atomic  # noqa: E402

OUT = ROOT / "benchmarks" / "results"
SHADOWS = 16
SEEDS = [0, 1, 2]
SEED_METHODS = ("delete", "sfr_on", "ghr", "gsr", "grogu", "tarf")
COLUMNS = ("FA", "TA", "MIA", "ULiRA_BA", "ULiRA_TPR", "gap")
RUNS = {  # section -> (job file, overrides)
    "digits-class": ("jobs/digits-class.yaml", []),
    "digits-random": ("jobs/digits-random.yaml", []),
    "digits-random, random halves (shadow_share 0.5)": (
        "jobs/digits-random.yaml", ["eval.shadow_share=0.5", "methods=[{name: retrain}]"]),
}


def measure(tracking: bool) -> dict:
    results = {}
    for section, (path, overrides) in RUNS.items():
        sets = [f"eval.shadow_models={SHADOWS}", f"seeds={SEEDS}", *overrides]
        if not tracking:
            sets.append("tracking.enabled=false")
        spec = spec_mod.load(ROOT / path, sets)
        t0 = time.perf_counter()
        res = run_job(spec, ROOT / "results" / "benchmarks" / "ulira" / spec.name / str(len(results)), progress="auto")
        results[section] = {"spec": path, "overrides": sets, "seeds": res["seeds"], "sizes": res["sizes"],
                            "methods": res["methods"], "wall_seconds": round(time.perf_counter() - t0, 1)}
        write_json_atomic(results, OUT / "ulira.json")  # each section as it lands
    return results


def _cell(m: dict, key: str) -> str:
    v, s = m.get(key), m.get(f"{key}_std")
    if not isinstance(v, (int, float)):
        return "–"
    return f"{v:.2f}" + (f" ± {s:.2f}" if isinstance(s, (int, float)) else "")


def decisions(m: dict) -> int:
    """The attack's decisions over every seed (each forget row twice: the model under attack and retrain)."""
    return int(sum(r.get("ULiRA_n", 0) for r in m.get("per_seed", {}).values()))


def checks(results: dict) -> list[tuple[str, bool, str]]:
    out = []
    rnd = results.get("digits-random", {}).get("methods")
    if rnd:
        o, r = rnd["original"], rnd["retrain"]
        out.append(("random 10%: the attack tells the original from retrain at ≥ 65% balanced accuracy (mean of 3 seeds)",
                    o["ULiRA_BA"] >= 65, f"{_cell(o, 'ULiRA_BA')} over {decisions(o)} decisions"))
        out.append(("random 10%: an independent retrain scores 50 ± 5% over ≥ 200 decisions",
                    abs(r["ULiRA_BA"] - 50) <= 5 and decisions(r) >= 200,
                    f"{_cell(r, 'ULiRA_BA')} over {decisions(r)} decisions"))
    for section, res in results.items():
        missing = [name for name in ("original", "retrain", *SEED_METHODS)
                   if name in res["methods"] and "ULiRA_BA" not in res["methods"][name]]
        if missing:
            out.append((f"{section}: every row has the attack's numbers", False, ", ".join(missing)))
    return out


def report(results: dict) -> str:
    lines = ["# Per-example privacy: U-LiRA on digits", "",
             f"Each job runs unchanged (jobs/*.yaml, every method at the job's settings) with `eval.shadow_models: "
             f"{SHADOWS}` over seeds {SEEDS}: {SHADOWS} shadow originals with seeds of their own, each retrained without "
             "the forget rows and unlearned by every method, one Ray task per shadow (2 in parallel on this 2-core "
             "machine). Per forget row, Gaussians of its logit-scaled confidence under the method's shadows and under "
             "the shadow retrains; the attack (likelihood ratio > 1) is applied to the job's model of that method "
             "(positives) and to the job's retrain (negatives). **ULiRA_BA**: balanced accuracy, 50 = "
             "indistinguishable from retrain; **ULiRA_TPR**: TPR at 1% FPR. The original row attacks the original "
             "(the shadows' originals as its 'unlearned' side); the retrain row attacks an *independent* retrain "
             "(another seed) against retrains of its own, so it measures the attack's false alarm. MIA is "
             "MIA-efficacy, the population attack (share of the forget set called non-member). Cells: mean ± std "
             "over seeds.", ""]
    for section, res in results.items():
        lines += [f"## {section}", "",
                  f"`{res['spec']}` with {', '.join(f'`{s}`' for s in res['overrides'])}; sizes {res['sizes']}; "
                  f"{res['wall_seconds']:.0f} s in all (job runs and shadows).", "",
                  "| method | " + " | ".join(COLUMNS) + " | decisions |", "|---" * (len(COLUMNS) + 2) + "|"]
        for name, m in res["methods"].items():
            if "error" in m:
                lines.append(f"| {name} | FAILED: {m['error']} |")
                continue
            lines.append(f"| {name} | " + " | ".join(_cell(m, c) for c in COLUMNS) + f" | {decisions(m)} |")
        lines.append("")
    lines += ["## Checks", ""]
    lines += [f"- {'met' if ok else '**not met**'}: {what} ({detail})" for what, ok, detail in checks(results)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", action="store_true", help="rewrite ulira.md from ulira.json")
    ap.add_argument("--tracking", action="store_true", help="log the runs to MLflow (default: off)")
    args = ap.parse_args()
    results = json.loads((OUT / "ulira.json").read_text()) if args.report else measure(args.tracking)
    (OUT / "ulira.md").write_text(report(results))
    print(report(results))


if __name__ == "__main__":
    main()
