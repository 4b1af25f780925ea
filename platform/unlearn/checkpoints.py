"""A worker group's checkpoint: which of its runs are done, and the running run's state.

Layout of a checkpoint folder (written by rank 0; under FSDP each rank adds its optimizer shard):
  progress.json   {"group": g, "done": [labels], "running": label or null, "step": s}
  state.pt        model, optimizer, scheduler, the method's own state and the step (only while a run is running)
  optimizer-<r>.pt  FSDP only: rank r's optimizer shard
  sharded/        FSDP2 only (causal LMs): model and optimizer as a torch.distributed.checkpoint, each rank's own
                  shards in __<r>_0.distcp and rank 0's .metadata (`lm_sharding.save_sharded`); state.pt then has
                  "sharded": True and no model or optimizer. No rank ever holds the full model for a checkpoint.

Every rank writes its files into a folder of its own and reports it; Ray Train copies each into the one checkpoint
folder (the ranks' file names differ) and registers the checkpoint only once every rank has reported.

A restarted group reads it back (`GroupCheckpoint.restore`): the queue hands the group the run it was
doing, and `resume_for(label)` gives that run's state, so it continues from its last checkpoint (a sharded one:
`state["sharded"]` is the folder `execute` reads the shards from once the model is wrapped); runs the
group finished are in the queue's record and are not run again. Attempt records (`AttemptLog`) are small
files, one per run start, that say which run started where and from which step (tests and audits read them).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from unlearn.atomic import write_json_atomic

STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.json"
SHARDED_DIR = "sharded"


def full_state(model: torch.nn.Module, module: torch.nn.Module, strategy: str) -> dict[str, torch.Tensor] | None:
    """CPU copy of the unwrapped model's weights (under FSDP a collective: every rank must call it; rank 0 gets
    the dict, the others None).

    FSDP2 (`model` fully sharded): `module`'s parameters gathered one at a time to rank 0's CPU. After a LoRA run
    `module` is the merged model (`execute` folds the adapters into the sharded weights, in place), so the state
    has the built model's keys, as under DDP."""
    if is_fully_sharded(model):
        from unlearn.lm_sharding import gather_full_state

        return gather_full_state(module)
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


def is_fully_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is an FSDP2 (`fully_shard`) module (the engine's causal LMs under `ray.strategy: fsdp`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


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
                if state.get("sharded"):  # FSDP2: read after the wrap, from a folder that outlives this block
                    state["sharded"] = _kept(os.path.join(folder, SHARDED_DIR), local=_same(folder, checkpoint.path))
                elif state["optimizer"] is None:  # FSDP: this rank's shard
                    state["optimizer"] = torch.load(os.path.join(folder, f"optimizer-{rank}.pt"), map_location="cpu",
                                                    weights_only=False)
        return cls(done=list(progress.get("done", [])), running=progress.get("running"), state=state)

    def resume_for(self, label: str) -> dict[str, Any] | None:
        """The state to continue `label` from, once (a later run of the same label starts fresh)."""
        if self.running != label or self.state is None:
            return None
        state, self.state = self.state, None
        return state


def _same(folder: str, path: str) -> bool:
    return os.path.realpath(folder) == os.path.realpath(path)


def _kept(shards: str, local: bool) -> str:
    """The sharded checkpoint's folder, readable until this process ends: a checkpoint on local storage is read
    where it is (`as_directory` hands out the folder itself, and Ray Train replaces it only after the resumed run's
    next report, which comes after the read); one on remote storage was downloaded into a temporary folder that
    `as_directory` removes on leaving, so its shards are copied out first."""
    if local:
        return shards
    copy = tempfile.mkdtemp(prefix="unlearn-shards-")
    atexit.register(shutil.rmtree, copy, True)
    shutil.copytree(shards, copy, dirs_exist_ok=True)
    return copy


def write_checkpoint(folder: str, rank: int, strategy: str, progress: dict[str, Any],
                     running: tuple[dict | None, Any, Any, int] | None) -> bool:
    """This rank's part of a group checkpoint in `folder`; False when it has nothing to write.

    `running` is (model state, ctx, method, step) of the running run, None between runs. Under FSDP2 a
    collective (every rank writes its shards, then they wait for each other).
    """
    wrote = False
    if running is not None and is_fully_sharded(running[1].model):
        _, ctx, method, step = running
        from unlearn.lm_sharding import save_sharded

        save_sharded(ctx.model, ctx.optimizer, os.path.join(folder, SHARDED_DIR))
        wrote = True
        if rank == 0:
            torch.save({"model": None, "optimizer": None, "sharded": True,
                        "scheduler": ctx.scheduler.state_dict() if ctx.scheduler is not None else None,
                        "method": method.state_dict(), "step": step}, os.path.join(folder, STATE_FILE))
    elif running is not None:
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
