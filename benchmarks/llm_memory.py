"""Per-worker peak memory and tokens/s of a causal LM trained the way an unlearning method does, DDP vs FSDP2, with
and without LoRA, on CPU workers (gloo).

Done-when lines measured: "Measured as peak process memory above the post-import baseline, with the frozen
reference present: FSDP on 2 workers <= 0.6x DDP's per-worker memory for the >=100M model; LoRA <= 0.5x full
fine-tuning's", and "a memory table: per-worker peak memory for a model of at least 100M parameters built from
config, 2 workers, DDP vs FSDP, with and without LoRA (CPU, gloo), plus tokens/s against the same loop in one
process".

The model: a llama built from config (`build_causal_lm`), 12 layers, hidden 768, 12 heads, vocabulary 32000
(~134M parameters, untied embeddings), fp32. The step (`_step`): token-level DELETE, the method with the heaviest
reference use: the frozen reference's logits (`frozen_reference` over `lm_sharding.frozen_reference_sharded`: a
sharded copy under FSDP, a full copy under DDP and in one process, the base with adapters disabled under LoRA),
the student's logits, `masked_teacher_kl` over the answer tokens normalised by the global token count, backward,
AdamW. A fixed global batch of `2 x --batch` sequences of 128 tokens (the second half of each is the answer), the
same batch every step.

Rows, each in fresh processes (VmHWM, the peak resident set, cannot be reset): DDP full, FSDP full, DDP + LoRA,
FSDP + LoRA on 2 workers (1 thread each, `--batch` rows each), and full / LoRA in one process on the whole global
batch (2 threads: the same cores). Per worker: VmHWM from /proc/self/status after the imports and the process
group (the baseline), and after the warm-up and measured steps; the table gives the difference. tokens/s: the
global batch's tokens over the mean time of the measured steps.

    python benchmarks/llm_memory.py            # ~134M model: about 15-30 min on 2 free cores, ~8 GB of memory
    python benchmarks/llm_memory.py --small    # a tiny model, ~1 min: checks the script (llm-memory-small.*)
    python benchmarks/llm_memory.py --layers 4 --hidden 256 --heads 4 --vocab-size 8000   # other sizes (-small.*)

The allocator (`--malloc`). Peak RSS also counts memory the C allocator keeps after it is freed. glibc serves
large blocks by mmap and returns them when freed, but its threshold for "large" rises (up to 32 MiB) each time such
a block is freed, after which blocks of that size come from the heap and stay resident. FSDP allocates and frees a
gathered layer per unit and step, so with glibc's defaults its peak RSS grew by blocks it had already freed: on a
27M-parameter llama (6 layers, hidden 512, vocabulary 8000, this script's step) FSDP's peak above baseline was
above DDP's (993 vs 903 MiB), and 504 vs 783 MiB with the threshold fixed at 1 MiB. The default, `mmap`, fixes it
at 1 MiB (MALLOC_MMAP_THRESHOLD_, the same for every row), so the table measures memory the step holds; `--malloc
default` measures glibc as it comes. The engine's workers can set the same variable.

Writes benchmarks/results/llm-memory.{md,json} (`--small`: llm-memory-small.{md,json}; `--out` another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FSDP_CRITERION = 0.6  # FSDP's per-worker peak at most 0.6x DDP's (full fine-tuning, reference present)
LORA_CRITERION = 0.5  # LoRA's at most 0.5x full fine-tuning's
SEQ_LEN = 128
MMAP_THRESHOLD = 1 << 20  # `--malloc mmap`: glibc serves blocks of at least 1 MiB by mmap (see the docstring)
SIZES = {
    "full": {"family": "llama", "layers": 12, "hidden": 768, "heads": 12, "vocab_size": 32000,
             "max_positions": SEQ_LEN},
    "small": {"family": "llama", "layers": 2, "hidden": 64, "heads": 2, "vocab_size": 512, "max_positions": SEQ_LEN},
}
# (label, workers, strategy, lora)
ROWS = [("DDP full", 2, "ddp", False), ("FSDP full", 2, "fsdp", False), ("DDP + LoRA", 2, "ddp", True),
        ("FSDP + LoRA", 2, "fsdp", True), ("1 process full", 1, None, False), ("1 process + LoRA", 1, None, True)]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


# --- one worker of one row -------------------------------------------------------------------------------------

def _batch(rows: int, vocab: int, first_row: int) -> tuple:
    """`rows` sequences of SEQ_LEN tokens from a fixed global batch (rows from `first_row` on), answers in the
    second half."""
    import torch

    from unlearn.methods.token_losses import IGNORE_INDEX

    g = torch.Generator().manual_seed(0)
    everything = torch.randint(1, vocab, (first_row + rows, SEQ_LEN), generator=g)
    ids = everything[first_row:]
    labels = ids.clone()
    labels[:, : SEQ_LEN // 2] = IGNORE_INDEX
    return ids, torch.ones_like(ids), labels


def _step(model, reference, optimizer, comm, ids, mask, labels) -> float:
    """One token-level DELETE step (see the module docstring); returns the global token-mean loss."""
    from unlearn.lm_sharding import unwrap
    from unlearn.methods.token_losses import masked_teacher_kl, token_mean
    from unlearn.models.causal_lm import frozen_reference

    with frozen_reference(unwrap(model), reference) as frozen:  # DDP: the module (a peft model's adapters go off)
        teacher = frozen(input_ids=ids, attention_mask=mask).logits
    student = model(input_ids=ids, attention_mask=mask).logits
    loss = masked_teacher_kl(student, teacher, labels)
    global_count = comm.all_reduce(loss.count.clone())
    token_mean(loss.total, loss.count, global_count, comm.world_size).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(comm.all_reduce(loss.total.detach().clone()) / global_count.clamp_min(1))


def _worker(rank: int, world: int, port: int, row: dict, size: dict, out: str) -> None:
    import torch
    import torch.distributed as dist

    # everything the row will use is imported before the baseline (a lazily imported module is no model memory)
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    from unlearn.comm import LocalComm, TorchDistComm
    from unlearn.lm_sharding import frozen_reference_sharded, local_parameter_count, wrap_causal_lm
    from unlearn.models.causal_lm import build_causal_lm
    from unlearn.spec import CausalLMSpec, LMConfigSpec, LoRASpec

    torch.set_num_threads(row["threads"])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(minutes=30))
    comm = TorchDistComm() if world > 1 else LocalComm()
    baseline_kb, baseline_rss_kb = _status_kb("VmHWM"), _status_kb("VmRSS")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    spec = CausalLMSpec(config=LMConfigSpec(**size), lora=LoRASpec(r=8, dropout=0.0) if row["lora"] else None,
                        activation_checkpointing=row["activation_checkpointing"])
    model = build_causal_lm(spec)
    parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model = wrap_causal_lm(model, row["strategy"] or "ddp", "cpu")
    reference = frozen_reference_sharded(model)  # as the methods hold it: made once, before training
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    build_s = time.perf_counter() - t0
    local = {"parameters": local_parameter_count(model),
             "trainable": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                              for p in model.parameters() if p.requires_grad),
             "reference": 0 if reference is model or reference is getattr(model, "module", None)
             else local_parameter_count(reference)}
    rows = row["batch"] * (2 if world == 1 else 1)  # one process takes the whole global batch
    ids, mask, labels = _batch(rows, size["vocab_size"], rank * rows)
    times, losses = [], []
    for step in range(row["warmup"] + row["steps"]):
        if world > 1:
            dist.barrier()
        t = time.perf_counter()
        losses.append(_step(model, reference, optimizer, comm, ids, mask, labels))
        if step >= row["warmup"]:
            times.append(time.perf_counter() - t)
    peak_kb = _status_kb("VmHWM")
    record = {"rank": rank, "pid": os.getpid(), "baseline_hwm_kb": baseline_kb, "baseline_rss_kb": baseline_rss_kb,
              "peak_hwm_kb": peak_kb, "peak_above_baseline_kb": peak_kb - baseline_kb, "step_s": times,
              "losses": losses, "build_s": build_s, "parameters": parameters, "trainable": trainable,
              "local": local, "tokens_per_step": int(mask.sum()) * world}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    if world > 1:
        dist.barrier()  # no rank tears its gloo group down while another still talks to it
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_row(label: str, world: int, strategy: str | None, lora: bool, size: dict, args, work: Path) -> dict:
    import torch.multiprocessing as mp

    out = work / label.replace(" ", "_").replace("+", "plus")
    out.mkdir(parents=True, exist_ok=True)
    row = {"strategy": strategy, "lora": lora, "batch": args.batch, "steps": args.steps, "warmup": 1,
           "threads": 2 // world if world <= 2 else 1, "activation_checkpointing": args.activation_checkpointing}
    t0 = time.perf_counter()
    mp.spawn(_worker, args=(world, _free_port(), row, size, str(out)), nprocs=world, join=True)
    workers = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    step_s = sum(sum(w["step_s"]) for w in workers[:1]) / args.steps  # rank 0 (the ranks step in lockstep)
    result = {"label": label, "workers": world, "strategy": strategy, "lora": lora,
              "peak_above_baseline_mib": max(w["peak_above_baseline_kb"] for w in workers) / 1024,
              "peak_above_baseline_mib_each": [round(w["peak_above_baseline_kb"] / 1024, 1) for w in workers],
              "baseline_mib": max(w["baseline_hwm_kb"] for w in workers) / 1024,
              "step_s": step_s, "tokens_per_s": workers[0]["tokens_per_step"] / step_s,
              "tokens_per_step": workers[0]["tokens_per_step"], "losses": workers[0]["losses"],
              "parameters": workers[0]["parameters"], "trainable": workers[0]["trainable"],
              "local": workers[0]["local"], "build_s": workers[0]["build_s"], "wall_s": time.perf_counter() - t0}
    print(f"{label}: peak above baseline {result['peak_above_baseline_mib']:.0f} MiB "
          f"({', '.join(f'{m:.0f}' for m in result['peak_above_baseline_mib_each'])}), "
          f"{result['tokens_per_s']:.0f} tokens/s, {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return result


def _model_state_mib(r: dict) -> float:
    """The model state a worker holds by construction: its parameters and reference (4 B each), gradients (4 B) and
    AdamW's two moments (8 B) of its trainable parameters; fp32."""
    local = r["local"]
    return (4 * local["parameters"] + 4 * local["reference"] + 12 * local["trainable"]) / 2**20


