"""Why TARF's identification of the hidden target misses: how well each score separates it, and each cut.

Under target or data mismatch TARF is handed part of the concept (the given classes); at t1 it scores every
retain sample by its loss change since θ0 and drops the top 10% (τ = 0). This study runs TARF at its
declared defaults on each job, records the scores it computed at t1 (and, beside them, other label-free
scores from the same two models), and reports for each score the AUC against the hidden rows (which only the
job knows) and the precision / recall of three cuts: the paper's top 10%, median + 2·MAD, and a 2-component
Gaussian mixture. No cut reads the concept's size or labels.

    python benchmarks/tarf_identification.py                 # digits and synthetic, target and data mismatch
    python benchmarks/tarf_identification.py --jobs jobs/digits-concept-target.yaml

Writes benchmarks/results/tarf-identification.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "platform"))

from unlearn import spec as spec_mod  # noqa: E402
from unlearn.job import prepare, run_job  # noqa: E402
from unlearn.methods import tarf as tarf_module  # noqa: E402

JOBS = ["jobs/digits-concept-target.yaml", "jobs/digits-concept-data.yaml", "jobs/synthetic-concept-target.yaml",
        "jobs/synthetic-concept-data.yaml"]
RECORD: dict[str, np.ndarray] = {}


class RecordingTARF(tarf_module.TARF):
    """TARF unchanged, except that it keeps the two models' per-sample losses and the original's outputs at t1."""

    def identify(self, ctx) -> None:
        now, before, index, probs = [], [], [], []
        was_training = ctx.module.training
        ctx.module.eval()
        with torch.no_grad():
            for batch in ctx.retain_batches():
                now.append(ctx.loss(ctx.module, batch))
                before.append(ctx.loss(ctx.original, batch))
                index.append(batch.index)
                probs.append(torch.softmax(ctx.original(batch.x), 1))
        ctx.module.train(was_training)
        RECORD.update(now=torch.cat(now).cpu().numpy(), before=torch.cat(before).cpu().numpy(),
                      index=torch.cat(index).cpu().numpy(), probs=torch.cat(probs).cpu().numpy())
        super().identify(ctx)


def scores(forget_labels: np.ndarray) -> dict[str, np.ndarray]:
    d = RECORD["now"] - RECORD["before"]
    ratio = np.log((RECORD["now"] + 1e-6) / (RECORD["before"] + 1e-6))
    return {"abs(Δloss) (the paper's)": np.abs(d), "Δloss (signed)": d, "log loss ratio": ratio,
            "−log loss ratio": -ratio, "original's p(forget labels)": RECORD["probs"][:, forget_labels].sum(1)}


def cuts(score: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.mixture import GaussianMixture

    med = np.median(score)
    mad = 1.4826 * np.median(np.abs(score - med))
    gmm = GaussianMixture(2, random_state=0).fit(score.reshape(-1, 1))
    high = int(np.argmax(gmm.means_.ravel()))
    return {"top 10% (paper)": score >= np.quantile(score, 0.9), "median + 2 MAD": score > med + 2 * mad,
            "2-Gaussian mixture": gmm.predict_proba(score.reshape(-1, 1))[:, high] > 0.5}


def study(path: str) -> list[str]:
    from sklearn.metrics import roc_auc_score

    spec = spec_mod.load(ROOT / path, ["ray.enabled=false", "tracking.enabled=false", "methods=[{name: tarf}]"])
    splits = prepare(spec).splits
    run_job(spec, ROOT / "results" / "benchmarks" / f"tarf-identification-{spec.name}", progress="quiet")
    hidden = np.isin(RECORD["index"], np.setdiff1d(splits.target.index, splits.forget.index))
    np.savez(ROOT / "results" / "benchmarks" / f"tarf-identification-{spec.name}" / "scores.npz", hidden=hidden,
             forget_labels=np.unique(splits.forget.y), **RECORD)  # for other cuts, offline
    lines = [f"## {spec.name}", "", f"Retain stream {len(hidden)} rows, of which hidden target {hidden.sum()} "
             f"({100 * hidden.mean():.1f}%); TARF at its declared defaults, seed {spec.seed}.", "",
             "| score | AUC | " + " | ".join(f"{c}: P / R (share)" for c in cuts(np.arange(10.0))) + " |",
             "|---" * 5 + "|"]
    for name, score in scores(np.unique(splits.forget.y)).items():
        cells = []
        for mask in cuts(score).values():
            found = (mask & hidden).sum()
            cells.append(f"{100 * found / max(mask.sum(), 1):.0f} / {100 * found / hidden.sum():.0f} "
                         f"({100 * mask.mean():.0f}%)")
        lines.append(f"| {name} | {roc_auc_score(hidden, score):.3f} | " + " | ".join(cells) + " |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", nargs="*", default=JOBS)
    args = ap.parse_args()
    from unlearn.methods import REGISTRY

    REGISTRY["tarf"] = RecordingTARF  # the same maths; it only keeps what identify() computed
    lines = ["# TARF: identifying the hidden target", "", __doc__.split("\n\n")[1].replace("\n", " "), ""]
    for path in args.jobs:
        lines += study(path)
    out = ROOT / "benchmarks" / "results" / "tarf-identification.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
