"""Where and how a training step runs: device choice, seeding, CUDA autocast/GradScaler, and an
isolated RNG stream for evaluation inside training."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from cstar import distributed as dist
from cstar import validate
from cstar.errors import CstarError


def resolve_device(name: str) -> torch.device:
    """'auto' -> the local CUDA device when there is one (per torchrun rank), else CPU."""
    validate.device(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CstarError("CUDA was requested but torch sees no GPU", "pass --device cpu")
        # fixed input shapes throughout a run: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
        if name == "cuda":
            return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16 (with GradScaler)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, enabled: bool) -> Any:
    """CUDA autocast for the training step, PGD included (a no-op on CPU or when disabled)."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=enabled and device.type == "cuda")


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 autocast (bf16 and fp32 need none)."""
    enabled = amp and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=enabled)


@contextlib.contextmanager
def isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run the block on its own seeded RNG stream and restore the caller's afterwards.

    Evaluation inside training uses it, so its random starts neither depend on nor disturb the
    training stream (every rank keeps the same stream; resume stays exact).
    """
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        torch.manual_seed(seed)
        yield
