"""PyTorch DistributedDataParallel under `torchrun` (gloo on CPU, NCCL on GPU); no-ops otherwise.

`torchrun --nproc_per_node N -m cstar train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `init_from_env`
then joins the process group. Every rank runs the same code; only rank 0 writes artifacts.

Data order: `make_loader` always uses `ResumableSampler` (a `DistributedSampler`, also with one
process), so the order of an epoch is a pure function of (seed, epoch): the permutation
`randperm(n, seed + epoch)`, padded to a multiple of the world size, dealt round-robin to the ranks
(rank r gets positions r, r + W, r + 2W, ...). A run resumed mid-epoch skips the batches it has
already trained on with `set_epoch(loader, epoch, skip_batches=k)`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def is_active() -> bool:
    """True inside an initialized process group."""
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


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or `model` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap_model(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP-wrap `model` when distributed (BatchNorm statistics stay per rank, as in plain DDP).

    DDP broadcasts rank 0's parameters and buffers at construction and its buffers before every
    forward; `sync_module` re-aligns the buffers at the end of an epoch.
    """
    if not is_active():
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (works without a process group too) whose epoch can start at batch k.

    The order is `DistributedSampler`'s: a function of (seed, epoch, rank, world size) only.
    """

    def __init__(self, dataset: Dataset, shuffle: bool, seed: int, replicas: int | None = None,
                 replica: int | None = None) -> None:
        super().__init__(dataset, num_replicas=world_size() if replicas is None else replicas,
                         rank=rank() if replica is None else replica, shuffle=shuffle, seed=seed)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and skip its first `skip` samples (of this rank's shard)."""
        super().set_epoch(epoch)
        self.skip = max(0, min(skip, self.num_samples))

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        return iter(indices[self.skip :])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, workers: int, seed: int,
                pin_memory: bool = False) -> DataLoader:
    """A loader over this rank's shard: `batch_size` is per rank (global batch = batch_size * world)."""
    generator = torch.Generator().manual_seed(seed)  # worker seeds only; the order is the sampler's
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      generator=generator, persistent_workers=workers > 0)


def set_epoch(loader: DataLoader, epoch: int, skip_batches: int = 0) -> None:
    """Select `epoch`'s sample order (and skip its first `skip_batches` batches on resume)."""
    sampler = loader.sampler
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch, skip_batches * int(loader.batch_size or 1))
    elif isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    if loader.generator is not None:  # worker seeds: a function of (seed, epoch) as well
        seed = sampler.seed if isinstance(sampler, DistributedSampler) else 0
        loader.generator.manual_seed(seed * 1_000_003 + epoch)


def batches_per_epoch(loader: DataLoader) -> int:
    """Full-epoch batch count of this rank (independent of a resume skip)."""
    sampler = loader.sampler
    total = sampler.num_samples if isinstance(sampler, DistributedSampler) else len(sampler)  # type: ignore[arg-type]
    size = int(loader.batch_size or 1)
    return total // size if loader.drop_last else -(-total // size)


def mean_across_ranks(value: float) -> float:
    """Average of a float over the ranks (identity when not distributed)."""
    if not is_active():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    tdist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def sum_across_ranks(values: Sequence[float]) -> list[float]:
    """Element-wise sum of a list of floats over the ranks (identity when not distributed)."""
    if not is_active():
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64)
    tdist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def _collective_device() -> torch.device:
    if is_active() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` as rank `src` holds it, on every rank (pickled; for small metadata such as rank maps)."""
    if not is_active():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src, device=_collective_device())
    return box[0]


def broadcast_tensors(tensors: Sequence[torch.Tensor], src: int = 0) -> None:
    """Overwrite `tensors` in place with rank `src`'s values (same shapes on every rank)."""
    if not is_active():
        return
    device = _collective_device()
    for tensor in tensors:
        if tensor.device == device and tensor.is_contiguous():
            tdist.broadcast(tensor.data, src=src)
        else:  # another device, or channels_last: collectives want dense contiguous tensors
            staged = tensor.detach().to(device).contiguous()
            tdist.broadcast(staged, src=src)
            tensor.data.copy_(staged.to(tensor.device))


def sync_module(model: nn.Module, src: int = 0) -> None:
    """Make every parameter and buffer equal to rank `src`'s (e.g. BatchNorm running statistics)."""
    if not is_active():
        return
    module = unwrap(model)
    broadcast_tensors([t for t in module.state_dict().values() if isinstance(t, torch.Tensor)], src=src)


def barrier() -> None:
    if is_active():
        tdist.barrier()


def cleanup() -> None:
    """Leave the process group (all ranks meet first, so none tears down a peer still in a collective)."""
    if is_active():
        tdist.barrier()
        tdist.destroy_process_group()
