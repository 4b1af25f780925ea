"""Shadow models for the per-example privacy attack (U-LiRA, evaluation/ulira.py), run in parallel on Ray.

`eval.shadow_models: K` adds K shadow originals, each trained with the job's recipe and a seed of its own on
a share of the training rows (`eval.shadow_share`: every row in exactly that share of the shadows; 1, the
default, is the job's own data). From each, the job's forget rows that it trained on are retrained away (the
job's reference recipe on its retain rows) and unlearned by every method of the job (the method's own
validated params), as the job does with the real original; retrain, as a method under test, gets retrains of
its own (another seed). One shadow = one Ray task (or, without Ray, one pass in this process) that returns only
φ, the logit-scaled label confidence of every forget row under each of its models: the weights stay in the
task, except a shadow original and retrain, which are cached like the job's original (the methods' runs are
what is under test and always run). One more task trains an *independent* retrain (the job's retrain recipe on
the full retain set, another seed): the model the retrain row attacks, so that row measures the attack's false
alarm, not a model against itself.

No shadow is ever the attacked model: shadows train with seeds of their own (SHADOW_SEED_BASE).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from unlearn.atomic import torch_save_atomic
from unlearn.data.scenarios import Split
from unlearn.evaluation.ulira import attack, fit_shadows, logit_confidence, membership_plan
from unlearn.execution import LocalExecutor, RunRequest, new_model

SHADOW_SEED_BASE = 1_000_003  # shadow k of a job at seed s trains with seed BASE * (s + 1) + k: never a job seed
INDEPENDENT_OFFSET = 7_919  # the independent retrain's seed offset (any seed other than the job's)
EVAL_BATCH = 1024
ORIGINAL, RETRAIN = ":original", ":retrain"  # a shadow's own original and retrain in ShadowResult.phi (not run labels)


def forget_phi(model: nn.Module, rows: Split, device: torch.device | str = "cpu") -> np.ndarray:
    """φ of each row under `model` (eval mode, no gradients)."""
    model = model.to(device).eval()
    x = torch.as_tensor(rows.x)
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + EVAL_BATCH].to(device)).float().cpu() for i in range(0, len(x), EVAL_BATCH)])
    return logit_confidence(logits, rows.y)


def half(split: Split, member: np.ndarray) -> Split:
    """The rows of `split` that a shadow trains on (`member`: bool over the train part's row ids)."""
    keep = member[split.index]
    return Split(None, split.y[keep], split.index[keep], rows=split.rows, name=split.name)


@dataclass
class ShadowWork:
    """One task's runs. `original` None: the independent retrain alone (it starts from nothing)."""

    k: int  # shadow index (-1: the independent retrain)
    original: RunRequest | None
    retrain: RunRequest
    methods: list[RunRequest]  # each starts from the shadow original's weights (filled in the task)
    attacked: Split  # the job's forget rows: φ is read on all of them
    cached: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # "original"/"retrain" -> weights
    use_gpu: bool = False


@dataclass
class ShadowResult:
    k: int
    phi: dict[str, np.ndarray]  # ORIGINAL, RETRAIN or a method's run label -> φ over the attacked rows
    trained: dict[str, dict[str, torch.Tensor]]  # weights trained here that the driver caches
    seconds: float
    failed: dict[str, str] = field(default_factory=dict)  # method label -> why its run failed on this shadow


def run_shadow(work: ShadowWork) -> ShadowResult:
    """Train (or load) the shadow original and retrain, unlearn with every method, read φ: plain PyTorch."""
    t0 = time.perf_counter()
    device = "cuda" if work.use_gpu and torch.cuda.is_available() else "cpu"
    local = LocalExecutor(device)
    phi: dict[str, np.ndarray] = {}
    trained: dict[str, dict[str, torch.Tensor]] = {}

    def weights(name: str, request: RunRequest) -> dict[str, torch.Tensor]:
        if name in work.cached:
            return work.cached[name]
        trained[name] = local.run(request, verbose=False).state
        return trained[name]

    base = None
    if work.original is not None:
        base = weights("original", work.original)
        phi[ORIGINAL] = forget_phi(new_model(replace(work.original, initial_state=base)), work.attacked, device)
    state = weights("retrain", work.retrain)
    phi[RETRAIN] = forget_phi(new_model(replace(work.retrain, initial_state=state)), work.attacked, device)
    failed: dict[str, str] = {}
    for request in work.methods:  # a method that fails on a shadow (e.g. diverges) loses its numbers, not the job
        try:
            out = local.run(replace(request, initial_state=base), verbose=False)
        except Exception as err:  # noqa: BLE001 - reported per method by the job
            failed[request.label] = f"{type(err).__name__}: {err}".splitlines()[0]
            continue
        phi[request.label] = forget_phi(new_model(replace(request, initial_state=out.state)), work.attacked, device)
    return ShadowResult(work.k, phi, trained, time.perf_counter() - t0, failed)


@dataclass
class ShadowPlan:
    """The works of a job's attack and how their outcome is scored."""

    works: list[ShadowWork]
    member: np.ndarray  # bool [K, train rows]
    attacked: Split
    cache: dict[int, dict[str, Path]]  # shadow index -> {"original"/"retrain": cache file}


def plan_shadows(n_shadows: int, seed: int, train: Split, forget: Split, retain: Split, remain: Split,
                 original: RunRequest, reference: RunRequest, methods: list[RunRequest], keys: dict[str, str],
                 cache_dir: str | Path, share: float = 1.0, use_gpu: bool = False) -> ShadowPlan:
    """Shadow k: the original's request on its rows, the reference's on its retain rows, every method on its
    forget / remain rows; plus the independent retrain. `keys`: the content hash each cached model
    ("original", "retrain") depends on; cached weights are loaded here."""
    n_rows = int(max(train.index.max(), forget.index.max()) + 1)
    member = membership_plan(n_rows, n_shadows, seed, share)
    folder = Path(cache_dir) / "models"
    works, cache = [], {}
    for k in range(n_shadows):
        s = SHADOW_SEED_BASE * (seed + 1) + k
        orig = replace(original, label=f"shadow{k}-original", retain=half(train, member[k]), seed=s)
        ret = replace(reference, label=f"shadow{k}-retrain", retain=half(retain, member[k]), seed=s,
                      initial_state=None)
        runs = [replace(m, forget=half(forget, member[k]), retain=half(remain, member[k]), seed=s) for m in methods]
        # retrain as the method under test: its own retrains, seeded apart from the shadow's reference
        runs.append(replace(ret, label=reference.label, seed=s + INDEPENDENT_OFFSET))
        paths = {name: folder / f"shadow-{keys[name]}-{n_shadows}x{share:g}-{k}.pt" for name in ("original", "retrain")}
        cached = {name: torch.load(p, map_location="cpu") for name, p in paths.items() if p.is_file()}
        works.append(ShadowWork(k, orig, ret, runs, forget, cached, use_gpu))
        cache[k] = paths
    independent = replace(reference, label="independent-retrain", seed=seed + INDEPENDENT_OFFSET, initial_state=None)
    works.append(ShadowWork(-1, None, independent, [], forget, {}, use_gpu))
    return ShadowPlan(works, member, forget, cache)


def run_works(plan: ShadowPlan, use_ray: bool, say: Callable[[str], None]) -> list[ShadowResult]:
    """Every work: as Ray tasks in parallel (one CPU each, retried if a node is lost), else in this process.
    Freshly trained shadow originals and retrains are cached as they arrive."""
    results: list[ShadowResult] = []
    total, t0 = len(plan.works), time.perf_counter()

    def arrived(result: ShadowResult) -> None:
        for name, state in result.trained.items():
            if result.k >= 0:
                torch_save_atomic(state, plan.cache[result.k][name])
        result.trained = {}
        results.append(result)
        if len(results) == total or len(results) % max(1, total // 4) == 0:
            say(f"[u-lira] {len(results)}/{total} shadow tasks done ({time.perf_counter() - t0:.0f}s)")

    if not use_ray:
        for work in plan.works:
            arrived(run_shadow(work))
        return results
    import ray

    task = ray.remote(run_shadow).options(num_cpus=1, num_gpus=1 if plan.works[0].use_gpu else 0, max_retries=2)
    pending = [task.remote(work) for work in plan.works]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        arrived(ray.get(done[0]))
    return results


def score(plan: ShadowPlan, results: list[ShadowResult], attacked_phi: dict[str, np.ndarray], reference: str,
          method_labels: list[str]) -> tuple[dict[str, dict[str, float]], dict[str, tuple[np.ndarray, np.ndarray]]]:
    """U-LiRA's numbers per row of the job, the forget rows under the job's retrain being the negatives: each
    method's model against its shadows, the original against the shadow originals (unlearned by nothing), and
    the retrain row an independent retrain against the shadows' independent retrains. Also the attack's
    scores Λ per row (positives, negatives) for the ROC plot."""
    by_k = {r.k: r.phi for r in results}
    shadows = sorted(k for k in by_k if k >= 0)
    holds = plan.member[shadows][:, plan.attacked.index]  # [K, rows]: shadow k trained on the row
    stack = lambda label: np.stack([by_k[k][label] for k in shadows])  # noqa: E731
    retrained, never = stack(RETRAIN), np.ones_like(holds)  # no shadow retrain trained on a forget row
    attacked = {**attacked_phi, ORIGINAL: attacked_phi["original"], reference: by_k[-1][RETRAIN]}
    numbers, curves = {}, {}
    complete = [label for label in method_labels if all(label in by_k[k] for k in shadows)]
    for label in [*complete, ORIGINAL, reference]:
        fit = fit_shadows(stack(label), holds, retrained, never)
        numbers[label.lstrip(":")] = attack(fit, attacked[label], attacked_phi[reference])
        curves[label.lstrip(":")] = (fit.score(attacked[label]), fit.score(attacked_phi[reference]))
    return numbers, curves


def cache_key(payload: dict[str, Any]) -> str:
    """A short content hash of what a cached shadow model depends on."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
