"""Choose the learning rate of each language-model method for the tiny `causal_lm` models of this project.

open-unlearning's 1e-5 is for 1B-8B pretrained models; this project's test models are 2-layer llamas trained from
scratch on the facts set, where AdamW needs far larger steps. Per seed (not the tests' seed 0), an original is fit
on all training rows (AdamW 3e-3, 300 steps, cosine: the tests' fixture) and every method runs at its declared
defaults but the learning rate, over a grid. The rule: the largest rate whose retain answers' NLL stays at most
RETAIN_CAP nats per token at every seed (the original's is ~0.15), i.e. as much forgetting as the method gives
before it costs the retained answers more than that. Forget and retain NLL are the per-sequence answer-token mean
(`lm_task.lm_loss`) over the whole split. Writes benchmarks/results/lm-lr-selection.md and .json.

    python benchmarks/lm_lr_selection.py                  # seeds 1 2, every LLM method
    python benchmarks/lm_lr_selection.py --methods npo    # one method

A quick, training-data proxy (no forget quality or model utility), meant to put each default at the right scale,
not to tune it: a job's own choice belongs to `unlearn tune`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

import torch  # noqa: E402

from unlearn.atomic import write_json_atomic, write_text_atomic  # noqa: E402
from unlearn.batch import Batch  # noqa: E402
from unlearn.execution import LocalExecutor, RunRequest, new_model  # noqa: E402
from unlearn.job import prepare  # noqa: E402
from unlearn.lm_task import lm_loss  # noqa: E402
from unlearn.spec import JobSpec  # noqa: E402
from unlearn.training import empty_split  # noqa: E402

METHODS = ("grad_diff", "npo", "simnpo", "rmu", "delete", "gsr", "ghr", "grogu")
GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
RETAIN_CAP = 0.5
FIT = {"optimizer": "adamw", "lr": 3e-3, "steps": 300, "batch_size": 32, "weight_decay": 0.0, "lr_schedule": "cosine"}
OUT = ROOT / "benchmarks" / "results" / "lm-lr-selection"


def job(seed: int, cache: str) -> dict:
    """The tests' job (tests/test_lm_methods.py) at another seed: 30 facts entities, 10% of them forgotten."""
    return {"name": "lm-lr", "dataset": {"name": "facts", "facts": {"num_entities": 30}},
            "model": {"name": "causal_lm", "config": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2}},
            "forget": {"kind": "class", "fraction": 0.1}, "methods": [{"name": "retrain"}], "cache_dir": cache,
            "seed": seed}


def measure(seed: int, methods: list[str], cache: str) -> list[dict]:
    torch.set_num_threads(1)
    prep = prepare(JobSpec.model_validate(job(seed, cache)))
    s = prep.splits

    def request(method: str, params: dict, state, forget, retain) -> RunRequest:
        return RunRequest(label=method, method=method, params=params, model=prep.spec.model,
                          num_outputs=s.num_outputs, input_shape=prep.input_shape, initial_state=state,
                          forget=forget, retain=retain, task=prep.task, seed=seed)

    def nll(state, split) -> float:
        model = new_model(request("ft", {}, state, s.forget, s.remain)).eval()
        with torch.no_grad():
            return lm_loss(model, Batch(torch.as_tensor(split.x), torch.as_tensor(split.y), None)).mean().item()

    executor = LocalExecutor("cpu")
    state = executor.run(request("retrain", FIT, None, empty_split(s.train), s.train), verbose=False).state
    rows = [{"seed": seed, "method": "original", "lr": None, "forget": nll(state, s.forget),
             "retain": nll(state, s.retain)}]
    for method in methods:
        for lr in GRID:
            t0 = time.perf_counter()
            out = executor.run(request(method, {"lr": lr}, state, s.forget, s.remain), verbose=False)
            rows.append({"seed": seed, "method": method, "lr": lr, "forget": nll(out.state, s.forget),
                         "retain": nll(out.state, s.retain), "seconds": time.perf_counter() - t0})
            print(f"seed {seed} {method} lr {lr:g}: forget {rows[-1]['forget']:.3f} retain {rows[-1]['retain']:.3f}",
                  file=sys.stderr, flush=True)
    return rows


def choose(rows: list[dict], method: str) -> float | None:
    """The largest grid rate whose retain NLL is at most RETAIN_CAP at every seed."""
    ok = [lr for lr in GRID
          if all(r["retain"] <= RETAIN_CAP for r in rows if r["method"] == method and r["lr"] == lr)]
    return max(ok) if ok else None


def render(rows: list[dict], methods: list[str]) -> str:
    seeds = sorted({r["seed"] for r in rows})
    lines = ["# Learning rates of the language-model methods (tiny causal_lm)", "",
             f"Rule: the largest lr of {', '.join(f'{g:g}' for g in GRID)} whose retain answer NLL stays at most "
             f"{RETAIN_CAP} nats/token at every seed ({', '.join(map(str, seeds))}); other params at their "
             "declared causal_lm defaults. Forget / retain: mean answer NLL (nats/token) after the run.", ""]
    for seed in seeds:
        original = next(r for r in rows if r["seed"] == seed and r["method"] == "original")
        lines.append(f"Seed {seed} original: forget {original['forget']:.3f}, retain {original['retain']:.3f}.")
    lines += ["", "| method | lr | " + " | ".join(f"forget s{s} | retain s{s}" for s in seeds) + " | chosen |",
              "|---|---|" + "---|---|" * len(seeds) + "---|"]
    for method in methods:
        chosen = choose(rows, method)
        for lr in GRID:
            cells = []
            for seed in seeds:
                r = next(r for r in rows if r["seed"] == seed and r["method"] == method and r["lr"] == lr)
                cells.append(f"{r['forget']:.3f} | {r['retain']:.3f}")
            lines.append(f"| {method} | {lr:g} | " + " | ".join(cells) + f" | {'**yes**' if lr == chosen else ''} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--cache", default=str(ROOT / ".cache" / "lm-lr-selection"))
    args = parser.parse_args()
    rows = [r for seed in args.seeds for r in measure(seed, args.methods, args.cache)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic({"grid": GRID, "retain_cap": RETAIN_CAP, "fit": FIT, "rows": rows}, OUT.with_suffix(".json"))
    write_text_atomic(render(rows, args.methods), OUT.with_suffix(".md"))
    print(render(rows, args.methods))


if __name__ == "__main__":
    main()
