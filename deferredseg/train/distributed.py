"""The process group: one process, or one rank of a ``torchrun`` launch (the device is
:func:`deferredseg.train.runtime.resolve_device`).

Under ``torchrun`` (``WORLD_SIZE`` > 1) the loop uses DistributedDataParallel
with ``sync_balance=True`` and a distributed sampler, and writes logs and
checkpoints on rank 0 only.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = ["DistInfo"]


class DistInfo:
    """Rank and world size; a process group is created when torchrun launched us."""

    def __init__(self, device: torch.device) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.owns_group = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's ``flag`` on every rank."""
        value = torch.tensor([1.0 if flag else 0.0])
        if self.world > 1:
            value = value.to(device)
            dist.broadcast(value, 0)
        return bool(value.item())

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
