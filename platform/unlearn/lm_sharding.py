"""How a causal language model is wrapped for data-parallel training: DDP (a full replica per worker) or FSDP2
(`torch.distributed.fsdp.fully_shard`: each worker holds 1/world of every parameter, gradient and optimizer state).

Everything an LLM run needs around the wrap lives here, so the engine only calls it:

* `wrap_causal_lm(model, "ddp" | "fsdp", device, mixed_precision=...)`. FSDP2 shards the input embedding (when
  the LM head does not share it), each decoder layer (`token_losses.decoder_layers`), then the root (final norm,
  LM head): a unit's parameters are gathered for its forward/backward and freed after, so a worker holds about one
  full layer at a time besides its shards. On CUDA with
  `mixed_precision`, parameters are gathered in bf16 and gradients reduced in fp32 (`MixedPrecisionPolicy`); on CPU
  (gloo) everything stays in the weights' dtype. A peft LoRA model shards the same way, frozen base weights
  included: FSDP2 shards per parameter (DTensor on dim 0), so one unit may mix frozen and trainable parameters (FSDP1
  without use_orig_params could not); only the trainable ones get gradients, reduce-scatters and optimizer state.
  DDP: `forward_sync_buffers=False` (buffers are synced once at the wrap; causal LMs have no running statistics,
  and a forward without collectives lets ranks evaluate different numbers of batches),
  `find_unused_parameters=False`, gradients as views of the all-reduce buckets (no second gradient copy); DDP
  reduces only parameters that require grad, so under LoRA only the adapters are all-reduced.
* `frozen_reference_sharded(model)`: the frozen original that DELETE/NPO compare against, without a full unsharded
  copy per worker: under LoRA the student itself (its adapters disabled by `causal_lm.frozen_reference`); for a
  fully trained FSDP model a copy that is itself fully_shard-ed, built weightless and filled from the student's
  local shards (each rank only ever holds 1/world of it).
* `save_sharded` / `load_sharded`: torch.distributed.checkpoint (DCP); each rank writes and reads only its shards
  of the model and optimizer state (world size kept equal between save and load). `gather_full_state`: the whole
  model on rank 0's CPU, for logging.
* Gradient accumulation keeping the global batch: `accumulation_steps`, `micro_batches`, `gradient_sync`.
* `synced_greedy`: greedy generation in lockstep. Every FSDP forward is a collective (an all-gather per layer),
  so every rank must run exactly as many forwards as the others, whatever its number of prompts.

Verified on torch 2.14 CPU with gloo (tests/test_lm_sharding.py): fully_shard trains, reduces and checkpoints on
CPU; a forward on zero rows fails inside llama's attention (hence dummy rows in `synced_greedy` and a filler row
for an empty micro-batch, `filler_row`).
"""

from __future__ import annotations

import copy
import math
import os
import weakref
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, ContextManager, Iterator, Literal

import torch
import torch.distributed as dist
from torch import nn

from unlearn.checkpoints import is_fully_sharded  # re-exported: FSDP2's test lives beside FSDP1's
from unlearn.methods.token_losses import IGNORE_INDEX, decoder_layers
from unlearn.models.causal_lm import is_peft, reference_model

if TYPE_CHECKING:
    from unlearn.comm import Comm

Strategy = Literal["ddp", "fsdp"]
EXTRA_FILE = "extra.pt"  # the small non-tensor state (step, scheduler, method) beside a DCP checkpoint
# The precision policy each model was sharded with (read back by `frozen_reference_sharded`, which shards its copy
# alike; FSDP2 keeps it only in private state).
_POLICIES: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


# --- wrapping ----------------------------------------------------------------------------------------------------

