"""Adversarial training (PGD-AT, TRADES) with best-robust checkpoint selection and resume.

`fit` is the one training loop of the project: `cstar train` uses it for dense models and
`cstar compress` reuses it for the ADMM W-step (`extra_loss` adds the penalty, `on_epoch_end`
runs the Z/U updates) and for adversarial fine-tuning. It runs on CPU, on one GPU (AMP,
channels_last) and under `torchrun` (DistributedDataParallel; see cstar/distributed.py).

Crash safety: with a `state_dir`, the full training state is written atomically after every epoch
and every `checkpoint_every` optimizer steps (rank 0 only). The sample order of an epoch is a pure
function of (seed, epoch), so a run killed mid-epoch resumes at the next batch and ends where an
uninterrupted run ends (bit-exact on CPU with a fixed thread count and `workers 0`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cstar import distributed as dist
from cstar import validate
from cstar.attacks import FAST_METHODS, AttackConfig, default_step_size, eval_mode, fast_example, pgd
from cstar.config import TRAIN_METHODS
from cstar.errors import CstarError
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.manifest import atomic_target
from cstar.stage_metrics import (
    add_eval_arguments,
    metrics_summary,
    spec_from_args,
    stage_metrics,
    test_tensors,
)

METHODS = TRAIN_METHODS
SCHEDULES = ("cosine", "step", "cyclic")
FACTOR_DECAYS = ("factors", "frobenius")
DEFAULT_EPOCHS = {"digits": 60, "fashion-mnist": 10, "cifar10": 60, "imagefolder": 30}
STATE_NAME = "train_state.pt"
STATE_FORMAT = 2
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


# --------------------------------------------------------------------------------------- helpers


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


def split_train_val(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic held-out split of the training set (for best-robust checkpoint selection).

    The held-out part reads an augmentation-free view of the data (ImageFolder: resize + center crop).
    """
    n = len(dataset)  # type: ignore[arg-type]
    n_val = int(round(n * fraction))
    if n_val == 0:
        return dataset, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(_without_augmentation(dataset), order[:n_val])


def _without_augmentation(dataset: Dataset) -> Dataset:
    if not getattr(dataset, "augment", False):
        return dataset
    view = copy.copy(dataset)
    view.augment = False  # type: ignore[attr-defined]
    return view


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


def amp_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the GPU supports it (no loss scaling needed), else float16 (with GradScaler)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16


def _autocast(device: torch.device, enabled: bool) -> Any:
    """CUDA autocast for the training step, PGD included (a no-op on CPU or when disabled)."""
    return torch.autocast(device_type=device.type, dtype=amp_dtype(device), enabled=enabled and device.type == "cuda")


def make_scaler(device: torch.device, amp: bool) -> torch.amp.GradScaler:
    """A GradScaler that is active only for float16 autocast (bf16 and fp32 need none)."""
    enabled = amp and device.type == "cuda" and amp_dtype(device) == torch.float16
    return torch.amp.GradScaler("cuda" if device.type == "cuda" else "cpu", enabled=enabled)


def _attack_loss_scale() -> float:
    """Constant factor for the PGD loss under float16 autocast: keeps input gradients from underflowing.

    PGD only uses the gradient's sign (Linf) or direction (L2), so scaling changes nothing else.
    """
    if torch.is_autocast_enabled("cuda") and torch.get_autocast_dtype("cuda") == torch.float16:
        return 1024.0
    return 1.0


# ------------------------------------------------------------------------------------------ losses


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


# -------------------------------------------------------------------------------------- epochs


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
        with _autocast(device, cfg.amp):
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


