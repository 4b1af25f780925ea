"""Sampling throughput of a diffusion job's original on 1 and 2 worker processes (gloo), each drawing its share.

Both draw the same set (each sample's noise is seeded by (seed, class, index)), so the images must agree; the
benchmark reports the largest difference beside the timings. Used by benchmarks/diffusion.py --throughput.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, spec, num_classes: int, state, folder: str) -> None:
    from unlearn.comm import TorchDistComm
    from unlearn.evaluation.diffusion import DiffusionEvaluator
    from unlearn.models import build_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = build_model(spec.model, num_classes, tuple(state["shape"]))
        model.load_state_dict(state["weights"])
        sampler = DiffusionEvaluator.sampler(spec, num_classes)
        comm = TorchDistComm()
        comm.barrier()
        t0 = time.perf_counter()
        images, _ = sampler.generate(model, spec.eval.samples_per_class, spec.seed, comm)
        everything = comm.all_gather(images.contiguous())
        seconds = time.perf_counter() - t0
        if rank == 0:
            torch.save({"images": everything, "seconds": seconds}, Path(folder) / f"world{world}.pt")
        # gloo aborts a rank (SIGABRT) when its peer tears the group down while it is still finishing a collective
        comm.barrier()
    finally:
        dist.destroy_process_group()


def measure(spec, prep) -> dict[str, Any]:
    """{"images", "workers": {1: {seconds, images_per_s}, 2: {...}}, "max_abs_difference"} for the job's
    (cached) original."""
    from unlearn.training import cached_original

    weights, _ = cached_original(spec, prep.splits)
    state = {"weights": weights, "shape": list(prep.input_shape)}
    out: dict[str, Any] = {"workers": {}}
    with tempfile.TemporaryDirectory() as folder:
        for world in (1, 2):
            mp.spawn(_worker, args=(world, _free_port(), spec, prep.splits.num_outputs, state, folder), nprocs=world)
            result = torch.load(Path(folder) / f"world{world}.pt")
            n = len(result["images"])
            out["workers"][world] = {"seconds": round(result["seconds"], 2), "images_per_s": round(n / result["seconds"], 1)}
            out.setdefault("images", n)
            out.setdefault("_first", result["images"])
            if world == 2:
                out["max_abs_difference"] = float((result["images"] - out.pop("_first")).abs().max())
    return out
