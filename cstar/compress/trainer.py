"""The shared adversarial-training recipe (cstar.train) behind every method: ADMM W-steps, the
held-out check before fine-tuning, and fine-tuning with best-robust selection."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

from cstar.compress.config import CompressConfig


class Trainer:
    """The shared adversarial-training recipe (cstar.train) for ADMM and fine-tuning."""

    def __init__(self, train_set: Any, cfg: CompressConfig, eps: float, norm: str, progress: bool,
                 teacher: Any = None) -> None:
        self.cfg = cfg
        self.teacher = teacher
        self.eps = eps
        self.norm = norm
        self.progress = progress
        from cstar.train import split_train_val

        self.train_set, self.val_set = split_train_val(train_set, cfg.val_fraction, cfg.seed)

    def train_config(self, epochs: int, lr: float) -> Any:
        from cstar.train import TrainConfig

        values: dict[str, Any] = {
            "epochs": epochs, "batch_size": self.cfg.batch_size, "lr": lr, "optimizer": self.cfg.optimizer,
            "weight_decay": self.cfg.weight_decay, "factor_decay": self.cfg.factor_decay,
            "method": self.cfg.train_method, "eps": self.eps,
            "norm": self.norm, "train_steps": self.cfg.train_steps,
            "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed, "device": self.cfg.device,
            "amp": self.cfg.amp, "channels_last": self.cfg.channels_last, "workers": self.cfg.workers,
        }
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in values.items() if k in known})

    def admm_epoch(self, epochs: int) -> Any:
        """A W-step callable for run_admm: one adversarial epoch with the ADMM penalty as extra loss.

        Same loader (DistributedSampler shard, order a function of (seed, epoch)), DDP wrapper, AMP
        and channels_last handling as `cstar.train.fit`; prints images/s per epoch.
        """
        import torch

        from cstar import distributed as dist
        from cstar.train import make_optimizer, make_scaler, resolve_device, train_epoch

        tcfg = self.train_config(max(epochs, 1), self.cfg.lr)
        device = resolve_device(tcfg.device)
        loader = dist.make_loader(self.train_set, self.cfg.batch_size, shuffle=True, workers=tcfg.workers,
                                  seed=self.cfg.seed, pin_memory=device.type == "cuda")
        holder: dict[str, Any] = {}

        def one_epoch(model: Any, extra_loss: Any, epoch: int) -> dict[str, float]:
            if holder.get("model") is not model:  # constant lr: the rho schedule, not the lr, drives convergence
                model.to(device)
                if tcfg.channels_last and device.type == "cuda":
                    model.to(memory_format=torch.channels_last)
                holder.update(model=model, wrapped=dist.wrap_model(model, device),
                              optimizer=make_optimizer(model, tcfg), scaler=make_scaler(device, tcfg.amp))
            dist.set_epoch(loader, epoch)
            stats = train_epoch(holder["wrapped"], loader, holder["optimizer"], tcfg, scheduler=None,
                                extra_loss=extra_loss, desc=f"admm {epoch + 1}/{epochs}", progress=self.progress,
                                scaler=holder["scaler"], teacher=self.teacher)
            dist.sync_module(model)  # BatchNorm running statistics: rank 0's everywhere
            stats["loss"] = dist.mean_across_ranks(stats["loss"])
            stats["images_per_s"] *= dist.world_size()
            if self.progress and dist.is_main():
                print(f"admm {epoch + 1}/{epochs}: loss {stats['loss']:.3f} ({stats['seconds']:.1f}s, "
                      f"{stats['images_per_s']:.0f} img/s)", file=sys.stderr, flush=True)
            return _numeric(stats)

        return one_epoch

    def validate(self, model: Any) -> dict[str, float]:
        """Held-out clean / PGD accuracy (the fine-tuning's validation attack) of `model` as it is now:
        how much the factorization or pruning itself cost before any fine-tuning."""
        from cstar.data import to_tensors
        from cstar.train import evaluate, isolated_rng, resolve_device

        if self.val_set is None:
            return {}
        tcfg = self.train_config(1, self.cfg.finetune_lr)
        device = resolve_device(tcfg.device)
        model.to(device).eval()
        images, labels = to_tensors(self.val_set, limit=tcfg.val_limit)
        with isolated_rng(device, self.cfg.seed):
            val = evaluate(model, images, labels, self.eps, tcfg.val_steps, None, norm=self.norm, shard=True)
        return {"val_clean": float(val["clean_acc"]), "val_robust": float(val["robust_acc"])}

    def finetune(self, model: Any, epochs: int) -> tuple[Any, list[dict[str, Any]], int]:
        """Adversarial fine-tuning with cstar.train.fit (keeps the best robust-validation weights)."""
        from cstar.train import fit

        tcfg = self.train_config(epochs, self.cfg.finetune_lr)
        result = fit(model, self.train_set, self.val_set, tcfg, progress=self.progress, teacher=self.teacher)
        return result.model, [_numeric(h) for h in result.history], int(result.best_epoch)


def _numeric(stats: Any) -> dict[str, Any]:
    if not isinstance(stats, dict):
        return {}
    return {k: (float(v) if hasattr(v, "__float__") and not isinstance(v, (dict, list)) else v)
            for k, v in stats.items()}
