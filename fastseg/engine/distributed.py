"""Process groups and data sharding for ``torchrun --nproc_per_node=N -m fastseg train``.

torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; with WORLD_SIZE > 1 the run joins a process group
(nccl on GPUs, gloo on the CPU), wraps the model in DistributedDataParallel, shards the data
with :class:`EpochSampler` and lets only rank 0 write files and draw progress bars.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "setup", "teardown", "EpochSampler", "resolve_device"]


@dataclass
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """"auto" -> cuda:<local rank> when a GPU is present, else cpu; "cuda" -> the local
    rank's GPU; anything else as torch.device takes it (a clear error for an absent GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for but no CUDA device is available")
        if device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
    return device


def setup(device_name: str = "auto") -> Context:
    """Join the process group torchrun describes (if any) and pick this process' device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    ctx = Context(rank, world_size, local_rank, device)
    if world_size > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError("WORLD_SIZE > 1 but torch.distributed is not available")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        ctx.initialized_here = True
    return ctx


def teardown(ctx: Context) -> None:
    if ctx.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


class EpochSampler(torch.utils.data.Sampler):
    """Indices for one epoch, reproducible from (seed, epoch): a permutation (or the identity),
    padded by wrapping to a multiple of world_size * batch_size when ``drop_last`` is False
    and cut to one otherwise, then this rank's share (rank, rank + world_size, ...).
    ``set_epoch(epoch, start_batch)`` starts the epoch at a batch - how ``--resume`` continues
    mid-epoch exactly where the interrupted run was."""

    def __init__(self, length: int, *, batch_size: int, shuffle: bool = True, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True) -> None:
        if length < 1:
            raise ValueError("EpochSampler: the dataset is empty")
        per_step = batch_size * world_size
        if drop_last and length < per_step:
            raise ValueError(f"the training set has {length} images, fewer than one step needs "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.length, self.batch_size, self.shuffle, self.seed = length, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    @property
    def batches_per_epoch(self) -> int:
        per_step = self.batch_size * self.world_size
        if self.drop_last:
            return self.length // per_step
        return -(-self.length // per_step)

    def _epoch_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.batches_per_epoch * self.batch_size * self.world_size
        while len(order) < total:
            order += order[: total - len(order)]
        order = order[:total]
        return order[self.rank::self.world_size]

    def __iter__(self):
        return iter(self._epoch_indices()[self.start_batch * self.batch_size:])

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size
