"""One adversarial epoch (`train_epoch`) and the PGD evaluation used inside training (`evaluate`)."""

from __future__ import annotations

import copy
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from cstar import distributed as dist
from cstar.attacks import AttackConfig, eval_mode, pgd
from cstar.errors import CstarError
from cstar.train.config import TrainConfig
from cstar.train.losses import Teacher, adversarial_loss
from cstar.train.runtime import autocast_context, make_scaler


@dataclass
class EpochProgress:
    """Where an epoch stands: optimizer steps done, summed loss, images seen, seconds spent."""

    step: int = 0
    loss_sum: float = 0.0
    seen: int = 0
    seconds: float = 0.0


def progress_bars(progress: bool) -> bool:
    """Whether to draw tqdm bars: asked for, on the main rank, and stderr is a terminal a person watches.

    Redirected to a file (`make demo > log`), a bar is thousands of carriage-return frames; there the
    one line per epoch that `fit` prints is the progress report.
    """
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(progress and dist.is_main() and callable(isatty) and isatty())


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    scheduler: Any = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
    scaler: torch.amp.GradScaler | None = None,
    start: EpochProgress | None = None,
    on_step: Callable[[EpochProgress], None] | None = None,
    teacher: Teacher | None = None,
) -> dict[str, float]:
    """One adversarial epoch; `extra_loss()` is added to every batch loss (e.g. the ADMM penalty).

    `start` continues an epoch resumed mid-way (the loader already skips its first batches);
    `on_step(progress)` runs after every optimizer step (mid-epoch checkpoints). Returns this rank's
    mean loss, seconds and images/s.
    """
    from tqdm import tqdm

    device = next(model.parameters()).device
    scaler = scaler if scaler is not None else make_scaler(device, cfg.amp)
    state = copy.copy(start) if start is not None else EpochProgress()
    seen_before, started = state.seen, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress_bars(progress), unit="batch")
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(device, cfg.amp):
            loss = adversarial_loss(model, x, y, cfg, teacher)
            if extra_loss is not None:
                loss = loss + extra_loss()
        if not torch.isfinite(loss):
            raise CstarError("training diverged (loss is NaN/Inf)", "lower --lr or check the input data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        state.step += 1
        state.loss_sum += float(loss.detach()) * x.shape[0]
        state.seen += x.shape[0]
        bar.set_postfix(loss=f"{state.loss_sum / state.seen:.3f}")
        if on_step is not None:
            on_step(dataclasses.replace(state, seconds=state.seconds + time.perf_counter() - started))
    seconds = time.perf_counter() - started
    return {"loss": state.loss_sum / max(state.seen, 1), "seconds": state.seconds + seconds,
            "images_per_s": (state.seen - seen_before) / max(seconds, 1e-9), "steps": float(state.step)}


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 256,
    norm: str = "linf",
    shard: bool = False,
) -> dict[str, Any]:
    """Clean and PGD robust accuracy (fractions in [0,1]) on the given tensors (fp32, no autocast).

    With `shard` under torchrun every rank attacks every W-th image and the counts are summed, so
    all ranks return the same numbers for the whole set.
    """
    device = next(model.parameters()).device
    model = dist.unwrap(model)
    n = int(images.shape[0])
    if shard and dist.is_active():
        images, labels = images[dist.rank() :: dist.world_size()], labels[dist.rank() :: dist.world_size()]
    clean = robust = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        with torch.no_grad(), eval_mode(model):
            clean += int((model(x).argmax(1) == y).sum())
        x_adv = pgd(model, x, y, eps, steps, step_size, norm) if eps > 0 else x
        with torch.no_grad(), eval_mode(model):
            robust += int((model(x_adv).argmax(1) == y).sum())
    if shard:
        clean, robust = (int(round(v)) for v in dist.sum_across_ranks([clean, robust]))
    attack = AttackConfig("pgd", eps, steps, step_size, norm).to_dict()
    return {"clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1), "n": n, "attack": attack}
