"""How a split's rows are dealt to workers, so that N workers take exactly the steps one process takes.

Two kinds of pass over a split (positions 0..n-1 into the split, in a seeded `order`):

- **Step stream** (`ShareStream.batches`): an endless sequence of *global* batches of B positions, drawn the
  way one process draws them (a fresh seeded permutation per pass, wrapping into the next pass so every
  batch is full). Worker r of N takes slice r of each global batch (`np.array_split`: sizes differ by at
  most one row when N does not divide B). So the union of the workers' rows at every step is the very
  batch one process would draw, for any N; what differs is only floating-point reduction order.
  A worker reads from storage only the rows its slices touch (`RowCache`): for runs shorter than a pass
  that is its 1/N share, for multi-epoch runs nearly the whole split (`data: exact`; `data: streaming`
  in engine.py is for splits larger than a worker's memory and is not step-exact).
- **Whole-set pass** (`ShareStream.one_pass`, what `setup` uses for Fisher sums, scores, thresholds): the
  ordered split cut into chunks of B, chunk k owned by worker k mod N. Each worker yields its own chunks
  whole, so batch-level statistics (SFR-on's Fisher: a mean of squared batch gradients) are identical
  for any worker count and the union of the passes is the split without duplicates.

With N = 1 both passes yield what one process has always drawn (`loop.array_stream` is this stream over arrays).
"""

from __future__ import annotations

import math
from typing import Iterator, Protocol

import numpy as np
import torch

from unlearn.methods.base import Batch


class RowSource(Protocol):
    """Where a split's images live: `read(rows)` returns float32 images of those row ids, in that order."""

    def read(self, rows: np.ndarray) -> np.ndarray: ...


def split_order(n: int, seed: int) -> np.ndarray:
    """The seeded order every pass over an n-row split starts from (the same on every worker)."""
    return np.random.default_rng(seed).permutation(n) if n else np.arange(0)


def global_batches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless global batches of `batch_size` positions (into `split_order`), as one process draws them."""
    if n == 0:
        return
    gen = torch.Generator().manual_seed(seed * 1000)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:  # wrap into the next shuffled pass: every batch is full
            pending = torch.cat([pending, torch.randperm(n, generator=gen)])
        rows, pending = pending[:batch_size], pending[batch_size:]
        yield rows.numpy()


def share_of(batch: np.ndarray, world: int, rank: int) -> np.ndarray:
    """Worker `rank`'s slice of a global batch."""
    return np.array_split(batch, world)[rank] if world > 1 else batch


def share_fraction(batch_size: int, world: int, rank: int) -> float:
    """This worker's rows of a global batch over the batch size (1/N when N divides B)."""
    return len(np.array_split(np.arange(batch_size), world)[rank]) / batch_size


def owned_chunks(n: int, batch_size: int, world: int, rank: int) -> list[np.ndarray]:
    """Positions (into `split_order`) of the whole-set chunks worker `rank` covers."""
    return [np.arange(s, min(s + batch_size, n)) for k, s in enumerate(range(0, n, batch_size)) if k % world == rank]


class RowCache:
    """The images of a split's rows that this worker has read, by position in the split (read on demand).

    Rows are appended to one buffer that grows geometrically, so reading a split batch by batch costs
    linear time and at most twice the rows held.
    """

    def __init__(self, source: RowSource, row_ids: np.ndarray) -> None:
        self.source, self.row_ids = source, np.asarray(row_ids)
        self.slot = np.full(len(self.row_ids), -1, dtype=np.int64)
        self.buffer: np.ndarray | None = None
        self.rows_held = 0

    def ensure(self, positions: np.ndarray) -> None:
        """Read the rows at `positions` not read yet, in one call to the source."""
        if len(positions) == 0:
            return
        missing = np.unique(positions[self.slot[positions] < 0])
        if len(missing) == 0:
            return
        new = np.asarray(self.source.read(self.row_ids[missing]), dtype=np.float32)
        end = self.rows_held + len(new)
        if self.buffer is None or end > len(self.buffer):
            grown = np.empty((max(end, 2 * (0 if self.buffer is None else len(self.buffer))), *new.shape[1:]),
                             dtype=np.float32)
            if self.buffer is not None:
                grown[:self.rows_held] = self.buffer[:self.rows_held]
            self.buffer = grown
        self.buffer[self.rows_held:end] = new
        self.slot[missing] = np.arange(self.rows_held, end)
        self.rows_held = end

    def take(self, positions: np.ndarray) -> torch.Tensor:
        self.ensure(positions)
        if self.buffer is None:  # nothing read: an empty batch of unknown image shape
            return torch.zeros((0,))
        return torch.from_numpy(self.buffer[self.slot[positions]])


