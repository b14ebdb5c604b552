"""`fit`: the one adversarial training loop of the project (dense training, ADMM W-steps, fine-tuning)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from cstar import distributed as dist
from cstar.data import to_tensors
from cstar.train.config import FitResult, TrainConfig
from cstar.train.epoch import EpochProgress, evaluate, train_epoch
from cstar.train.losses import Teacher
from cstar.train.optim import make_optimizer, make_scheduler, with_frobenius_decay
from cstar.train.resume import (
    STATE_NAME,
    check_resumable,
    load_state,
    resume_key,
    save_state,
    set_rng_state,
    state_payload,
)
from cstar.train.runtime import isolated_rng, make_scaler, resolve_device


@dataclass
class _Run:
    """What one `fit` call trains with: the model (and its DDP wrapper), the loader and the optimizer state."""

    model: nn.Module
    train_model: nn.Module
    device: torch.device
    loader: Any
    steps_per_epoch: int
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler


def fit(
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset | None,
    cfg: TrainConfig,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
    state_dir: Path | None = None,
    progress: bool = True,
    select_best: bool = True,
    teacher: Teacher | None = None,
) -> FitResult:
    """Adversarially train `model`; return it with the weights of the best held-out robust accuracy.

    With `state_dir`, the full state (weights, optimizer, scheduler, GradScaler, RNG, position in the
    epoch, best so far) is saved atomically by rank 0 after every epoch and every
    `cfg.checkpoint_every` steps; a later call with the same arguments resumes from it. Under
    torchrun the model is DDP-wrapped, every rank trains on its shard (per-rank batch
    `cfg.batch_size`), BatchNorm buffers are re-synchronized from rank 0 at each epoch end and
    validation is sharded and summed, so every rank holds the same model and metrics.
    """
    cfg.validate()
    run = _set_up(model, train_set, cfg)
    extra_loss = with_frobenius_decay(extra_loss, model, cfg)
    val_x, val_y = to_tensors(val_set, limit=cfg.val_limit) if val_set is not None else (None, None)
    result = FitResult(model)
    key = resume_key(cfg, len(train_set))  # type: ignore[arg-type]
    resumed = load_state(state_dir) if state_dir is not None else None
    start_epoch, start, best_state = 0, EpochProgress(), None
    if resumed is not None and state_dir is not None:
        check_resumable(resumed, key, state_dir)
        start_epoch, start, best_state = _restore(run, resumed, result, state_dir)

    def save(epoch: int, at: EpochProgress) -> None:
        if state_dir is not None and dist.is_main():
            save_state(state_dir, state_payload(model, run.optimizer, run.scheduler, run.scaler, run.device, epoch,
                                                at, result, best_state, key, run.steps_per_epoch))

    def on_step(at: EpochProgress) -> None:
        global_step = epoch * run.steps_per_epoch + at.step
        if cfg.checkpoint_every > 0 and at.step < run.steps_per_epoch and global_step % cfg.checkpoint_every == 0:
            save(epoch, at)

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        resume_here = epoch == start_epoch and start.step > 0
        dist.set_epoch(run.loader, epoch, skip_batches=start.step if resume_here else 0)
        stats = train_epoch(run.train_model, run.loader, run.optimizer, cfg, run.scheduler, extra_loss,
                            desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=progress, scaler=run.scaler,
                            start=start if resume_here else None,
                            on_step=on_step if state_dir is not None else None, teacher=teacher)
        dist.set_epoch(run.loader, epoch)  # drop a resume skip
        dist.sync_module(model)  # BatchNorm running statistics: rank 0's everywhere
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        row = {"epoch": float(epoch), "loss": dist.mean_across_ranks(stats["loss"]), "seconds": stats["seconds"],
               "images_per_s": stats["images_per_s"] * dist.world_size()}
        if val_x is not None and val_y is not None:
            with isolated_rng(run.device, cfg.seed * 7919 + epoch):
                val = evaluate(model, val_x, val_y, cfg.eps, cfg.val_steps, None, norm=cfg.norm, shard=True)
            row.update(val_clean=val["clean_acc"], val_robust=val["robust_acc"])
            if _beats_best(row, result) or not select_best:
                result.best_epoch = epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        result.history.append(row)
        if progress and dist.is_main():
            _print_epoch(row, epoch, cfg.epochs)
        save(epoch + 1, EpochProgress())
        dist.barrier()
    if best_state is not None and select_best:
        model.load_state_dict(best_state)
    if result.best_epoch >= 0:
        result.best_val = {k: v for k, v in result.history[result.best_epoch].items() if k.startswith("val_")}
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def _set_up(model: nn.Module, train_set: Dataset, cfg: TrainConfig) -> _Run:
    """Move `model` to its device (DDP-wrapped under torchrun) and make the loader, optimizer, schedule, scaler."""
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap_model(model, device)
    loader = dist.make_loader(train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed,
                              pin_memory=device.type == "cuda")
    steps_per_epoch = dist.batches_per_epoch(loader)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch)
    return _Run(model, train_model, device, loader, steps_per_epoch, optimizer, scheduler, make_scaler(device, cfg.amp))


def _restore(run: _Run, resumed: dict[str, Any], result: FitResult,
             state_dir: Path) -> tuple[int, EpochProgress, dict[str, torch.Tensor] | None]:
    """Load a checked resume state into the run and `result`; returns (epoch, position in it, best weights)."""
    run.model.load_state_dict(resumed["model"])
    run.optimizer.load_state_dict(resumed["optimizer"])
    run.scheduler.load_state_dict(resumed["scheduler"])
    if resumed.get("scaler") and run.scaler.is_enabled():
        run.scaler.load_state_dict(resumed["scaler"])
    set_rng_state(resumed["rng"], run.device)
    start_epoch = int(resumed["epoch"])
    loss_sum, seen, seconds = (float(v) for v in resumed["partial"].tolist())
    start = EpochProgress(int(resumed["step"]), loss_sum, int(seen), seconds)
    result.history = [dict(zip(resumed["history_keys"], row, strict=True)) for row in resumed["history"].tolist()]
    result.best_epoch = int(resumed["best_epoch"])
    if dist.is_main():
        where = f"epoch {start_epoch + 1}, step {start.step}/{run.steps_per_epoch}" if start.step else \
            f"epoch {start_epoch + 1}"
        print(f"resuming at {where} ({state_dir / STATE_NAME})", flush=True)
    return start_epoch, start, resumed.get("best_model")


def _beats_best(row: dict[str, float], result: FitResult) -> bool:
    """Whether this epoch's held-out robust accuracy (clean breaks ties) beats the best epoch so far."""
    if result.best_epoch < 0:
        return True
    best = result.history[result.best_epoch]
    return row["val_robust"] + 1e-3 * row["val_clean"] > best["val_robust"] + 1e-3 * best["val_clean"]


def _print_epoch(row: dict[str, float], epoch: int, epochs: int) -> None:
    extra = f", val clean {row['val_clean']:.3f} robust {row['val_robust']:.3f}" if "val_clean" in row else ""
    print(f"epoch {epoch + 1}/{epochs}: loss {row['loss']:.3f}{extra} "
          f"({row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s)", flush=True)
