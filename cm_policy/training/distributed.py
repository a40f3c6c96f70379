"""Data-parallel training over the processes that torchrun starts (DistributedDataParallel).

``cm-policy train ...`` runs unchanged under ``torchrun --nproc_per_node=N``: each process reads
torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), joins
one process group (NCCL when training on CUDA, gloo on the CPU) and drives ``cuda:LOCAL_RANK`` or
the CPU. Without torchrun (``WORLD_SIZE`` unset or 1) nothing here starts a process group.

What a step computes, and why it does not depend on the number of processes:

- ``training.batch_size`` is the global batch, as in a single process. Every process draws the
  same window indices from the same seeded numpy generator, so the data stream is that of one
  process.
- The global batch is cut into ``training.micro_batches`` equal slices (by default one per
  process). Each process computes the loss of its consecutive share of the slices, accumulating
  gradients locally, and DDP averages the gradients across processes once per step: the update
  follows the mean loss over the global batch.
- The methods draw their noise (flow times, Gaussian noise, image crops) from the global torch RNG
  inside ``loss``, for whatever batch they are given. The draws for half a batch are not half of
  the draws for the whole batch, so the trainer re-seeds the torch RNG before every slice from
  (seed, step, slice index) (:func:`slice_seed`). Slice ``j`` then gets the same windows and the
  same noise whichever process computes it, and evaluation or checkpointing on rank 0 never
  shifts the training noise.

So N processes compute what one process computes with ``training.micro_batches=N``, up to the
order of floating-point reductions; a run that sets ``training.micro_batches`` explicitly gives
the same result with any number of processes that divides it. (The slice count matters because
each slice draws its own noise; the methods' losses are per-sample means, so the mean over equal
slices is the mean over the batch.)

Only rank 0 writes logs, TensorBoard events, config, plots and checkpoints, and evaluates; the
other processes wait for it in their next collective. Every process loads the same checkpoint
to resume, and before each checkpoint the processes check that their weights are still equal.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cm_policy.device import resolve_device

# Rank 0 evaluates the policy and writes checkpoints while the other processes wait in their next
# collective; the process group's timeout must outlast a full evaluation (50 episodes and videos).
COLLECTIVE_TIMEOUT = timedelta(hours=1)


def world_size() -> int:
    """The number of processes torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class Replica:
    """This process's place among the training processes, and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel when there are several processes.

        DDP expects a gradient for every parameter at every step (no ``find_unused_parameters``
        search, which costs a graph traversal per step): every method here uses the whole network.
        """
        if not self.is_distributed:
            return module
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids)

    def no_sync(self, module: nn.Module, sync: bool) -> AbstractContextManager:
        """Skip DDP's gradient all-reduce unless ``sync`` (the last micro-batch of a step)."""
        if sync or not isinstance(module, DistributedDataParallel):
            return nullcontext()
        return module.no_sync()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of ``tensor`` over all processes (a collective: all must call)."""
        if self.is_distributed:
            tensor = tensor.clone()
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def check_in_sync(self, tensors: Sequence[torch.Tensor]) -> None:
        """Raise on every process if its ``tensors`` differ from rank 0's (a collective).

        DDP keeps the replicas equal by applying the same averaged gradient everywhere; this
        catches anything that breaks that (a rank-dependent code path, a non-deterministic
        reduction) before it is written into a checkpoint.
        """
        if not self.is_distributed:
            return
        flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
        reference = flat.clone()
        dist.broadcast(reference, src=0)
        same = torch.allclose(flat, reference, rtol=0.0, atol=0.0, equal_nan=True)
        differs = torch.tensor([0.0 if same else 1.0], device=flat.device)
        dist.all_reduce(differs, op=dist.ReduceOp.SUM)
        if differs.item():
            raise RuntimeError(
                f"the weights of {int(differs.item())} of {self.world_size} training processes "
                "differ from rank 0's: the replicas diverged"
            )


@contextmanager
def process_group(device: str = "auto") -> Iterator[Replica]:
    """Join torchrun's process group for the duration of training (no-op without torchrun).

    A process group that the caller already started is used as it is and left running.
    """
    size = world_size()
    if size <= 1:
        yield Replica(0, 1, resolve_device(device, 0, distributed=False))
        return
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={size} but this torch build has no torch.distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank, distributed=True)
    started_here = not dist.is_initialized()
    if started_here:
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
            dist.init_process_group("nccl", timeout=COLLECTIVE_TIMEOUT, device_id=resolved)
        else:
            dist.init_process_group("gloo", timeout=COLLECTIVE_TIMEOUT)
    try:
        yield Replica(dist.get_rank(), dist.get_world_size(), resolved)
    finally:
        if started_here:
            dist.destroy_process_group()


def local_slices(
    batch_size: int, micro_batches: int | None, world: int, rank: int
) -> tuple[int, list[tuple[int, slice]]]:
    """The slicing of the global batch: (number of slices, [(slice index, positions), ...] of the
    slices that process ``rank`` of ``world`` computes)."""
    n = world if micro_batches is None else int(micro_batches)
    if n < 1 or n % world:
        raise ValueError(
            f"training.micro_batches={micro_batches} must be a positive multiple of the number of "
            f"processes ({world}); null means one per process"
        )
    if batch_size % n:
        raise ValueError(
            f"training.batch_size={batch_size} (the global batch) must be divisible by the number "
            f"of micro-batches ({n}: {world} processes x {n // world} each)"
        )
    size, per_rank = batch_size // n, n // world
    first = rank * per_rank
    return n, [(j, slice(j * size, (j + 1) * size)) for j in range(first, first + per_rank)]


def slice_seed(seed: int, step: int, index: int) -> int:
    """The torch seed for slice ``index`` of step ``step``: a hash of the three, so that streams
    of neighbouring steps or slices are unrelated."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(1, np.uint64)[0])