def _stack(dataset: Dataset, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    from cstar.data import to_tensors

    return to_tensors(dataset, limit=limit)


# ------------------------------------------------------------------------------------------- resume


def _save_state(state_dir: Path, payload: dict[str, Any]) -> None:
    """Atomic write of the resume state (temp file, fsync, rename): a kill never leaves half a file."""
    tmp = atomic_target(state_dir / STATE_NAME)
    try:
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(state_dir / STATE_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def read_state(path: Path) -> dict[str, Any]:
    """Load a resume state file; a truncated, foreign or incomplete one is a clear CstarError."""
    hint = f"delete {path} (or its run directory) and start over"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a half-written or foreign file must not be trusted
        raise CstarError(f"corrupt resume state {path} ({type(exc).__name__}: {str(exc)[:120]})", hint) from exc
    required = {"format", "config", "epoch", "step", "model", "optimizer", "scheduler", "rng", "history",
                "history_keys", "best_epoch", "partial", "world_size"}
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not required <= set(state):
        raise CstarError(f"corrupt resume state {path} (not a cstar format-{STATE_FORMAT} training state)", hint)
    return state


def _load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_NAME
    return read_state(path) if path.is_file() else None


def _resume_key(cfg: TrainConfig, n_train: int) -> str:
    """What must match between an interrupted and a resumed run (JSON, stored in the state)."""
    values = {k: getattr(cfg, k) for k in RESUME_KEYS}
    return json.dumps({**values, "train_images": n_train}, sort_keys=True)


def _check_resumable(state: dict[str, Any], key: str, state_dir: Path) -> None:
    if state["config"] != key:
        saved, now = json.loads(state["config"]), json.loads(key)
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(now) if saved.get(k) != now.get(k))
        raise CstarError(f"the resume state in {state_dir} was written by a different configuration ({diff})",
                         "resume with the same arguments as the interrupted run, or delete the directory")
    if int(state["step"]) > 0 and int(state["world_size"]) != dist.world_size():
        raise CstarError(
            f"the resume state in {state_dir} stopped mid-epoch with {int(state['world_size'])} processes, "
            f"this run has {dist.world_size()}", "resume with the same --nproc_per_node as the interrupted run")


def _rng_state(device: torch.device) -> dict[str, Any]:
    np_state: tuple[Any, ...] = np.random.get_state(legacy=True)  # type: ignore[assignment]
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]), "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": float("nan") if py_state[2] is None else float(py_state[2]),
    }
    if device.type == "cuda":  # this rank's device; every rank draws the same amounts
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    has_gauss, gauss = state.get("numpy_gauss", [0, 0.0])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state.get("numpy_pos", 624)),
                         int(has_gauss), float(gauss)))
    py_gauss = float(state.get("python_gauss", float("nan")))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None if math.isnan(py_gauss) else py_gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ---------------------------------------------------------------------------------------------- fit


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
    scaler = make_scaler(device, cfg.amp)
    extra_loss = _with_frobenius_decay(extra_loss, model, cfg)
    val_x, val_y = _stack(val_set, cfg.val_limit) if val_set is not None else (None, None)
    result = FitResult(model)
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch, start = 0, EpochProgress()
    key = _resume_key(cfg, len(train_set))  # type: ignore[arg-type]
    resumed = _load_state(state_dir) if state_dir is not None else None
    if resumed is not None and state_dir is not None:
        _check_resumable(resumed, key, state_dir)
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if resumed.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(resumed["scaler"])
        _set_rng_state(resumed["rng"], device)
        start_epoch = int(resumed["epoch"])
        loss_sum, seen, seconds = (float(v) for v in resumed["partial"].tolist())
        start = EpochProgress(int(resumed["step"]), loss_sum, int(seen), seconds)
        result.history = [dict(zip(resumed["history_keys"], row, strict=True)) for row in resumed["history"].tolist()]
        result.best_epoch = int(resumed["best_epoch"])
        best_state = resumed.get("best_model")
        if dist.is_main():
            where = f"epoch {start_epoch + 1}, step {start.step}/{steps_per_epoch}" if start.step else \
                f"epoch {start_epoch + 1}"
            print(f"resuming at {where} ({state_dir / STATE_NAME})", flush=True)

    def save(epoch: int, at: EpochProgress) -> None:
        if state_dir is not None and dist.is_main():
            _save_state(state_dir, _state_payload(model, optimizer, scheduler, scaler, device, epoch, at, result,
                                                  best_state, key, steps_per_epoch))

    def on_step(at: EpochProgress) -> None:
        global_step = epoch * steps_per_epoch + at.step
        if cfg.checkpoint_every > 0 and at.step < steps_per_epoch and global_step % cfg.checkpoint_every == 0:
            save(epoch, at)

    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        resume_here = epoch == start_epoch and start.step > 0
        dist.set_epoch(loader, epoch, skip_batches=start.step if resume_here else 0)
        stats = train_epoch(train_model, loader, optimizer, cfg, scheduler, extra_loss,
                            desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=progress, scaler=scaler,
                            start=start if resume_here else None,
                            on_step=on_step if state_dir is not None else None, teacher=teacher)
        dist.set_epoch(loader, epoch)  # drop a resume skip
        dist.sync_module(model)  # BatchNorm running statistics: rank 0's everywhere
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        row = {"epoch": float(epoch), "loss": dist.mean_across_ranks(stats["loss"]), "seconds": stats["seconds"],
               "images_per_s": stats["images_per_s"] * dist.world_size()}
        if val_x is not None and val_y is not None:
            with isolated_rng(device, cfg.seed * 7919 + epoch):
                val = evaluate(model, val_x, val_y, cfg.eps, cfg.val_steps, None, norm=cfg.norm, shard=True)
            row.update(val_clean=val["clean_acc"], val_robust=val["robust_acc"])
            score = val["robust_acc"] + 1e-3 * val["clean_acc"]
            best_score = -1.0 if result.best_epoch < 0 else (
                result.history[result.best_epoch]["val_robust"] + 1e-3 * result.history[result.best_epoch]["val_clean"])
            if score > best_score or not select_best:
                result.best_epoch = epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        result.history.append(row)
        if progress and dist.is_main():
            extra = f", val clean {row['val_clean']:.3f} robust {row['val_robust']:.3f}" if "val_clean" in row else ""
            print(f"epoch {epoch + 1}/{cfg.epochs}: loss {row['loss']:.3f}{extra} "
                  f"({row['seconds']:.1f}s, {row['images_per_s']:.0f} img/s)", flush=True)
        save(epoch + 1, EpochProgress())
        dist.barrier()
    if best_state is not None and select_best:
        model.load_state_dict(best_state)
    if result.best_epoch >= 0:
        result.best_val = {k: v for k, v in result.history[result.best_epoch].items() if k.startswith("val_")}
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def _with_frobenius_decay(extra_loss: Callable[[], torch.Tensor] | None, model: nn.Module,
                          cfg: TrainConfig) -> Callable[[], torch.Tensor] | None:
    """`extra_loss` plus the Frobenius decay of factorized layers when the config asks for it."""
    penalty = frobenius_penalty(model, cfg.weight_decay) if cfg.factor_decay == "frobenius" else None
    if penalty is None:
        return extra_loss
    if extra_loss is None:
        return penalty
    first = extra_loss
    return lambda: first() + penalty()


