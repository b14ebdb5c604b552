"""Optimizer, LR schedule and weight decay of the training recipe (Frobenius decay for factorized layers)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.train.config import TrainConfig


def factorized_layers(model: nn.Module) -> list[LowRankConv2d | LowRankLinear]:
    """The modules of `model` that hold a weight as factors."""
    return [m for m in model.modules() if isinstance(m, (LowRankConv2d, LowRankLinear))]


def _factor_parameters(layer: LowRankConv2d | LowRankLinear) -> list[nn.Parameter]:
    return [p for name, p in layer.named_parameters(recurse=False) if name != "bias"]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov) or Adam with L2 weight decay; with `factor_decay="frobenius"` the factors of
    factorized layers get none here: `frobenius_penalty` decays the product they form instead."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": params}]
    if cfg.factor_decay == "frobenius":
        factors = {id(p) for layer in factorized_layers(model) for p in _factor_parameters(layer)}
        groups = [{"params": [p for p in params if id(p) not in factors]},
                  {"params": [p for p in params if id(p) in factors], "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                           nesterov=cfg.momentum > 0)


def frobenius_penalty(model: nn.Module, weight_decay: float) -> Callable[[], torch.Tensor] | None:
    """Frobenius decay (Khodak et al., ICLR 2021): weight_decay / 2 * sum ||W||_F^2 over the dense
    weights W that factorized layers represent, instead of decaying each factor. Decaying U_out,
    core and U_in separately penalizes W like a (quasi-)nuclear norm and keeps pushing its rank
    down; decaying W itself regularizes the factorized layer as plain weight decay would the dense
    one. None when the model has no factorized layer (nothing to add)."""
    layers = factorized_layers(model)
    if not layers or weight_decay == 0.0:
        return None

    def penalty() -> torch.Tensor:
        return 0.5 * weight_decay * sum((layer.dense_weight().float().pow(2).sum() for layer in layers),
                                        torch.zeros((), device=next(model.parameters()).device))

    return penalty


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """Per-step LR schedule: optional linear warm-up, then cosine, step (x0.1 at 50% and 75%) or cyclic
    (fast AT's one cycle: linear from 0 up to the LR at 40% of training, then linearly down to 0)."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "cyclic":
            peak = 0.4
            return max(progress / peak if progress < peak else (1.0 - progress) / (1.0 - peak), 0.0)
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def with_frobenius_decay(extra_loss: Callable[[], torch.Tensor] | None, model: nn.Module,
                          cfg: TrainConfig) -> Callable[[], torch.Tensor] | None:
    """`extra_loss` plus the Frobenius decay of factorized layers when the config asks for it."""
    penalty = frobenius_penalty(model, cfg.weight_decay) if cfg.factor_decay == "frobenius" else None
    if penalty is None:
        return extra_loss
    if extra_loss is None:
        return penalty
    first = extra_loss
    return lambda: first() + penalty()