def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP (FSDP2 changes the module in place: it is its own unwrapped model)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mixed_precision_policy(device: torch.device, mixed_precision: bool) -> Any:
    """FSDP2's policy: bf16 parameters for compute, fp32 gradient reduction on CUDA with `mixed_precision`;
    otherwise the weights' own dtype throughout (CPU: bf16 matmuls are slow there and gloo reduces fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if mixed_precision and device.type == "cuda":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def wrap_causal_lm(model: nn.Module, strategy: Strategy, device: torch.device | str, *,
                   mixed_precision: bool = False) -> nn.Module:
    """`model` ready for data-parallel training on `device` over the default process group (see the module
    docstring). Without a process group (one process) it is only moved to `device`: there is nothing to share.

    Build the optimizer after this call, from the returned model's parameters (FSDP2 replaces them by sharded
    DTensors). DDP's mixed precision is `forward_precision` around the forward; FSDP2's is in the wrap.
    """
    device = torch.device(device)
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy must be 'ddp' or 'fsdp', not {strategy!r}")
    if not (dist.is_available() and dist.is_initialized()):
        return model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(device)
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       forward_sync_buffers=False, find_unused_parameters=False,
                                       gradient_as_bucket_view=True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (_world(),))
    policy = mixed_precision_policy(device, mixed_precision)
    _shard_like_student(model, mesh, policy)
    _POLICIES[model] = policy
    return model


def _shard_like_student(model: nn.Module, mesh: Any, policy: Any, *, inference: bool = False) -> None:
    """fully_shard each decoder layer, then the root: the one layout both the student and its sharded reference
    use (the reference copies the student's local shards, so their shards must cut the same rows).

    The input embedding is a unit of its own when the LM head does not share its weight (llama; gpt2 ties them,
    and a parameter cannot belong to two units): a large-vocabulary table is then gathered only while it is used,
    not for the whole forward and backward. Training: the root (LM head, final norm) and the last layer stay
    gathered after forward, as backward needs them at once (an all-gather saved per step for their memory).
    `inference` (the reference: no backward ever frees them) reshards every unit after its forward, so at rest it
    holds only its shards.
    """
    from torch.distributed.fsdp import fully_shard

    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embedding is not None and (head is None or head.weight is not embedding.weight):
        fully_shard(embedding, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=inference or index < len(layers) - 1)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=True if inference else None)


def forward_precision(model: nn.Module, device: torch.device | str, mixed_precision: bool) -> ContextManager:
    """Around a forward: bf16 autocast for DDP on CUDA with `mixed_precision` (FSDP2 casts in its wrap, CPU
    stays in the weights' dtype), else nothing."""
    device = torch.device(device)
    if mixed_precision and device.type == "cuda" and not is_fully_sharded(model):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def local_parameter_count(model: nn.Module) -> int:
    """Parameter elements this process holds: its shards' under FSDP2, every element otherwise. Count at rest:
    between a training forward and its backward (or after a no-grad forward of the student, whose root stays
    gathered until the next backward or `model.reshard()`), FSDP2 units hold gathered parameters instead."""
    from torch.distributed.tensor import DTensor

    return sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())


# --- the frozen reference ---------------------------------------------------------------------------------------

def frozen_reference_sharded(model: nn.Module) -> nn.Module:
    """The frozen original for DELETE/NPO, to pass as `reference` to `causal_lm.frozen_reference(model, ...)`.

    Make it once, right after `wrap_causal_lm` and before training (it is a copy of the weights as they are now).
    A peft model: the model itself (its base with the adapters disabled is the original; nothing is copied). A
    fully sharded model: a fully_shard-ed copy (requires_grad off, eval mode) holding 1/world of the weights per
    rank, never a full copy (it is built on the meta device and filled from the student's local shards). Otherwise
    (DDP, one process) a plain frozen copy: DDP replicates everything, its reference included.

    Give `frozen_reference` the unwrapped model, `unwrap(model)`: it recognises a peft model (whose adapters it
    turns off) only without DDP around it.
    """
    inner = unwrap(model)
    if is_peft(inner):
        return inner
    if not is_fully_sharded(inner):
        return reference_model(inner)
    return _sharded_copy(inner)


def _sharded_copy(student: nn.Module) -> nn.Module:
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    config = getattr(student, "config", None)
    if config is None:
        raise ValueError(f"{type(student).__name__} has no transformers config to build its reference from")
    params = dict(student.named_parameters())
    first = next(iter(params.values()))
    if not isinstance(first, DTensor):
        raise ValueError("the student is not sharded (wrap it with wrap_causal_lm(..., 'fsdp') first)")
    with torch.device("meta"):  # the module tree only: no memory, no initialisation
        reference = AutoModelForCausalLM.from_config(copy.deepcopy(config)).to(first.dtype)
    # the student's mesh and precision policy, so that both cut their shards alike and compute alike
    policy = _POLICIES.get(student) or mixed_precision_policy(first.device, False)
    _shard_like_student(reference, first.device_mesh, policy, inference=True)
    reference.to_empty(device=first.to_local().device)  # allocates only this rank's shards
    with torch.no_grad():
        for name, param in reference.named_parameters():
            if name not in params:
                raise ValueError(f"the reference built from {type(student).__name__}'s config has a parameter "
                                 f"{name!r} the student lacks")
            param.to_local().copy_(params[name].to_local())
        buffers = dict(student.named_buffers())
        for name, buffer in reference.named_buffers():  # rotary frequencies and the like: not sharded, not saved
            buffer.copy_(buffers[name])
    reference.requires_grad_(False)
    return reference.eval()


# --- sharded checkpoints -----------------------------------------------------------------------------------------

def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: str | os.PathLike,
                 extra: dict[str, Any] | None = None) -> None:
    """Write the model and optimizer state to `folder` with torch.distributed.checkpoint: each rank writes its own
    shards (DDP's replicated tensors are written once). A collective: every rank calls it with the same `folder`,
    which all ranks must see (one node, or a shared file system). `extra` (picklable: step, scheduler, the method's
    state, the same on every rank) is written by rank 0 beside it, and `load_sharded` returns it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model_state, optim_state = _states(model, optimizer, get_state_dict)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=folder)
    if extra is not None and _rank() == 0:
        torch.save(extra, os.path.join(folder, EXTRA_FILE))
    if _world() > 1:
        dist.barrier()  # extra.pt is there before any rank goes on (and, say, reports the checkpoint)


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                 folder: str | os.PathLike) -> dict[str, Any] | None:
    """Read `save_sharded`'s checkpoint into a freshly wrapped model (same strategy and world size) and its
    optimizer, in place; returns the saved `extra` (None if none). A collective, like the save."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    folder = os.fspath(folder)
    # The current state dicts are the templates DCP loads into (it fills them in place, each rank its shards);
    # get_state_dict first creates the optimizer's state (a zero-lr step) so there is a place for the saved one.
    model_state, optim_state = _states(model, optimizer, get_state_dict)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=folder)
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra_file = os.path.join(folder, EXTRA_FILE)
    return torch.load(extra_file, map_location="cpu", weights_only=False) if os.path.exists(extra_file) else None


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None, get_state_dict: Any) -> tuple[dict, dict]:
    if optimizer is None:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model), {}
    return get_state_dict(model, optimizer)


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole model's state dict on rank 0, on CPU (for logging the model); None on the other ranks. A
    collective under FSDP (every rank calls it): parameters are gathered one at a time and moved to CPU, so no
    rank holds a second full copy on the accelerator."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in state.items()}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# --- gradient accumulation ---------------------------------------------------------------------------------------

