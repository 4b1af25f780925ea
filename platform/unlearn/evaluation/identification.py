"""How well a method found the hidden part of the target concept it was not told about (label-domain mismatch).

Under target or data mismatch the methods get only part of the concept (the given classes); the rest sits in
their retain stream. A method that identifies "false retaining" samples (TARF's τ = 0 rows) reports them
through `Method.diagnostics()`; the job scores them here against the hidden rows, which only the job knows:
precision = identified ∩ hidden / identified, recall = identified ∩ hidden / hidden (percent).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def identification(diagnostics: dict[str, Any] | None, target_rows: np.ndarray, forget_rows: np.ndarray
                   ) -> dict[str, float]:
    """{"id_precision", "id_recall", "identified"} when the method identified rows and the target has a hidden
    part; {} otherwise."""
    if not diagnostics or diagnostics.get("identified_rows") is None:
        return {}
    hidden = np.setdiff1d(np.asarray(target_rows), np.asarray(forget_rows))
    if not len(hidden):  # everything of the target was handed over: nothing to find
        return {}
    identified = np.unique(np.asarray(diagnostics["identified_rows"], dtype=np.int64))
    found = len(np.intersect1d(identified, hidden))
    return {"id_precision": 100.0 * found / len(identified) if len(identified) else float("nan"),
            "id_recall": 100.0 * found / len(hidden), "identified": float(len(identified))}
