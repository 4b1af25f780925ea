"""Classification metrics computed by the workers, each on its share of the evaluation splits.

Every worker scores its block of rows of the target (FA, MIA), retain (RA) and test (TA, KL) splits. Correct
counts are all-reduced; the true-label confidences the membership attack needs, and the test-set softmax
outputs KL needs, are all-gathered with their positions and put back in split order on rank 0, so rank 0
computes exactly the numbers one process computes (`ClassificationEvaluator`) from the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unlearn.comm import Comm
from unlearn.errors import DivergedError
from unlearn.evaluation.metrics import EVAL_BATCH, non_finite_outputs
from unlearn.evaluation.mia import mia_from_confidences
from unlearn.shards import RowCache, eval_share

EVAL_SPLITS = ("target", "retain", "test")


@dataclass
class ScoredOutputs:
    """What a method's run keeps for the comparison with retrain: test-set softmax outputs, and the
    true-label confidences on the evaluation splits (the attack's feature)."""

    test: np.ndarray
    confidence: dict[str, np.ndarray]


class ShardedClassificationEvaluator:
    """FA/RA/TA/MIA of a model from every worker's share of the evaluation splits (rank 0 gets the result)."""

    def __init__(self, splits: dict, caches: dict[str, RowCache], comm: Comm, device: torch.device,
                 mia: bool = True, seed: int = 0, keep_rows: bool = True) -> None:
        self.splits, self.caches, self.comm, self.device = splits, caches, comm, device
        self.keep_rows = keep_rows  # False (data: streaming): read each batch's rows and let them go
        self.mia, self.seed = mia, seed
        self.names = [name for name in (*EVAL_SPLITS, "triggered") if splits.get(name) is not None]
        self.positions = {name: eval_share(len(splits[name]), comm.world_size, comm.rank) for name in self.names}

    @torch.no_grad()
    def _scores(self, model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(softmax outputs, labels) of this worker's rows of one split."""
        positions = self.positions[name]
        labels = torch.from_numpy(np.asarray(self.splits[name].y, dtype=np.int64)[positions])
        cache = self.caches[name]
        if self.keep_rows:
            cache.ensure(positions)  # one read of this worker's rows, kept for the job's later runs
        probs = []
        for start in range(0, len(positions), EVAL_BATCH):
            block = positions[start:start + EVAL_BATCH]
            x = (cache.take(block) if self.keep_rows else
                 torch.from_numpy(np.asarray(cache.source.read(cache.row_ids[block]), dtype=np.float32)))
            x = x.to(self.device)
            probs.append(F.softmax(model(x).float(), dim=1).cpu())
        width = probs[0].shape[1] if probs else 0
        return (torch.cat(probs) if probs else torch.zeros((0, width))), labels

    def _gather(self, values: torch.Tensor, name: str) -> np.ndarray:
        """`values` of every worker's rows of split `name`, in split order (meaningful on rank 0)."""
        positions = torch.from_numpy(self.positions[name]).to(self.device)
        everything = self.comm.all_gather(values.to(self.device))
        where = self.comm.all_gather(positions)
        out = torch.empty_like(everything)
        out[where] = everything
        return out.cpu().numpy()

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float] | None, ScoredOutputs | None]:
        """Every rank must call this (collectives); rank 0 returns (metrics, outputs), the others (None, None)."""
        was_training = model.training
        model.eval()
        try:
            correct, total, confidence, test_probs = {}, {}, {}, None
            for name in self.names:
                probs, labels = self._scores(model, name)
                hits = torch.tensor([float((probs.argmax(1) == labels).sum()) if len(labels) else 0.0,
                                     float(len(labels)), float((~torch.isfinite(probs)).sum())],
                                    dtype=torch.float64, device=self.device)
                self.comm.all_reduce(hits)
                if hits[2] > 0:  # every rank sees the sum, so all of them stop here together
                    raise DivergedError(non_finite_outputs(name))
                correct[name], total[name] = float(hits[0]), float(hits[1])
                mine = probs[torch.arange(len(labels)), labels] if len(labels) else torch.zeros(0)
                confidence[name] = self._gather(mine.float(), name)
                if name == "test":
                    test_probs = self._gather(probs.float(), name) if total[name] else np.zeros((0, 0), np.float32)
        finally:
            model.train(was_training)
        if self.comm.rank != 0:
            return None, None
        metrics = {key: (100.0 * correct[name] / total[name] if total[name] else float("nan"))
                   for key, name in (("FA", "target"), ("RA", "retain"), ("TA", "test"))}
        if "triggered" in total:  # a backdoor: triggered test images taken for the target; TA is on clean images
            metrics["ASR"] = 100.0 * correct["triggered"] / total["triggered"] if total["triggered"] else float("nan")
            metrics["clean_TA"] = metrics["TA"]
        if self.mia:
            metrics["MIA"] = mia_from_confidences(confidence["retain"], confidence["test"], confidence["target"],
                                                  seed=self.seed)
        return metrics, ScoredOutputs(test=test_probs, confidence=confidence)
