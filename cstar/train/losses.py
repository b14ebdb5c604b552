"""The adversarial training losses: PGD-AT, TRADES, FGSM-RS / N-FGSM, with optional robust distillation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cstar import distributed as dist
from cstar.attacks import FAST_METHODS, default_step_size, eval_mode, fast_example, pgd
from cstar.errors import CstarError
from cstar.train.config import TrainConfig


def _attack_loss_scale() -> float:
    """Constant factor for the PGD loss under float16 autocast: keeps input gradients from underflowing.

    PGD only uses the gradient's sign (Linf) or direction (L2), so scaling changes nothing else.
    """
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
        return 1024.0
    return 1.0


@dataclass
class Teacher:
    """Robust distillation target: a frozen (dense) model whose soft labels on the student's PGD
    examples are mixed into the loss: (1 - weight) * loss + weight * T^2 * KL(teacher_T || student_T).

    `cstar compress --distill W` uses the dense source model as teacher for every method alike.
    """

    model: nn.Module
    weight: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise CstarError(f"distillation weight must be in [0, 1], got {self.weight}", "pass e.g. --distill 0.5")
        if not self.temperature > 0.0:
            raise CstarError(f"distillation temperature must be > 0, got {self.temperature}",
                             "pass e.g. --distill-temperature 1")
        self.model.eval()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)

    def mix(self, loss: torch.Tensor, student_logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The distillation-mixed loss for a batch whose student logits on `x` are given."""
        if self.weight == 0.0:
            return loss
        t = self.temperature
        with torch.no_grad(), eval_mode(self.model):
            target = F.softmax(self.model(x).float() / t, dim=1)
        kl = F.kl_div(F.log_softmax(student_logits.float() / t, dim=1), target, reduction="batchmean")
        return (1.0 - self.weight) * loss + self.weight * t * t * kl


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig,
                     teacher: Teacher | None = None) -> torch.Tensor:
    """PGD-AT: CE on PGD examples; TRADES: CE(clean) + beta * KL(clean || adversarial); fgsm-rs / n-fgsm:
    CE on one-step examples (cstar.attacks.fast_example; the held-out PGD check that picks the best
    epoch is the guard against their catastrophic overfitting).

    Examples are crafted in eval mode (BN running statistics, as at test time) on the bare module
    (no DDP gradient hooks or buffer broadcasts per PGD step); the loss is then computed in train
    mode through `model` (the DDP wrapper when distributed). Under autocast PGD runs in reduced
    precision too, with its loss scaled for float16. With a `teacher`, its soft labels on the same
    adversarial examples are mixed in (Teacher.mix).
    """
    step = cfg.train_step_size or default_step_size(cfg.eps, cfg.train_steps)
    attacked = dist.unwrap(model)
    scale = _attack_loss_scale()
    if cfg.method == "trades":
        with torch.no_grad(), eval_mode(attacked):
            clean_prob = F.softmax(attacked(x).float(), dim=1)

        def kl_loss(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return scale * F.kl_div(F.log_softmax(logits.float(), dim=1), clean_prob, reduction="batchmean")

        x_adv = pgd(attacked, x, y, cfg.eps, cfg.train_steps, step, cfg.norm, random_start=True, loss_fn=kl_loss)
        model.train()
        logits_clean = model(x)
        logits_adv = model(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        loss = F.cross_entropy(logits_clean, y) + cfg.trades_beta * robust
        return teacher.mix(loss, logits_adv, x_adv) if teacher is not None else loss
    def ce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return scale * F.cross_entropy(logits, target)

    if cfg.eps > 0 and cfg.method in FAST_METHODS:
        x_adv = fast_example(attacked, x, y, cfg.eps, cfg.method, loss_fn=ce_loss)
    elif cfg.eps > 0:
        x_adv = pgd(attacked, x, y, cfg.eps, cfg.train_steps, step, cfg.norm, random_start=True, loss_fn=ce_loss)
    else:
        x_adv = x
    model.train()
    logits = model(x_adv)
    loss = F.cross_entropy(logits, y)
    return teacher.mix(loss, logits, x_adv) if teacher is not None else loss
