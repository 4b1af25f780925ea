"""The original model: trained from the spec's `train` recipe, cached by a content hash.

Original training and retrain are the same run (the `retrain` method: fresh weights, cross-entropy
on its data) on different data: the whole training set vs the retain set.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unlearn.atomic import torch_save_atomic
from unlearn.data.scenarios import Split, Splits
from unlearn.execution import Executor, LocalExecutor, RunRequest
from unlearn.spec import JobSpec, TrainSpec

CACHE_VERSION = 1  # bump when training semantics change so old cached originals are not reused


def recipe_params(train: TrainSpec) -> dict[str, Any]:
    """The `retrain` method's params equal to a train recipe."""
    opt = train.optimizer
    return {"epochs": float(train.epochs), "batch_size": train.batch_size, "optimizer": opt.name, "lr": opt.lr,
            "momentum": opt.momentum, "weight_decay": opt.weight_decay, "lr_schedule": train.lr_schedule}


def empty_split(like: Split) -> Split:
    return Split(None, like.y[:0], like.index[:0], like.rows)


def original_key(spec: JobSpec, splits: Splits) -> str:
    """Content hash of everything the original model depends on."""
    # Unset (None) fields are left out, so adding an optional spec field later keeps every cached original
    # (a field set to a value still changes the key).
    payload = {"dataset": spec.dataset.model_dump(mode="json", exclude_none=True), "label_level": splits.label_level,
               # LoRA adapters join method runs only (a causal LM's original trains every weight): one original
               # serves a job with and without them
               "model": spec.model.model_dump(mode="json", exclude_none=True, exclude={"lora"}),
               "train": spec.train.model_dump(mode="json", exclude_none=True),
               "seed": spec.seed, "version": CACHE_VERSION, "n_train": len(splits.train)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def original_path(spec: JobSpec, splits: Splits) -> Path:
    return Path(spec.cache_dir) / "models" / f"{original_key(spec, splits)}.pt"


def cached_original(spec: JobSpec, splits: Splits) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """(weights, info) of the cached original, or (None, info) when it must be trained (info says where to cache)."""
    path = original_path(spec, splits)
    info = {"cached": path.is_file(), "key": path.stem, "path": str(path)}
    if info["cached"]:
        print(f"original model: cached ({path})", file=sys.stderr, flush=True)
        return torch.load(path, map_location="cpu"), info
    return None, info


def save_original(info: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
    """Cache a freshly trained original (atomically: a concurrent job never reads half a file)."""
    torch_save_atomic(state, info["path"])


def original_request(spec: JobSpec, splits: Splits, input_shape: tuple[int, ...], task: str) -> RunRequest:
    """The original's training as a queue item: the `retrain` method with the train recipe on all training data."""
    return RunRequest(label="original", method="retrain", params=recipe_params(spec.train), model=spec.model,
                      num_outputs=splits.num_outputs, input_shape=input_shape, initial_state=None,
                      forget=empty_split(splits.train), retain=splits.train, task=task, seed=spec.seed, role="original")


def original_model(spec: JobSpec, splits: Splits, input_shape: tuple[int, ...], executor: Executor,
                   task: str = "classification") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(weights, info) of the original model: from the cache, or trained now on `executor` and cached."""
    state, info = cached_original(spec, splits)
    if state is not None:
        return state, info
    print(f"original model: training {spec.model.name} on {len(splits.train)} samples "
          f"({spec.train.epochs} epochs)", file=sys.stderr, flush=True)
    out = executor.run(original_request(spec, splits, input_shape, task))
    save_original(info, out.state)
    return out.state, info


def fit_classifier(model: nn.Module, x_train: np.ndarray, y_train: np.ndarray, train_spec: TrainSpec,
                   seed: int, verbose: bool = True) -> nn.Module:
    """Train `model` (fresh) in this process with a recipe: benchmarks, evaluation classifiers."""
    split = Split(x_train, y_train, np.arange(len(y_train)))  # in memory: a helper fit, no store
    num_outputs = int(y_train.max()) + 1
    request = RunRequest(label="fit", method="retrain", params=recipe_params(train_spec), model=None,
                         num_outputs=num_outputs, input_shape=tuple(x_train.shape[1:]), initial_state=None,
                         forget=empty_split(split), retain=split, seed=seed)
    device = next(model.parameters()).device
    out = LocalExecutor(str(device)).run(request, module=model, verbose=verbose)
    model.load_state_dict(out.state)
    return model
