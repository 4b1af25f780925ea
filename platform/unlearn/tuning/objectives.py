"""What a search scores: the retrain-free proxy objective and its targets, and the retrain reference
the `gap` objective is measured to (the formulas are in the `unlearn.tuning` docstring)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from unlearn.atomic import torch_save_atomic
from unlearn.spec import JobSpec, MethodSpec

PENALTY = 100.0  # reported by a diverged trial (gap and proxy are percentages)
# what a trial's rows keep: a classifier's numbers, a language model's (each task reports its own)
REPORTED = ("FA", "RA", "TA", "MIA", "gap", "KL", "proxy", "forget_quality", "model_utility", "forget_ROUGE",
            "retain_ROUGE", "privleak")


@dataclass
class ProxyTargets:
    """What a retrained model would score, estimated without retraining (see the `unlearn.tuning` docstring)."""

    FA: float
    RA: float
    TA: float
    MIA: float | None
    labels_leave: bool  # no retained sample carries a target label


def proxy_targets(splits, metrics: dict[str, float], out, seed: int = 0) -> ProxyTargets:
    """Proxy targets from the original model's metrics and outputs (no retraining)."""
    from unlearn.evaluation.mia import mia_efficacy

    leave = bool(splits.target_labels) and not np.isin(splits.target_labels, splits.retain.y).any()
    mia = None
    if metrics.get("MIA") is not None and math.isfinite(metrics["MIA"]):
        if leave:
            mia = 100.0
        else:
            order = np.random.default_rng(seed).permutation(len(splits.test.y))
            halves = order[: len(order) // 2], order[len(order) // 2:]
            rates = [mia_efficacy(out.retain, splits.retain.y, out.test[a], splits.test.y[a],
                                  out.test[b], splits.test.y[b], seed=seed) for a, b in (halves, halves[::-1])]
            mia = float(np.mean(rates))
    return ProxyTargets(FA=0.0 if leave else metrics["TA"], RA=metrics["RA"], TA=metrics["TA"], MIA=mia,
                        labels_leave=leave)


def proxy_objective(metrics: dict[str, float], targets: ProxyTargets | None) -> float:
    """Retrain-free objective: mean(|FA−FA*|, max(0, RA₀−RA), max(0, TA₀−TA), |MIA−MIA*|); NaN without targets
    (a task the proxy does not score: language models are searched on gap)."""
    if targets is None:
        return float("nan")
    terms = [abs(metrics["FA"] - targets.FA), max(0.0, targets.RA - metrics["RA"]), max(0.0, targets.TA - metrics["TA"])]
    if targets.MIA is not None and metrics.get("MIA") is not None and math.isfinite(metrics["MIA"]):
        terms.append(abs(metrics["MIA"] - targets.MIA))
    return float(np.mean(terms))


# ---------------------------------------------------------------------------------------------------
# the references (the original model is the job's; retrain only for metric gap)


def _retrain_reference(prep, entry: MethodSpec, state, executor):
    """Retrain weights, cached by content hash next to the original model (once per job)."""
    import torch

    from unlearn.job import request_for
    from unlearn.training import original_key

    spec = prep.spec
    request = request_for(prep, entry, state)
    payload = {"original": original_key(spec, prep.splits), "forget": spec.forget.model_dump(mode="json"),
               "params": request.params}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = Path(spec.cache_dir) / "models" / f"retrain-{key}.pt"
    if path.is_file():
        print(f"retrain reference: cached ({path})", file=sys.stderr, flush=True)
        return torch.load(path, map_location="cpu"), request
    print("retrain reference: training once for this job (shared by every trial)", file=sys.stderr, flush=True)
    out = executor.run(request)
    torch_save_atomic(out.state, path)
    return out.state, request


class _LazyExecutor:
    """The job's executor, built on first use: nothing starts when the original and retrain are cached."""

    def __init__(self, spec: JobSpec) -> None:
        self.spec, self.executor = spec, None

    def run(self, request):
        from unlearn.job import make_executor

        if self.executor is None:
            self.executor = make_executor(self.spec)
        return self.executor.run(request)