def _state_payload(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
                   device: torch.device, epoch: int, at: EpochProgress, result: FitResult,
                   best_state: dict[str, torch.Tensor] | None, key: str, steps_per_epoch: int) -> dict[str, Any]:
    """Everything `fit` needs to continue at (epoch, step): step 0 means the epoch has not started."""
    keys = sorted({k for row in result.history for k in row})
    history = torch.tensor([[row.get(k, float("nan")) for k in keys] for row in result.history], dtype=torch.float64)
    payload: dict[str, Any] = {
        "format": STATE_FORMAT,
        "config": key,
        "epoch": epoch,
        "step": at.step,
        "steps_per_epoch": steps_per_epoch,
        "world_size": dist.world_size(),
        "partial": torch.tensor([at.loss_sum, float(at.seen), at.seconds], dtype=torch.float64),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(device),
        "history": history,
        "history_keys": keys,
        "best_epoch": result.best_epoch,
    }
    if best_state is not None:
        payload["best_model"] = best_state
    return payload


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar train`."""
    parser.add_argument("--data", default="digits", help="dataset: digits, fashion-mnist[:PATH], cifar10:PATH, "
                        "imagefolder:PATH")
    parser.add_argument("--image-size", type=int, default=None, help="resize inputs (digits default 16)")
    parser.add_argument("--model", default=None, help="model registry name or import path package.module:factory (default depends on the dataset)")
    parser.add_argument("--model-options", default=None, metavar="JSON",
                        help="keyword arguments of the model builder as a JSON object (recorded in the manifest)")
    parser.add_argument("--width", type=int, default=None, help="base width for small-resnet/resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="default depends on the dataset")
    parser.add_argument("--eps", type=float, default=None, help="Linf radius in [0,1] pixels (default: dataset's)")
    parser.add_argument("--method", default="pgd-at", choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, choices=("sgd", "adam"))
    parser.add_argument("--schedule", default=TrainConfig.schedule, choices=SCHEDULES,
                        help="LR schedule (cyclic: the one-cycle schedule of fast adversarial training)")
    parser.add_argument("--train-steps", type=int, default=TrainConfig.train_steps, help="PGD steps while training")
    parser.add_argument("--trades-beta", type=float, default=TrainConfig.trades_beta)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--augment", action="store_true", help="random crop/flip (CIFAR, ImageFolder)")
    parser.add_argument("--checkpoint-every", type=int, default=TrainConfig.checkpoint_every, metavar="N",
                        help="also save the resume state every N optimizer steps (0: only at epoch ends)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in --out (same arguments; the state is in OUT/.state)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    add_eval_arguments(parser)


def check_run_dir(out: Path, resume: bool) -> dict[str, Any] | None:
    """Classify `out` before training; returns the manifest of a finished run when resuming one.

    Fresh or absent: None. Finished (manifest whose weights verify): error, or with --resume that
    manifest. A manifest whose weights are missing or differ from its sha256: corrupt, never trusted.
    Weights or a resume state without a manifest: interrupted, needs --resume (and a state).
    """
    from cstar.checkpoint import WEIGHTS_NAME
    from cstar.manifest import MANIFEST_NAME, read_manifest, verify_file

    state = out / ".state" / STATE_NAME
    if (out / MANIFEST_NAME).exists():
        delete = f"delete {out} and re-run the training"
        try:
            manifest = read_manifest(out, ["train"])
            weights = manifest.get("weights")
            if not isinstance(weights, dict) or "file" not in weights or "sha256" not in weights:
                raise CstarError(f"{out}/{MANIFEST_NAME} names no weights file", delete)
            verify_file(out, str(weights["file"]), str(weights["sha256"]))
        except CstarError as exc:
            raise CstarError(f"corrupt run directory {out}: {exc.message}", delete) from exc
        if not resume:
            raise CstarError(f"{out} already holds a finished run", "pick another --out, or delete it first")
        return manifest
    if not resume and (state.exists() or (out / WEIGHTS_NAME).exists()):
        raise CstarError(f"{out} holds an interrupted run (no manifest.json yet)",
                         "pass --resume to continue it, or pick another --out")
    if resume and (out / WEIGHTS_NAME).exists() and not state.exists():
        raise CstarError(f"{out} holds an interrupted run without a resume state ({state} is missing)",
                         f"delete {out} and re-run the training")
    return None


def claim_run_dir(args: argparse.Namespace) -> Any:
    """The run directory's claim (cstar.outdir, resumable in place); None on ranks that never write.

    Refuses another stage's directory, user data and the dataset's own path; holds the lock while training.
    """
    from cstar.checkpoint import WEIGHTS_NAME
    from cstar.outdir import OutputDir, dataset_path, writing_rank

    claim = OutputDir(Path(args.out), "train", (dataset_path(args.data),), resumable=True,
                      own_files=(".state", WEIGHTS_NAME))
    return claim if writing_rank() else None


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the CLI arguments say and write the train-stage directory; returns its manifest.

    Under torchrun every rank trains; rank 0 alone writes the state, the weights and the manifest (and
    holds the run directory's lock, cstar.outdir).
    """
    from cstar.outdir import holding

    with holding(claim_run_dir(args), args.out):
        return _train(args)


def _train(args: argparse.Namespace) -> dict[str, Any]:
    """run_train's work, with the run directory claimed."""
    from cstar.checkpoint import save_checkpoint
    from cstar.data import load_dataset
    from cstar.manifest import read_manifest
    from cstar.models import build_model, default_model_for, model_options

    if args.epochs is not None and args.epochs < 1:
        raise CstarError(f"epochs must be >= 1, got {args.epochs}", "pass --epochs 1 or more")
    if args.eps is not None:
        validate.eps(args.eps)
    validate.device(args.device)
    out: Path = args.out
    finished = check_run_dir(out, args.resume)
    if args.resume and finished is None and not (out / ".state" / STATE_NAME).exists() and dist.is_main():
        print(f"note: --resume: {out} holds no saved training state; starting from scratch", file=sys.stderr,
              flush=True)
    if finished is not None:
        if dist.is_main():
            print(f"{out} already holds a finished run: nothing to resume", flush=True)
        return finished
    bundle = load_dataset(args.data, image_size=args.image_size, augment=args.augment)
    spec = bundle.spec
    if args.eps is not None:
        validate.eps(args.eps, dataset=spec.name)  # the warning above the dataset's usual range
    model_name = args.model or default_model_for(spec.name)
    options = model_options(args.width, getattr(args, "model_options", None))
    cfg = TrainConfig(
        epochs=args.epochs or DEFAULT_EPOCHS.get(spec.name, 30), batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, schedule=args.schedule, method=args.method, trades_beta=args.trades_beta,
        eps=spec.default_eps if args.eps is None else args.eps, train_steps=args.train_steps,
        seed=args.seed, device=args.device, amp=args.amp,
        channels_last=args.channels_last, workers=args.workers, checkpoint_every=args.checkpoint_every,
    )
    cfg.validate()
    eval_spec = spec_from_args(args, seed=cfg.seed)
    dist.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(model_name, spec, **options)
    train_set, val_set = split_train_val(bundle.train, cfg.val_fraction, cfg.seed)
    state_dir = out / ".state"
    if dist.is_main():
        state_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    result = fit(model, train_set, val_set, cfg, state_dir=state_dir)
    test_x, test_y = test_tensors(bundle, getattr(args, "eval_limit", None), cfg.seed)
    with isolated_rng(resolve_device(cfg.device), cfg.seed):
        metrics = stage_metrics(model, test_x, test_y, cfg.eps, cfg.norm, eval_spec)
    if dist.is_main():
        source = {"path": spec.data_arg, "sha256": None}
        save_checkpoint(out, model, "train", model_name, options, spec, {
            "inputs": [source], "eps": cfg.eps, "norm": cfg.norm,
            "config": {**cfg.__dict__, "data": args.data, "model": model_name, "world_size": dist.world_size()},
            "metrics": metrics,
            "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.seconds,
        })
        (state_dir / STATE_NAME).unlink(missing_ok=True)
        for stale in state_dir.glob(f".{STATE_NAME}.*"):  # a temp a SIGKILL left mid-checkpoint (atomic_target)
            stale.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # leave a finished run as weights + manifest only
            state_dir.rmdir()
    dist.barrier()
    manifest = read_manifest(out, ["train"])
    if dist.is_main():
        print(f"trained {model_name} on {spec.name} (eps {cfg.eps:g}, {cfg.method}) in {result.seconds:.0f}s: "
              f"{metrics_summary(metrics)}, "
              f"{manifest['params']} params -> {out}", flush=True)
    dist.cleanup()
    return manifest


def main(args: argparse.Namespace) -> int:
    run_train(args)
    return 0
