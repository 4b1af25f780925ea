"""Step schedules k(t) shared by every method that anneals a weight (TARF's forgetting weight,
SFR-on's forget-step weight, learning rates).

Every schedule starts at `k0` when t = 0 and reaches exactly 0 at `t0` (and stays 0 after), so
"k(t) reaches 0 at t0" holds for every shape. `t` and `t0` share a unit (steps or epochs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

ScheduleKind = Literal["constant", "linear", "cosine", "step", "exponential"]
SCHEDULE_KINDS: tuple[str, ...] = ("constant", "linear", "cosine", "step", "exponential")

STEP_LEVELS = 4  # `step`: k0 halves at each quarter of [0, t0)
EXP_RATE = 5.0  # `exponential`: k0 * exp(-5 t / t0): ~0.7% of k0 just before t0


@dataclass(frozen=True)
class Schedule:
    kind: ScheduleKind
    k0: float
    t0: float

    def __call__(self, t: float) -> float:
        if self.t0 <= 0 or t >= self.t0:
            return 0.0
        frac = max(t, 0.0) / self.t0
        if self.kind == "constant":
            return self.k0
        if self.kind == "linear":
            return self.k0 * (1.0 - frac)
        if self.kind == "cosine":
            return self.k0 * 0.5 * (1.0 + math.cos(math.pi * frac))
        if self.kind == "step":
            return self.k0 * 0.5 ** math.floor(STEP_LEVELS * frac)
        if self.kind == "exponential":
            return self.k0 * math.exp(-EXP_RATE * frac)
        raise ValueError(f"unknown schedule kind {self.kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")


def schedule(kind: str, k0: float, t0: float) -> Schedule:
    """Build a schedule, rejecting unknown kinds with the allowed list."""
    if kind not in SCHEDULE_KINDS:
        raise ValueError(f"unknown schedule kind {kind!r}; allowed: {', '.join(SCHEDULE_KINDS)}")
    return Schedule(kind, float(k0), float(t0))  # type: ignore[arg-type]
