"""A worker group's checkpoint: which of its runs are done, and the running run's state.

Layout of a checkpoint folder (written by rank 0; under FSDP each rank adds its optimizer shard):
  progress.json   {"group": g, "done": [labels], "running": label or null, "step": s}
  state.pt        model, optimizer, scheduler, the method's own state and the step (only while a run is running)
  optimizer-<r>.pt  FSDP only: rank r's optimizer shard

A restarted group reads it back (`GroupCheckpoint.restore`): the queue hands the group the run it was
doing, and `resume_for(label)` gives that run's state, so it continues from its last checkpoint; runs the
group finished are in the queue's record and are not run again. Attempt records (`AttemptLog`) are small
files, one per run start, that say which run started where and from which step (tests and audits read them).
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn.atomic import write_json_atomic

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"


def full_state(model: torch.nn.Module, module: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """CPU copy of the unwrapped model's weights (under FSDP a collective: every rank must call it)."""
    if strategy == "fsdp" and is_fsdp(model):
        from torch.distributed.fsdp import FullStateDictConfig, FullyShardedDataParallel, StateDictType

        with FullyShardedDataParallel.state_dict_type(model, StateDictType.FULL_STATE_DICT,
                                                      FullStateDictConfig(offload_to_cpu=True, rank0_only=True)):
            state = model.state_dict()
        return {k: v.detach().cpu().clone() for k, v in state.items()} if state else None
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return isinstance(model, FullyShardedDataParallel)


@dataclass
class GroupCheckpoint:
    """What a group's last checkpoint says (empty for a fresh start)."""

    done: list[str] = field(default_factory=list)
    running: str | None = None
    state: dict[str, Any] | None = None

    @classmethod
    def restore(cls, checkpoint: Any, rank: int) -> "GroupCheckpoint":
        """Read a Ray Train checkpoint back (None: a fresh start)."""
        if checkpoint is None:
            return cls()
        with checkpoint.as_directory() as folder:
            progress = json.loads(open(os.path.join(folder, PROGRESS_FILE)).read())
            state = None
            if progress.get("running") and os.path.exists(os.path.join(folder, STATE_FILE)):
                state = torch.load(os.path.join(folder, STATE_FILE), map_location="cpu", weights_only=False)
                if state["optimizer"] is None:  # FSDP: this rank's shard
                    state["optimizer"] = torch.load(os.path.join(folder, f"optimizer-{rank}.pt"), map_location="cpu",
                                                    weights_only=False)
        return cls(done=list(progress.get("done", [])), running=progress.get("running"), state=state)

    def resume_for(self, label: str) -> dict[str, Any] | None:
        """The state to continue `label` from, once (a later run of the same label starts fresh)."""
        if self.running != label or self.state is None:
            return None
        state, self.state = self.state, None
        return state


def write_checkpoint(folder: str, rank: int, strategy: str, progress: dict[str, Any],
                     running: tuple[dict | None, Any, Any, int] | None) -> bool:
    """This rank's part of a group checkpoint in `folder`; False when it has nothing to write.

    `running` is (model state, ctx, method, step) of the running run, None between runs.
    """
    wrote = False
    if running is not None:
        model_state, ctx, method, step = running
        sharded_optimizer = strategy == "fsdp" and is_fsdp(ctx.model)
        if sharded_optimizer:  # FSDP: each rank holds its optimizer shard
            torch.save(ctx.optimizer.state_dict(), os.path.join(folder, f"optimizer-{rank}.pt"))
            wrote = True
        if rank == 0:
            torch.save({"model": model_state, "optimizer": None if sharded_optimizer else ctx.optimizer.state_dict(),
                        "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
                        "method": method.state_dict(), "step": step}, os.path.join(folder, STATE_FILE))
    if rank == 0:
        with open(os.path.join(folder, PROGRESS_FILE), "w") as f:
            json.dump(progress, f)
        wrote = True
    return wrote


class AttemptLog:
    """Small files under `<storage>/attempts/`: one per run start on each rank (what restarted where, from which
    step) and one per checkpoint rank 0 handed to Ray Train (which step a restart can resume from)."""

    def __init__(self, storage: str) -> None:
        self.folder = f"{storage.rstrip('/')}/attempts"

    def write(self, event: dict[str, Any]) -> None:
        name = f"{event['event']}-{event['label']}-g{event['group']}-r{event['rank']}-{uuid.uuid4().hex[:8]}.json"
        write_json_atomic(event, f"{self.folder}/{name}")

    @staticmethod
    def read(storage: str, event: str | None = None) -> list[dict[str, Any]]:
        """Every record (local storage) of one kind of `event` ("start", "checkpoint"; None: all), oldest first."""
        folder = os.path.join(storage, "attempts")
        if not os.path.isdir(folder):
            return []
        records = [json.loads(open(os.path.join(folder, f)).read()) for f in os.listdir(folder) if f.endswith(".json")]
        return sorted((r for r in records if event is None or r["event"] == event), key=lambda r: r["time"])
