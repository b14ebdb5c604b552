"""PyTorch DistributedDataParallel under `torchrun` (gloo on CPU, NCCL on GPU); no-ops otherwise.

`torchrun --nproc_per_node N -m cstar train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `init_from_env`
then joins the process group. Every rank runs the same code; only rank 0 writes artifacts.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def is_active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_active() else 1


def rank() -> int:
    return tdist.get_rank() if is_active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1); True when distributed."""
    if is_active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_active()
    use_cuda = device != "cpu" and torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank())
    tdist.init_process_group(backend=backend)
    return True


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap `model` when distributed (BatchNorm statistics stay per rank, as in plain DDP)."""
    if not is_active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=True)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """A loader over this rank's shard: `batch_size` is per rank (global batch = batch_size * world)."""
    generator = torch.Generator().manual_seed(seed)
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed) if is_active() else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      num_workers=workers, pin_memory=pin_memory, generator=generator,
                      persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)


def mean_across_ranks(value: float) -> float:
    if not is_active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def barrier() -> None:
    if is_active():
        tdist.barrier()


def cleanup() -> None:
    if is_active():
        tdist.destroy_process_group()
