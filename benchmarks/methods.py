"""Every method x every scenario: the table behind the README's results section.

Runs each job spec (jobs/synthetic-*.yaml and jobs/digits-*.yaml by default) with `unlearn.job.run_job`,
collects results.json, and writes benchmarks/results/methods.md and methods.json with FA, RA, TA,
MIA, Gap, KL, seconds and speed-up vs retrain, followed by the issue's acceptance checks, each
marked met or not met (the figures are never bent to meet them).

    python benchmarks/methods.py                       # all scenarios, in-process executor
    python benchmarks/methods.py --seeds 3             # mean ± std over 3 seeds (the evaluation protocol)
    python benchmarks/methods.py --jobs jobs/synthetic-class.yaml --engine ray
    python benchmarks/methods.py --jobs                # no job: rewrite methods.md from methods.json
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from unlearn import spec as spec_mod  # noqa: E402
from unlearn.job import run_job, write_json_atomic  # noqa: E402

COLUMNS = ("FA", "RA", "TA", "MIA", "gap", "KL", "seconds", "speedup")
DEFAULT_JOBS = sorted(glob.glob(str(ROOT / "jobs" / "synthetic-*.yaml"))) + sorted(glob.glob(str(ROOT / "jobs" / "digits-*.yaml")))


def _fmt(v) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def table(methods: dict[str, dict]) -> str:
    backdoor = any("ASR" in m for m in methods.values())  # backdoor jobs: the attack's success, clean TA
    columns = COLUMNS[:3] + ("ASR", "clean_TA") + COLUMNS[3:] if backdoor else COLUMNS
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, m in methods.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m.get(c)) + _spread(m.get(f"{c}_std")) for c in columns) + " |")
    return "\n".join(lines)


def with_clean_model(name: str, res: dict, results: dict) -> dict:
    """A partial-backdoor section's methods with the clean model beside them: the forget-all job's retrain
    (same data, seed and recipe, trained on the clean images only)."""
    every = results.get(name.removesuffix("-10"), {}).get("methods", {})
    if not name.startswith("backdoor-") or not name.endswith("-10") or "retrain" not in every:
        return res["methods"]
    clean = {k: v for k, v in every["retrain"].items() if k.removesuffix("_std") not in ("gap", "KL", "speedup")}
    return {**res["methods"], "clean model (forget-all retrain)": clean}


def _spread(std) -> str:
    """` ± std` where the job ran several seeds (results.json's `<metric>_std`)."""
    return f" ± {std:.2f}" if isinstance(std, (int, float)) else ""


def _norm_policy(res: dict) -> str:
    """Which BatchNorm policy each method of the section's job ran with (its params, else its family default)."""
    from unlearn.methods import build

    try:
        spec = spec_mod.load(ROOT / res["spec"])
    except Exception:  # a job file that moved since: say nothing rather than guess
        return ""
    if spec.model.name not in ("cnn", "resnet18") or "validation" not in res.get("sizes", {}):
        return ""  # no BatchNorm, or measured before the policy (the job files say what runs now)
    by = {}
    for entry in spec.methods:
        params = build(entry.name, dict(entry.params), family=spec.model.name).params
        if "norm_stats" in type(params).model_fields:
            by.setdefault(params.norm_stats, []).append(entry.run_name)
    return "BatchNorm while unlearning: " + "; ".join(f"{policy}: {', '.join(names)}" for policy, names in sorted(by.items())) + "."


def _protocol(res: dict) -> str:
    """Which protocol a section was measured under: seeds (mean ± std) and the validation split, or neither."""
    seeds = res.get("seeds")
    held_out = "validation" in res.get("sizes", {})
    if seeds:
        return f"Seeds {seeds}: cells are mean ± std (ddof 1); " + (
            "TA/MIA/KL on the reported test split, a validation split held out for tuning." if held_out else "")
    return ("One seed" + ("" if held_out else ", measured before the evaluation protocol (no validation split held "
                          "out; some of its job settings were tuned on this split)") + ": no spread.")


def checks(results: dict[str, dict]) -> list[tuple[str, bool, str]]:
    """The issue's 'done when' lines, evaluated on the measured figures."""
    out: list[tuple[str, bool, str]] = []

    def m(job: str) -> dict | None:
        return results.get(job, {}).get("methods")

    cls = m("synthetic-class")
    if cls:
        for name in ("delete", "sfr_on", "grogu"):
            if name in cls:
                r = cls[name]
                out.append((f"class (synthetic): {name} FA ≤ 1 and Gap ≤ 3", r["FA"] <= 1 and r["gap"] <= 3,
                            f"FA {r['FA']:.2f}, Gap {r['gap']:.2f}"))
        best = min((v["gap"], k) for k, v in cls.items() if k not in ("original", "retrain"))
        out.append(("class (synthetic): best Gap ≤ 1.5", best[0] <= 1.5, f"{best[1]} {best[0]:.2f}"))
    rnd = m("synthetic-random")
    if rnd and {"sfr_on", "ft", "ga"} <= set(rnd):
        ok = rnd["sfr_on"]["gap"] < min(rnd["ft"]["gap"], rnd["ga"]["gap"])
        out.append(("random 10% (synthetic): SFR-on Gap below FT's and GA's", ok,
                    f"sfr_on {rnd['sfr_on']['gap']:.2f}, ft {rnd['ft']['gap']:.2f}, ga {rnd['ga']['gap']:.2f}"))
    for job in ("synthetic-concept-target", "synthetic-concept-data"):
        r = m(job)
        if r and {"tarf", "ft", "ga"} <= set(r):
            ok = r["tarf"]["FA"] <= 10 and r["ft"]["FA"] >= 30 and r["ga"]["FA"] >= 30
            out.append((f"{job}: TARF FA ≤ 10 while FT and GA FA ≥ 30", ok,
                        f"tarf {r['tarf']['FA']:.2f}, ft {r['ft']['FA']:.2f}, ga {r['ga']['FA']:.2f}"))
            best = min((v["gap"], k) for k, v in r.items() if k not in ("original", "retrain"))
            out.append((f"{job}: TARF has the lowest Gap", best[1] == "tarf", f"lowest: {best[1]} {best[0]:.2f}, tarf {r['tarf']['gap']:.2f}"))
    bd = m("backdoor-synthetic")
    if bd and "delete" in bd:
        o, d = bd["original"], bd["delete"]
        out.append(("backdoor (synthetic, forget all): the original's ASR ≥ 90", o["ASR"] >= 90, f"ASR {o['ASR']:.2f}"))
        ok = d["ASR"] <= 5 and abs(d["clean_TA"] - o["clean_TA"]) <= 2
        out.append(("backdoor (synthetic, forget all): DELETE ASR ≤ 5 with clean_TA within 2 points of the original's",
                    ok, f"ASR {d['ASR']:.2f}, clean_TA {d['clean_TA']:.2f} vs {o['clean_TA']:.2f}; retrain ASR "
                        f"{bd['retrain']['ASR']:.2f}, clean_TA {bd['retrain']['clean_TA']:.2f}"))
    slow = [(job, k, v.get("speedup")) for job, res in results.items() if job.startswith("synthetic")
            for k, v in res["methods"].items() if k not in ("original", "retrain") and (v.get("speedup") or 0) < 5]
    out.append(("every method ≥ 5× faster than retrain (synthetic)", not slow,
                "all ≥ 5×" if not slow else "; ".join(f"{j}/{k} {s:.1f}×" for j, k, s in slow if s is not None)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="*", default=DEFAULT_JOBS)
    ap.add_argument("--engine", choices=["local", "ray"], default="local")
    ap.add_argument("--set", action="append", default=[], help="override applied to every job")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--seeds", type=int, default=1, help="seeds per job (cells: mean ± std; the protocol asks 3)")
    args = ap.parse_args()
    out = Path(args.out)
    json_path = out / "methods.json"
    results = json.loads(json_path.read_text()) if json_path.exists() else {}
    for path in args.jobs:
        overrides = [f"ray.enabled={'true' if args.engine == 'ray' else 'false'}", *args.set]
        spec = spec_mod.load(path, overrides)
        if args.seeds > 1:
            spec = spec_mod.validate({**spec.model_dump(mode="json"), "seeds": list(range(spec.seed, spec.seed + args.seeds))})
        t0 = time.perf_counter()
        res = run_job(spec, ROOT / "results" / "benchmarks" / spec.name)
        res["wall_seconds"] = time.perf_counter() - t0
        res["spec"] = str(Path(path).resolve().relative_to(ROOT))
        results[spec.name] = res
        write_json_atomic(results, json_path)  # after each job: a long run keeps what it measured
    lines = ["# Methods benchmark", "",
             "Produced by `python benchmarks/methods.py` (2-core CPU, in-process executor unless noted).",
             "`seconds` is the unlearning itself (retrain: training from scratch); speed-up = retrain / method.", ""]
    for name, res in results.items():
        policy = _norm_policy(res)
        lines += [f"## {name}", "", f"spec `{res.get('spec', '?')}`; dataset {res['dataset']} / {res['model']}; "
                  f"forget {json.dumps(res['forget'])}; sizes {json.dumps(res['sizes'])}", "", _protocol(res), "",
                  *([policy, ""] if policy else []), table(with_clean_model(name, res, results)), ""]
    lines += ["## Acceptance checks", ""]
    for text, ok, detail in checks(results):
        lines.append(f"- {'met' if ok else 'NOT met'}: {text} ({detail})")
    lines += ["", "Why a check is not met, and what was tried (searches included): the README's Results section;",
              "the searches: methods-tuning.md and tune.md beside this file."]
    (out / "methods.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