def accumulation_steps(global_batch: int, world_size: int, micro_batch: int) -> int:
    """Micro-batches per optimizer step, the same on every worker: the largest worker share of `global_batch`
    (shares differ by at most one row) split into pieces of at most `micro_batch` rows.

    Every worker runs this many forwards and backwards even when its share is smaller (FSDP2's are collectives);
    the loss stays the global batch's token mean when each micro-batch's token sum is divided by the global batch's
    token count (`token_losses.token_mean` with the count all-reduced over every micro-batch of every worker), so
    the accumulated gradient is the one a single step on the whole global batch gives.
    """
    if global_batch < 1 or world_size < 1 or micro_batch < 1:
        raise ValueError("global_batch, world_size and micro_batch must be at least 1")
    return max(1, math.ceil(math.ceil(global_batch / world_size) / micro_batch))


def micro_batches(rows: int, steps: int) -> list[slice]:
    """`rows` split into `steps` contiguous slices of near-equal size (the first ones one row longer). A worker
    whose share has fewer rows than `steps` gets empty slices: run `filler_row` there instead."""
    base, extra = divmod(rows, steps)
    bounds = [0]
    for i in range(steps):
        bounds.append(bounds[-1] + base + (i < extra))
    return [slice(bounds[i], bounds[i + 1]) for i in range(steps)]


