"""Data-parallel training across the processes ``torchrun`` starts (NCCL on GPUs, gloo on CPUs).

Every rank walks the same global batch order and takes its own slice of each batch; gradients of
the trainable parameters are averaged after the backward pass, so every rank applies the same
update and a run on N processes matches a one-process run with the same global batch. Rank 0
alone writes files and evaluates.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from mugcp.config import ConfigError


class RankSlice(Sampler[list]):
    """Each batch of ``batches`` cut to this rank's share: items ``rank, rank + world, ...``."""

    def __init__(self, batches, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Join the process group torchrun describes in the environment (one process: a no-op)."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    def device(self, device: torch.device) -> torch.device:
        if device.type == "cuda" and self.world_size > 1:
            # modulo: under Slurm a task may see only the GPU bound to it (then it is device 0)
            device = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        return device

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ConfigError(
                f"data.batch_size={batch_size} is the global batch and must split evenly over {self.world_size} "
                "processes."
            )

    def shard(self, loader: DataLoader) -> DataLoader:
        if self.world_size == 1:
            return loader
        return DataLoader(
            loader.dataset, batch_sampler=RankSlice(loader.batch_sampler, self.rank, self.world_size),
            collate_fn=loader.collate_fn, num_workers=loader.num_workers, generator=loader.generator,
        )

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world_size

    def mean_and_any(self, value: torch.Tensor, flag: bool) -> tuple[torch.Tensor, bool]:
        """``mean(value)`` and whether ``flag`` is true on any rank, in one collective (every step's loss
        carries the stop request, so all ranks stop after the same step)."""
        if self.world_size == 1:
            return value, bool(flag)
        both = torch.stack([value.detach().float().reshape(()), torch.tensor(float(bool(flag)), device=value.device)])
        dist.all_reduce(both)
        return both[0] / self.world_size, bool(both[1] > 0)

    def any(self, flag: bool) -> bool:
        if self.world_size == 1:
            return bool(flag)
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
        value = torch.tensor([float(bool(flag))], device=device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def gather_object(self, value) -> list:
        """Every rank's ``value``, in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def average_gradients(self, parameters) -> None:
        if self.world_size == 1:
            return
        for param in parameters:
            if param.grad is not None:
                dist.all_reduce(param.grad)
                param.grad /= self.world_size

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()
