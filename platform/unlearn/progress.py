"""What a person watching a job sees while it runs: the driver draws every run's progress from the workers' ticks.

Workers never print progress themselves (their stdout is not a terminal, and on Ray it would reach the
driver prefixed, once per worker). Rank 0's step loop sends a tick (step, epoch, losses, seconds) at most
every `TICK_EVERY_S` seconds and at its last step; the executor hands ticks to `Progress`, which draws:
- on a terminal: one `tqdm` bar per run (epoch, step, loss, elapsed, ETA) and a line when it ends;
- otherwise (CI, `ray job logs`, a pipe): one line per run when it ends, plus at most one line per 10% of
  its steps and no more often than every `LINE_EVERY_S` seconds (a long run still shows it is alive);
- `quiet`: nothing but what the job prints at the end (the table) and errors.
A worker group that lost a worker and resumed says so in one line (`Tick.resumed`).
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import IO, Any

TICK_EVERY_S = 0.5  # how often rank 0 sends a tick mid-run (the driver redraws no faster)
LINE_EVERY_S = 30.0  # sparse mode: at most one mid-run line per run this often (and per 10% of its steps)
MODES = ("auto", "bar", "lines", "quiet")


@dataclass
class Tick:
    """One progress report of a run from its rank-0 worker (plain data: it crosses to the driver)."""

    label: str
    step: int
    total_steps: int
    epoch: int
    epochs: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)
    resumed: bool = False  # the first tick of a run that resumed from a checkpoint after a restart
    group: int = 0


def _loss_text(losses: dict[str, float], limit: int = 3) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in list(losses.items())[:limit])


class Progress:
    """The driver's display of every run's progress (see the module docstring). Thread-safe."""

    def __init__(self, mode: str = "auto", stream: IO[str] | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: one of {MODES}")
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if _is_terminal(self.stream) else "lines"
        self.mode = mode
        self._bars: dict[str, Any] = {}
        self._last: dict[str, tuple[float, int]] = {}  # sparse mode: (run seconds, tenth) of each run's last line
        self._lock = threading.Lock()

    def tick(self, tick: Tick | dict[str, Any]) -> None:
        """A run's latest progress (from the executor)."""
        tick = tick if isinstance(tick, Tick) else Tick(**tick)
        with self._lock:
            if tick.resumed:
                self._say(f"[{tick.label}] worker group {tick.group} restarted: resumed from "
                          f"epoch {tick.epoch}/{tick.epochs} (step {tick.step}/{tick.total_steps})")
            if self.mode == "bar":
                self._draw(tick)
            elif self.mode == "lines":
                self._sparse_line(tick)

    def note(self, line: str) -> None:
        """A one-line event (shown in every mode but quiet)."""
        with self._lock:
            self._say(line)

    def finished(self, label: str, line: str) -> None:
        """A run ended: its bar goes, one line stays."""
        with self._lock:
            bar = self._bars.pop(label, None)
            if bar is not None:
                bar.close()
            self._say(line)

    def close(self) -> None:
        with self._lock:
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()

    # --- drawing ---------------------------------------------------------------------------------------
    def _say(self, line: str) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "bar" and self._bars:
            from tqdm import tqdm

            tqdm.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def _draw(self, tick: Tick) -> None:
        from tqdm import tqdm

        bar = self._bars.get(tick.label)
        if bar is None:
            sized = _width(self.stream) > 0  # a pseudo-terminal may report 0 x 0: tqdm then draws nothing
            bar = tqdm(total=tick.total_steps, file=self.stream, position=len(self._bars), leave=False,
                       dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 20,
                       unit="step", desc=f"[{tick.label}] epoch {tick.epoch}/{tick.epochs}",
                       mininterval=0.2,
                       bar_format="{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                                  "[{elapsed}<{remaining}]{postfix}")
            self._bars[tick.label] = bar
        bar.set_description_str(f"[{tick.label}] epoch {tick.epoch}/{tick.epochs}", refresh=False)
        bar.set_postfix_str(_loss_text(tick.losses), refresh=False)
        bar.update(max(0, tick.step - bar.n))

    def _sparse_line(self, tick: Tick) -> None:
        if tick.step >= tick.total_steps:  # the line when it ends says it
            return
        tenth = int(10 * tick.step / max(tick.total_steps, 1))
        last_seconds, last_tenth = self._last.setdefault(tick.label, (0.0, 0))
        if tenth > last_tenth and tick.seconds - last_seconds >= LINE_EVERY_S:  # the run's own clock
            self._last[tick.label] = (tick.seconds, tenth)
            self._say(f"[{tick.label}] {10 * tenth}%: epoch {tick.epoch}/{tick.epochs}, step {tick.step}/"
                      f"{tick.total_steps}, {tick.seconds:.0f}s {_loss_text(tick.losses)}".rstrip())


def _width(stream: IO[str]) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 0


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