def filler_row(length: int, pad_id: int, device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of one row that scores nothing (every label is IGNORE_INDEX): the
    forward/backward of an empty micro-batch, which FSDP2 needs for its collectives and llama cannot run on zero
    rows. Its token sums are 0, so it changes no gradient."""
    ids = torch.full((1, length), pad_id, dtype=torch.long, device=device)
    return ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX)


@contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, backward reduces gradients over the workers only if `enabled` (the last micro-batch of a
    step); otherwise they accumulate locally (DDP's `no_sync`, FSDP2's `set_requires_gradient_sync(False)`).

    Under FSDP2 an unsynced backward keeps each layer's gradient unsharded until the final micro-batch: a full
    gradient per worker in exchange for one reduce-scatter per step. Where that memory is not there, keep
    `enabled=True` for every micro-batch (sharded gradients, one reduce-scatter per micro-batch); both give the same
    step.
    """
    from torch.nn.parallel import DistributedDataParallel

    if enabled:
        yield
    elif is_fully_sharded(model):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


# --- generation in lockstep -----------------------------------------------------------------------------------

def synced_greedy(model: nn.Module, prompts_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  pad_id: int, eos_id: int | None, comm: "Comm | None" = None) -> torch.Tensor:
    """Greedy continuations (local prompts, max_new_tokens) of this rank's prompts: the arg-max token at each step,
    `pad_id` after a row's `eos_id`. A collective: every rank calls it, whatever its number of prompts (0 included).

    Each FSDP forward all-gathers parameters, so a rank that runs fewer forwards than the others leaves them
    waiting forever. Hence: every rank pads its batch to the largest prompt count and prompt length over the ranks
    (dummy rows are dropped after); every rank runs one forward per step, including ranks whose rows have all
    finished; and the loop stops early only when no row of any rank is still running (one all-reduce per step
    decides that for everyone). A plain loop of full forwards, not `model.generate`: it cannot get out of step, and
    without a key/value cache each step re-reads the prompt, which at evaluation sizes (short answers, small models)
    costs little; only the last position's logits are computed (`logits_to_keep=1`).

    Prompts may be padded on either side (`attention_mask` says which tokens are real; each row needs one); rows are
    re-packed to left padding with position ids counted from each row's first real token, so a row's answer does
    not depend on how much padding it got.
    """
    if comm is None:
        from unlearn.comm import current_comm

        comm = current_comm()
    net = unwrap(model)  # DDP's forward is collective-free (forward_sync_buffers=False): call the module itself
    device = next(net.parameters()).device
    prompts_ids, attention_mask = prompts_ids.to(device), attention_mask.to(device).bool()
    count = prompts_ids.shape[0]
    lengths = attention_mask.sum(dim=1)
    if count and int(lengths.min()) == 0:
        raise ValueError("synced_greedy: every prompt needs at least one real token")
    sizes = torch.tensor([count, int(lengths.max()) if count else 1], device=device)
    rows, width = (int(v) for v in comm.all_reduce(sizes, op="max").tolist())
    rows = max(rows, 1)  # no prompt anywhere: one dummy row, so the step count is still the same everywhere
    ids = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((rows, width), dtype=torch.long, device=device)
    for i in range(count):
        real = prompts_ids[i][attention_mask[i]]
        ids[i, width - len(real):] = real
        mask[i, width - len(real):] = 1
    mask[count:, -1] = 1  # dummy rows see one token: a fully masked row gives NaN attention
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    finished[count:] = True
    out = torch.full((rows, max_new_tokens), pad_id, dtype=torch.long, device=device)
    modes = {module: module.training for module in net.modules()}
    net.eval()
    try:
        with torch.no_grad():
            for step in range(max_new_tokens):
                positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
                logits = net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                               logits_to_keep=1).logits[:, -1]
                token = torch.where(finished, torch.full_like(finished, pad_id, dtype=torch.long),
                                    logits.argmax(dim=-1))
                out[:, step] = token
                if eos_id is not None:
                    finished |= token == eos_id
                ids = torch.cat([ids, token[:, None]], dim=1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                running = torch.tensor([float((~finished).sum())], device=device)
                if comm.all_reduce(running, op="sum").item() == 0:
                    break
    finally:
        for module, training in modes.items():
            module.training = training
    return out[:count]
