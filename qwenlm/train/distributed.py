"""One process or many, with the same command: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and the rendezvous
for many nodes), and training runs data-parallel over the processes.

- DDP (every process holds the whole model; gradients averaged) where the model fits: the default for LoRA and
  Q-LoRA, whose frozen base is shared by nothing but whose adapters are small.
- FSDP2 (`torch.distributed.fsdp.fully_shard`: each block's parameters, gradients and optimizer state sharded
  over the processes) for full fine-tuning by default, and for LoRA when asked; checkpoints are then written
  shard by shard through `torch.distributed.checkpoint`.
- NCCL on GPUs, gloo on the CPU (a tiny model trains on a laptop with `torchrun --nproc-per-node 2`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn



@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # the process group was made here (not by the caller), so it is ended here

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str | None) -> Dist:
    """The process group when launched by torchrun (or with RANK/WORLD_SIZE set), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world <= 1:
        return Dist(device=torch.device(device or ("cuda" if cuda else "cpu")))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(rank, world, local_rank, torch.device(f"cuda:{local_rank}" if cuda else "cpu"), owns)


def teardown(d: Dist) -> None:
    if d.active and d.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def resolve_sharding(sharding: str, method: str, d: Dist) -> str:
    """ddp / fsdp / none (one process)."""
    if not d.active:
        return "none"
    if sharding == "auto":
        return "fsdp" if method == "full" else "ddp"
    return sharding


def wrap(module: nn.Module, blocks: nn.ModuleList, kind: str, d: Dist) -> nn.Module:
    """The training module made data-parallel: `blocks` are the units FSDP2 gathers one at a time."""
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        return DistributedDataParallel(module, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard
        for block in blocks:
            fully_shard(block)
        fully_shard(module)
        return module
    return module


def no_sync(module: nn.Module, kind: str, sync: bool):
    """Gradient sync only on an optimizer step's last micro-batch (accumulation without extra traffic)."""
    import contextlib
    if kind == "ddp" and not sync:
        return module.no_sync()
    if kind == "fsdp":
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def all_sum(values: list[float], d: Dist) -> list[float]:
    if not d.active:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()
