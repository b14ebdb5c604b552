"""The training recipe (`TrainConfig`, recorded in the manifest), what `fit` returns, and the names the
parsers offer."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from cstar import validate
from cstar.config import FACTOR_DECAYS, TRAIN_METHODS
from cstar.errors import CstarError

METHODS = TRAIN_METHODS
SCHEDULES = ("cosine", "step", "cyclic")
DEFAULT_EPOCHS = {"digits": 60, "fashion-mnist": 10, "cifar10": 60, "imagefolder": 30}
# TrainConfig fields a resumed run must share with the interrupted one (others, e.g. device, may change)
RESUME_KEYS = ("epochs", "batch_size", "lr", "optimizer", "schedule", "momentum", "weight_decay", "method",
               "trades_beta", "eps", "norm", "train_steps", "train_step_size", "warmup_epochs", "seed", "factor_decay")


@dataclass
class TrainConfig:
    """Adversarial training recipe (recorded in the manifest)."""

    epochs: int = 30
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    schedule: str = "cosine"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    factor_decay: str = "factors"  # factorized layers: decay each factor, or "frobenius" (the product they form)
    method: str = "pgd-at"
    trades_beta: float = 6.0
    eps: float = 0.2
    norm: str = "linf"
    train_steps: int = 5
    train_step_size: float | None = None
    val_steps: int = 10
    val_fraction: float = 0.1
    val_limit: int = 1000
    warmup_epochs: int = 0
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    channels_last: bool = False
    workers: int = 0
    checkpoint_every: int = 0

    def validate(self) -> None:
        """Reject user mistakes with a hint."""
        if self.epochs < 1:
            raise CstarError(f"epochs must be >= 1, got {self.epochs}", "pass --epochs 1 or more")
        validate.eps(self.eps, "eps")
        validate.device(self.device)
        for name in ("lr", "momentum", "weight_decay", "trades_beta"):
            validate.in_range(name, getattr(self, name), 0.0)
        if self.method not in METHODS:
            raise CstarError(f"unknown training method '{self.method}'", f"use one of: {', '.join(METHODS)}")
        if self.optimizer not in ("sgd", "adam"):
            raise CstarError(f"unknown optimizer '{self.optimizer}'", "use sgd or adam")
        if self.factor_decay not in FACTOR_DECAYS:
            raise CstarError(f"unknown factor decay '{self.factor_decay}'", f"use one of: {', '.join(FACTOR_DECAYS)}")
        if self.schedule not in SCHEDULES:
            raise CstarError(f"unknown schedule '{self.schedule}'", f"use one of: {', '.join(SCHEDULES)}")
        if self.method in ("fgsm-rs", "n-fgsm") and self.norm != "linf":
            raise CstarError(f"--method {self.method} is a Linf attack, the threat model is {self.norm}",
                             "use --method pgd-at for L2, or --norm linf")
        if not 0 <= self.val_fraction < 1:
            raise CstarError(f"val_fraction must be in [0, 1), got {self.val_fraction}", "pass e.g. 0.1")
        if self.batch_size < 1 or self.lr <= 0:
            raise CstarError("batch size and learning rate must be positive", "check --batch-size and --lr")
        if self.checkpoint_every < 0:
            raise CstarError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}",
                             "pass --checkpoint-every N (optimizer steps; 0 = only at epoch ends)")
        if self.workers < 0:
            raise CstarError(f"workers must be >= 0, got {self.workers}", "pass --workers 0 or more")


@dataclass
class FitResult:
    """The model with the best held-out robust accuracy, and what happened on the way."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = -1
    best_val: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
