"""Test-only failure injection: a worker process that exits at a given step of a given run, once.

UNLEARN_FAIL_AT_STEP=<global step> makes one worker (UNLEARN_FAIL_RANK, default the last) exit its process
at that step of run UNLEARN_FAIL_RUN (default: any run), once (UNLEARN_FAIL_MARKER names the file that
records it), UNLEARN_FAIL_DELAY_S seconds (default 5) after drawing the step's batch, so that the report
before it has been collected: a worker that dies right after a report may restart from the one before.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

FAIL_ENV = ("UNLEARN_FAIL_AT_STEP", "UNLEARN_FAIL_MARKER", "UNLEARN_FAIL_RANK", "UNLEARN_FAIL_DELAY_S",
            "UNLEARN_FAIL_RUN")


def armed_env() -> dict[str, str]:
    """The failure settings of the driver's environment, to ship to the workers."""
    return {k: os.environ[k] for k in FAIL_ENV if os.environ.get(k)}


class FailAt:
    """Wraps a stream and kills this worker process at a given global step, once."""

    def __init__(self, stream: Any, step: int, marker: str, delay_s: float) -> None:
        self.stream, self.step, self.marker, self.delay_s = stream, step, marker, delay_s
        self.size, self.one_pass = stream.size, stream.one_pass

    def batches(self) -> Iterator[Any]:
        for number, batch in enumerate(self.stream.batches(), start=self.stream.start_step):
            if number == self.step and not os.path.exists(self.marker):
                Path(self.marker).write_text(f"worker killed at step {number}\n")
                print(f"  [engine] injected failure: worker exits at step {number}", file=sys.stderr, flush=True)
                time.sleep(self.delay_s)
                os._exit(1)
            yield batch


def maybe_fail(stream: Any, fail: dict[str, str], label: str, rank: int, world: int) -> Any:
    """`stream`, wrapped to fail when the injection is armed for this run and rank."""
    if not fail.get("UNLEARN_FAIL_AT_STEP") or rank != int(fail.get("UNLEARN_FAIL_RANK") or world - 1):
        return stream
    if fail.get("UNLEARN_FAIL_RUN") and fail["UNLEARN_FAIL_RUN"] != label:
        return stream
    marker = fail.get("UNLEARN_FAIL_MARKER") or os.path.join(tempfile.gettempdir(), "unlearn-fail-once")
    return FailAt(stream, int(fail["UNLEARN_FAIL_AT_STEP"]), marker, float(fail.get("UNLEARN_FAIL_DELAY_S") or 5.0))