class ShareStream:
    """loop.Stream over one worker's share of a split (see the module docstring).

    `start_step` skips batches already taken before a resume, so the data order continues; `steps` (the
    run's total) lets the worker read every row its slices will need in one go.
    """

    def __init__(self, source: RowSource, row_ids: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 world: int = 1, rank: int = 0, seed: int = 0, steps: int = 0,
                 device: torch.device | str = "cpu", uses_steps: bool = True, cache: RowCache | None = None) -> None:
        self.size = len(labels)
        self.batch_size, self.world, self.rank, self.seed = batch_size, world, rank, seed
        self.order = split_order(self.size, seed)
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: split labels may be read-only
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.cache = cache if cache is not None else RowCache(source, self.row_ids)
        self.device = torch.device(device)
        self.start_step = 0
        if uses_steps and steps and self.size:  # read every row this worker's slices will touch, at once
            shares = [share_of(b, world, rank) for _, b in zip(range(steps), global_batches(self.size, batch_size, seed))]
            self.cache.ensure(self.order[np.concatenate(shares)])

    def _batch(self, positions: np.ndarray) -> Batch:
        rows = self.order[positions]
        return Batch(self.cache.take(rows).to(self.device), self.labels[rows].to(self.device),
                     torch.from_numpy(self.row_ids[rows]).to(self.device))

    def batches(self) -> Iterator[Batch]:
        for number, batch in enumerate(global_batches(self.size, self.batch_size, self.seed)):
            if number >= self.start_step:
                yield self._batch(share_of(batch, self.world, self.rank))

    def one_pass(self) -> Iterator[Batch]:
        chunks = owned_chunks(self.size, self.batch_size, self.world, self.rank)
        if chunks:
            self.cache.ensure(self.order[np.concatenate(chunks)])  # one read for the whole pass
        for chunk in chunks:
            yield self._batch(chunk)


def eval_share(n: int, world: int, rank: int) -> np.ndarray:
    """Positions of an evaluation split this worker scores: one contiguous block (rows next to each other
    share storage row groups; the order does not matter, results are put back in split order)."""
    return np.array_split(np.arange(n), world)[rank]


def per_worker_rows(batch_size: int, world: int) -> int:
    """The largest share of a global batch any worker takes."""
    return math.ceil(batch_size / world)


class StreamedShare:
    """loop.Stream over the rows of a split found in this worker's streamed shard of a store's part (`data:
    streaming`): for splits larger than a worker's memory, and not step-exact (which rows share a step depends
    on how Ray Data dealt the part's blocks).

    `batches` takes ceil(B/N) of the split's rows per step, passing over the shard again and again (in the
    shard's order); `one_pass` yields this worker's rows of the split once, in chunks of B. Only the batch in
    the making is held in memory. Every worker takes every step, as DDP needs: a worker whose shard holds no
    row of the split cannot, and says so.
    """

    def __init__(self, shard, store, part_rows: int, row_ids: np.ndarray, labels: np.ndarray, *, batch_size: int,
                 world: int = 1, device: torch.device | str = "cpu", label: str = "") -> None:
        self.shard, self.store, self.size = shard, store, len(labels)
        self.per_worker, self.pass_batch = per_worker_rows(batch_size, world), batch_size
        self.position = np.full(part_rows, -1, dtype=np.int64)  # row id -> position in the split
        self.position[np.asarray(row_ids, dtype=np.int64)] = np.arange(len(labels))
        self.labels = torch.from_numpy(np.array(labels, dtype=np.int64))
        self.row_ids = np.asarray(row_ids, dtype=np.int64)
        self.device, self.label, self.start_step = torch.device(device), label, 0

    def _rows(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(images, split positions) of the split's rows in one pass over the shard."""
        for batch in self.shard.iter_batches(batch_size=1024, batch_format="pyarrow"):
            positions = self.position[batch.column("row").to_numpy()]
            keep = positions >= 0
            if keep.any():
                yield self.store.decode(batch.column("x").filter(keep)), positions[keep]

    def _chunks(self, size: int, endless: bool) -> Iterator[Batch]:
        images, positions = [], []
        held = 0
        while True:
            found = False
            for x, pos in self._rows():
                found = True
                images.append(x)
                positions.append(pos)
                held += len(pos)
                while held >= size:
                    x_all, pos_all = np.concatenate(images), np.concatenate(positions)
                    yield self._batch(x_all[:size], pos_all[:size])
                    images, positions, held = [x_all[size:]], [pos_all[size:]], held - size
            if not endless:
                if held:
                    yield self._batch(np.concatenate(images), np.concatenate(positions))
                return
            if not found:
                from unlearn.errors import BadInput

                raise BadInput(f"{self.label}: a worker's streamed shard holds no row of a {self.size}-row split; "
                               "use ray.data: exact for splits this small")

    def _batch(self, x: np.ndarray, positions: np.ndarray) -> Batch:
        return Batch(torch.from_numpy(x).to(self.device), self.labels[positions].to(self.device),
                     torch.from_numpy(self.row_ids[positions]).to(self.device))

    def batches(self) -> Iterator[Batch]:
        for number, batch in enumerate(self._chunks(self.per_worker, endless=True)):
            if number >= self.start_step:
                yield batch

    def one_pass(self) -> Iterator[Batch]:
        return self._chunks(self.pass_batch, endless=False)
