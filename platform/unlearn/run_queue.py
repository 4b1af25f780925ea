"""The job's queue of runs, shared by its worker groups (an actor on Ray, a plain object in one process).

`next(group)` gives the index of the run this group should do (the one it was doing before a restart
first), `WAIT` while the original model that every other run starts from is still being trained, or None
when nothing is left; `done` / `failed` record the outcome; `set_base` / `base` pass on the original's
weights when the queue trained it. Torch-free on purpose: the actor starts without importing it.
"""

from __future__ import annotations

from typing import Any

WAIT = -1  # `next` answer: the base model is not trained yet


class RunQueue:
    """The job's queue of runs (see the module docstring); plain Python, wrapped as a Ray actor on Ray."""

    def __init__(self, requests: list[dict[str, Any]], base_ready: bool,
                 finished: dict[int, dict[str, Any]] | None = None) -> None:
        self.items = requests  # {"label", "role"} per run, in queue order
        self.claimed: dict[int, int] = {}  # run index -> group
        self.finished: dict[int, dict[str, Any]] = {}
        self.unread: list[int] = []
        self.base_ready, self.base_state = base_ready, None
        self.group_starts: dict[int, int] = {}
        self.method_failures: dict[int, int] = {}
        self.notes: dict[int, str] = {}
        self.ticks: dict[str, dict[str, Any]] = {}  # each running run's latest progress tick, by label
        for index, record in sorted((finished or {}).items()):  # a resumed job: runs an earlier attempt finished
            self.done(int(index), record)

    def start_group(self, group: int, max_failures: int) -> bool:
        """Count a (re)start of a group. A restart that follows a run recorded as failed (the group restarts so
        that no worker is left waiting in a collective) is free; after more than `max_failures` lost workers in
        one run, that run is recorded as failed (with the last error a worker noted) and the group goes on."""
        self.group_starts[group] = self.group_starts.get(group, 0) + 1
        lost = self.group_starts[group] - 1 - self.method_failures.get(group, 0)
        if lost > max_failures:
            for index, owner in self.claimed.items():  # the run it keeps losing workers in
                if owner == group and index not in self.finished:
                    note = self.notes.get(index, "a worker process died")
                    self.failed(index, {"error": "WorkerGroupFailed",
                                        "message": f"lost a worker {lost} times in this run (last: {note})"})
        return True

    def next(self, group: int) -> int | None:
        for index, owner in self.claimed.items():  # a restarted group resumes its own unfinished run first
            if owner == group and index not in self.finished:
                return index
        for index, item in enumerate(self.items):
            if index in self.claimed or index in self.finished:
                continue
            if item["role"] != "original" and not self.base_ready:
                return WAIT
            self.claimed[index] = group
            return index
        return None

    def claim(self, group: int, label: str) -> None:
        """A group whose restored checkpoint was running `label` (a resumed job) takes that run back first."""
        for index, item in enumerate(self.items):
            if item["label"] == label and index not in self.finished and index not in self.claimed:
                self.claimed[index] = group

    def note_error(self, index: int, message: str) -> None:
        """A worker's error that may be a lost peer rather than the run's own (kept for the failure message)."""
        self.notes[index] = message

    def done(self, index: int, record: dict[str, Any]) -> None:
        if index not in self.finished:
            self.finished[index] = record
            self.unread.append(index)

    def failed(self, index: int, error: dict[str, str]) -> None:
        if index not in self.finished and index in self.claimed:
            owner = self.claimed[index]
            self.method_failures[owner] = self.method_failures.get(owner, 0) + 1
        self.done(index, {"error": error})

    def is_finished(self, index: int) -> bool:
        return index in self.finished

    def set_base(self, state: dict[str, Any]) -> None:
        self.base_state, self.base_ready = state, True

    def base(self) -> dict[str, Any] | None:
        return self.base_state

    def tick(self, record: dict[str, Any]) -> None:
        """Rank 0's progress (progress.Tick fields); only the latest per run is kept until the driver reads it.
        A tick that says the run resumed is kept until read even if a later one arrives."""
        label = record["label"]
        if self.ticks.get(label, {}).get("resumed"):
            self.ticks[f"{label}\0resumed"] = self.ticks[label]
        self.ticks[label] = record

    def take_ticks(self) -> list[dict[str, Any]]:
        out, self.ticks = list(self.ticks.values()), {}
        return out

    def take_finished(self) -> list[tuple[int, dict[str, Any]]]:
        """Runs finished since the last call (the driver writes their MLflow runs as they come)."""
        out = [(i, self.finished[i]) for i in self.unread]
        self.unread = []
        return out