def report(results: list[dict], args, size: dict, total_s: float) -> tuple[str, dict]:
    by = {r["label"]: r for r in results}
    peak = lambda label: by[label]["peak_above_baseline_mib"]
    ratios = {"fsdp_over_ddp_full": peak("FSDP full") / peak("DDP full"),
              "fsdp_over_ddp_lora": peak("FSDP + LoRA") / peak("DDP + LoRA"),
              "lora_over_full_ddp": peak("DDP + LoRA") / peak("DDP full"),
              "lora_over_full_fsdp": peak("FSDP + LoRA") / peak("FSDP full"),
              "lora_over_full_one_process": peak("1 process + LoRA") / peak("1 process full")}
    speed = {"full_ddp": by["DDP full"]["tokens_per_s"] / by["1 process full"]["tokens_per_s"],
             "full_fsdp": by["FSDP full"]["tokens_per_s"] / by["1 process full"]["tokens_per_s"],
             "lora_ddp": by["DDP + LoRA"]["tokens_per_s"] / by["1 process + LoRA"]["tokens_per_s"],
             "lora_fsdp": by["FSDP + LoRA"]["tokens_per_s"] / by["1 process + LoRA"]["tokens_per_s"]}
    fsdp_ok = ratios["fsdp_over_ddp_full"] <= FSDP_CRITERION
    lora_ok = {k: ratios[k] <= LORA_CRITERION for k in ("lora_over_full_ddp", "lora_over_full_fsdp")}
    mark = lambda ok: "met" if ok else "not met"
    parameters = results[0]["parameters"]
    big_enough = parameters >= 100_000_000
    small_note = "" if big_enough else "; model below 100M parameters, not the criterion run"
    lines = [
        "# Causal LM memory: DDP vs FSDP2, with and without LoRA (CPU, gloo)",
        "",
        (f"Written by `{' '.join(['python', 'benchmarks/llm_memory.py', *sys.argv[1:]])}` on {os.cpu_count()} "
         f"CPU cores ({platform.machine()}), load average {os.getloadavg()[0]:.1f} at the end, {total_s / 60:.1f} min in "
         f"all. Model: llama from config, {size['layers']} layers, hidden {size['hidden']}, {size['heads']} heads, "
         f"vocabulary {size['vocab_size']}: **{parameters:,} parameters** (fp32, untied embeddings). Step: "
         "token-level DELETE (frozen reference's logits, student's logits, masked-teacher KL over the answer tokens "
         "normalised by the global token count, backward, AdamW), a fixed global batch of "
         f"{2 * args.batch} x {SEQ_LEN} tokens ({args.batch} rows per worker), 1 warm-up + {args.steps} measured "
         f"steps; activation checkpointing {'on' if args.activation_checkpointing else 'off'}; allocator: "
         f"{'glibc, mmap threshold fixed at 1 MiB' if args.malloc == 'mmap' else 'glibc defaults'}. LoRA: r 8 on "
         "q_proj, v_proj. Two-worker rows: 1 thread per worker; one-process rows: 2 threads, the whole global batch."),
        "",
        ("| row | per-worker peak above baseline, MiB (each) | model state by construction, MiB | reference held "
         "| tokens/s | s/step |"),
        "|---|---:|---:|---|---:|---:|",
    ]
    for r in results:
        held = ("base, adapters off" if r["lora"] else
                "sharded copy (1/2)" if r["strategy"] == "fsdp" else "full copy")
        lines.append(f"| {r['label']} | {r['peak_above_baseline_mib']:.0f} "
                     f"({', '.join(f'{m:.0f}' for m in r['peak_above_baseline_mib_each'])}) | "
                     f"{_model_state_mib(r):.0f} | {held} | {r['tokens_per_s']:.0f} | {r['step_s']:.2f} |")
    lines += [
        "",
        "Ratios of per-worker peak memory above baseline (the larger worker of each row):",
        "",
        f"- FSDP / DDP, full fine-tuning: **{ratios['fsdp_over_ddp_full']:.2f}** (criterion <= {FSDP_CRITERION}: "
        f"**{mark(fsdp_ok)}**{small_note})",
        f"- FSDP / DDP, LoRA: {ratios['fsdp_over_ddp_lora']:.2f}",
        f"- LoRA / full, DDP: **{ratios['lora_over_full_ddp']:.2f}** (criterion <= {LORA_CRITERION}: "
        f"**{mark(lora_ok['lora_over_full_ddp'])}**{small_note})",
        f"- LoRA / full, FSDP: **{ratios['lora_over_full_fsdp']:.2f}** (criterion <= {LORA_CRITERION}: "
        f"**{mark(lora_ok['lora_over_full_fsdp'])}**{small_note})",
        f"- LoRA / full, one process: {ratios['lora_over_full_one_process']:.2f}",
        "",
        ("tokens/s of 2 workers over the same loop in one process (same 2 cores): "
         f"DDP full {speed['full_ddp']:.2f}x, FSDP full {speed['full_fsdp']:.2f}x, "
         f"DDP + LoRA {speed['lora_ddp']:.2f}x, FSDP + LoRA {speed['lora_fsdp']:.2f}x."),
        "",
        "How it is measured:",
        "",
        ("- **peak above baseline**: VmHWM (peak resident set) from /proc/self/status, after the step minus at the "
         "baseline. The baseline is read after importing torch, transformers' llama, peft and unlearn and after "
         "the gloo process group is up, before the model is built; every row runs in fresh processes, since VmHWM "
         "cannot be reset. It includes building the full model on each worker before it is sharded (as the "
         "engine builds it), the reference, the optimizer state, activations and the logits."),
        ("- **model state by construction**: what a worker holds at rest, from its local parameter counts: "
         "parameters and reference at 4 B, gradients (4 B) and AdamW moments (8 B) of trainable parameters. Under "
         "FSDP each worker holds half of each (shards cut on dim 0); under DDP all of it; under LoRA only the "
         "adapters have gradients and optimizer state, and the reference is the base with the adapters disabled "
         "(no copy). The measured peak adds activations and logits (the same per worker in DDP and FSDP rows), the "
         "gathered layers under FSDP, and allocator slack."),
        ("- **tokens/s**: tokens of the global batch per step over the mean measured step time on rank 0 (the "
         "ranks step in lockstep: every step has collectives)."),
    ]
    data = {"parameters": parameters, "size": size, "seq_len": SEQ_LEN, "batch_per_worker": args.batch,
            "malloc": args.malloc,
            "steps": args.steps, "activation_checkpointing": args.activation_checkpointing,
            "rows": results, "ratios": ratios, "tokens_per_s_over_one_process": speed,
            "criteria": {"fsdp_over_ddp_full_le_0.6": fsdp_ok and big_enough,
                         "lora_over_full_ddp_le_0.5": lora_ok["lora_over_full_ddp"] and big_enough,
                         "lora_over_full_fsdp_le_0.5": lora_ok["lora_over_full_fsdp"] and big_enough},
            "cpu_count": os.cpu_count(), "total_s": total_s}
    return "\n".join(lines) + "\n", data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a tiny model (checks the script in seconds)")
    p.add_argument("--batch", type=int, default=4, help="sequences per worker (one process takes twice as many)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per row (after one warm-up step)")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for llm-memory[-small].{md,json}")
    p.add_argument("--malloc", choices=["mmap", "default"], default="mmap",
                   help="mmap: workers allocate blocks of 1 MiB and more with mmap (returned to the system when "
                        "freed); default: glibc's own threshold, which rises as blocks are freed and keeps them in the heap")
    p.add_argument("--rows", nargs="*", help="only these row labels (default: all; the ratios need all)")
    for field in ("layers", "hidden", "heads", "vocab_size"):
        p.add_argument(f"--{field.replace('_', '-')}", type=int, help=f"override the model's {field}")
    args = p.parse_args()
    size = dict(SIZES["small" if args.small else "full"])
    size.update({k: getattr(args, k) for k in ("layers", "hidden", "heads", "vocab_size") if getattr(args, k)})
    import tempfile

    if args.malloc == "mmap":  # read by glibc when each worker process starts (spawned after this line)
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="llm-memory-") as work:
        for label, world, strategy, lora in ROWS:
            if args.rows and label not in args.rows:
                continue
            results.append(measure_row(label, world, strategy, lora, size, args, Path(work)))
    if args.rows:
        print(json.dumps(results, indent=1))
        return
    text, data = report(results, args, size, time.perf_counter() - t0)
    name = "llm-memory-small" if args.small or size != SIZES["full"] else "llm-memory"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.md").write_text(text)
    (args.out / f"{name}.json").write_text(json.dumps(data, indent=1))
    print(text)


if __name__ == "__main__":
    main()
