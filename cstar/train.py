"""Adversarial training (PGD-AT, TRADES) with best-robust checkpoint selection and resume.

`fit` is the one training loop of the project: `cstar train` uses it for dense models and
`cstar compress` reuses it for the ADMM W-step (`extra_loss` adds the penalty, `on_epoch_end`
runs the Z/U updates) and for adversarial fine-tuning. It runs on CPU, on one GPU (AMP,
channels_last) and under `torchrun` (DistributedDataParallel; see cstar/distributed.py).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from cstar import distributed as dist
from cstar.attacks import AttackConfig, default_step_size, eval_mode, pgd
from cstar.errors import CstarError
from cstar.manifest import atomic_target

METHODS = ("pgd-at", "trades")
DEFAULT_EPOCHS = {"digits": 30, "fashion-mnist": 10, "cifar10": 60, "imagefolder": 30}
STATE_NAME = "train_state.pt"


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
    method: str = "pgd-at"
    trades_beta: float = 6.0
    eps: float = 0.2
    norm: str = "linf"
    train_steps: int = 5
    train_step_size: float | None = None
    eval_steps: int = 20
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
        if self.eps < 0:
            raise CstarError(f"eps must be >= 0, got {self.eps}", "pass a non-negative --eps (inputs are [0,1])")
        if self.method not in METHODS:
            raise CstarError(f"unknown training method '{self.method}'", f"use one of: {', '.join(METHODS)}")
        if self.optimizer not in ("sgd", "adam"):
            raise CstarError(f"unknown optimizer '{self.optimizer}'", "use sgd or adam")
        if self.schedule not in ("cosine", "step"):
            raise CstarError(f"unknown schedule '{self.schedule}'", "use cosine or step")
        if not 0 <= self.val_fraction < 1:
            raise CstarError(f"val_fraction must be in [0, 1), got {self.val_fraction}", "pass e.g. 0.1")
        if self.batch_size < 1 or self.lr <= 0:
            raise CstarError("batch size and learning rate must be positive", "check --batch-size and --lr")


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
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise CstarError("CUDA was requested but torch sees no GPU", "pass --device cpu")
        if name == "cuda":
            return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_train_val(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset | None]:
    """Deterministic held-out split of the training set (for best-robust checkpoint selection)."""
    n = len(dataset)  # type: ignore[arg-type]
    n_val = int(round(n * fraction))
    if n_val == 0:
        return dataset, None
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[n_val:]), Subset(dataset, order[:n_val])


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> Any:
    """Per-step LR schedule: optional linear warm-up, then cosine or step (x0.1 at 50% and 75%)."""
    total = max(cfg.epochs * steps_per_epoch, 1)
    warmup = cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        return 0.01 if progress >= 0.75 else 0.1 if progress >= 0.5 else 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _autocast(device: torch.device, enabled: bool) -> Any:
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled and device.type == "cuda")


# ------------------------------------------------------------------------------------------ losses


def adversarial_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    """PGD-AT: CE on PGD examples; TRADES: CE(clean) + beta * KL(clean || adversarial).

    Examples are crafted in eval mode (BN running statistics, as at test time); the loss is then
    computed in train mode.
    """
    step = cfg.train_step_size or default_step_size(cfg.eps, cfg.train_steps)
    if cfg.method == "trades":
        with torch.no_grad(), eval_mode(model):
            clean_prob = F.softmax(model(x), dim=1)

        def kl_loss(logits: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
            return F.kl_div(F.log_softmax(logits, dim=1), clean_prob, reduction="batchmean")

        x_adv = pgd(model, x, y, cfg.eps, cfg.train_steps, step, cfg.norm, random_start=True, loss_fn=kl_loss)
        model.train()
        logits_clean = model(x)
        logits_adv = model(x_adv)
        robust = F.kl_div(F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean")
        return F.cross_entropy(logits_clean, y) + cfg.trades_beta * robust
    x_adv = pgd(model, x, y, cfg.eps, cfg.train_steps, step, cfg.norm, random_start=True) if cfg.eps > 0 else x
    model.train()
    return F.cross_entropy(model(x_adv), y)


# -------------------------------------------------------------------------------------- epochs


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    scheduler: Any = None,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    desc: str = "train",
    progress: bool = True,
) -> dict[str, float]:
    """One adversarial epoch; `extra_loss()` is added to every batch loss (e.g. the ADMM penalty)."""
    from tqdm import tqdm

    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported())
    total_loss, seen, started = 0.0, 0, time.perf_counter()
    bar = tqdm(loader, desc=desc, leave=False, disable=not progress or not dist.is_main(), unit="batch")
    for x, y in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if cfg.channels_last and device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(device, cfg.amp):
            loss = adversarial_loss(model, x, y, cfg)
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
        total_loss += float(loss.detach()) * x.shape[0]
        seen += x.shape[0]
        bar.set_postfix(loss=f"{total_loss / seen:.3f}")
    seconds = time.perf_counter() - started
    return {"loss": total_loss / max(seen, 1), "seconds": seconds, "images_per_s": seen / max(seconds, 1e-9)}


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    eps: float,
    steps: int = 20,
    step_size: float | None = None,
    batch_size: int = 256,
    norm: str = "linf",
) -> dict[str, Any]:
    """Clean and PGD robust accuracy (fractions in [0,1]) on the given tensors."""
    device = next(model.parameters()).device
    clean = robust = 0
    for start in range(0, images.shape[0], batch_size):
        x = images[start : start + batch_size].to(device)
        y = labels[start : start + batch_size].to(device)
        with torch.no_grad(), eval_mode(model):
            clean += int((model(x).argmax(1) == y).sum())
        x_adv = pgd(model, x, y, eps, steps, step_size, norm) if eps > 0 else x
        with torch.no_grad(), eval_mode(model):
            robust += int((model(x_adv).argmax(1) == y).sum())
    n = int(images.shape[0])
    attack = AttackConfig("pgd", eps, steps, step_size, norm).to_dict()
    return {"clean_acc": clean / max(n, 1), "robust_acc": robust / max(n, 1), "n": n, "attack": attack}


def _stack(dataset: Dataset, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    from cstar.data import to_tensors

    return to_tensors(dataset, limit=limit)


# ------------------------------------------------------------------------------------------- resume


def _save_state(state_dir: Path, payload: dict[str, Any]) -> None:
    tmp = atomic_target(state_dir / STATE_NAME)
    try:
        torch.save(payload, tmp)
        tmp.replace(state_dir / STATE_NAME)
    finally:
        tmp.unlink(missing_ok=True)


def _load_state(state_dir: Path) -> dict[str, Any] | None:
    path = state_dir / STATE_NAME
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a half-written or foreign file must not be trusted
        raise CstarError(f"resume state {path} is unreadable ({type(exc).__name__})",
                         f"delete {path} to start over") from exc


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
            "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), 624, 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))


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
) -> FitResult:
    """Adversarially train `model`; return it with the weights of the best held-out robust accuracy.

    With `state_dir`, the full state (weights, optimizer, scheduler, RNG, best so far) is saved
    atomically after every epoch and a later call with the same arguments resumes from it.
    """
    cfg.validate()
    device = resolve_device(cfg.device)
    model.to(device)
    if cfg.channels_last and device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    train_model = dist.wrap_model(model, device)
    loader = dist.make_loader(train_set, cfg.batch_size, shuffle=True, workers=cfg.workers, seed=cfg.seed,
                              pin_memory=device.type == "cuda")
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, len(loader))
    val_x, val_y = _stack(val_set, cfg.val_limit) if val_set is not None else (None, None)
    result = FitResult(model)
    best_state: dict[str, torch.Tensor] | None = None
    start_epoch = 0
    resumed = _load_state(state_dir) if state_dir is not None else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        _set_rng_state(resumed["rng"])
        start_epoch = int(resumed["epoch"]) + 1
        result.history = [dict(zip(resumed["history_keys"], row, strict=True)) for row in resumed["history"].tolist()]
        result.best_epoch = int(resumed["best_epoch"])
        best_state = resumed.get("best_model")
        if dist.is_main():
            print(f"resuming from epoch {start_epoch} ({state_dir / STATE_NAME})", flush=True)
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        dist.set_epoch(loader, epoch)
        stats = train_epoch(train_model, loader, optimizer, cfg, scheduler, extra_loss,
                            desc=f"epoch {epoch + 1}/{cfg.epochs}", progress=progress)
        if on_epoch_end is not None:
            on_epoch_end(epoch, model)
        row = {"epoch": float(epoch), "loss": dist.mean_across_ranks(stats["loss"]), "seconds": stats["seconds"],
               "images_per_s": stats["images_per_s"] * dist.world_size()}
        if val_x is not None and val_y is not None:
            val = evaluate(model, val_x, val_y, cfg.eps, cfg.val_steps, None, norm=cfg.norm)
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
        if state_dir is not None and dist.is_main():
            _save_state(state_dir, _state_payload(model, optimizer, scheduler, epoch, result, best_state))
        dist.barrier()
    if best_state is not None and select_best:
        model.load_state_dict(best_state)
    if result.best_epoch >= 0:
        result.best_val = {k: v for k, v in result.history[result.best_epoch].items() if k.startswith("val_")}
    result.seconds = time.perf_counter() - started
    model.eval()
    return result


def _state_payload(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
                   result: FitResult, best_state: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    keys = sorted({k for row in result.history for k in row})
    history = torch.tensor([[row.get(k, float("nan")) for k in keys] for row in result.history], dtype=torch.float64)
    payload: dict[str, Any] = {
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "epoch": epoch,
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
    parser.add_argument("--model", default=None, help="model registry name (default depends on the dataset)")
    parser.add_argument("--width", type=int, default=None, help="base width for small-resnet/resnet18")
    parser.add_argument("--epochs", type=int, default=None, help="default depends on the dataset")
    parser.add_argument("--eps", type=float, default=None, help="Linf radius in [0,1] pixels (default: dataset's)")
    parser.add_argument("--method", default="pgd-at", choices=METHODS)
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--optimizer", default=TrainConfig.optimizer, choices=("sgd", "adam"))
    parser.add_argument("--schedule", default=TrainConfig.schedule, choices=("cosine", "step"))
    parser.add_argument("--train-steps", type=int, default=TrainConfig.train_steps, help="PGD steps while training")
    parser.add_argument("--eval-steps", type=int, default=TrainConfig.eval_steps, help="PGD steps for the report")
    parser.add_argument("--trades-beta", type=float, default=TrainConfig.trades_beta)
    parser.add_argument("--seed", type=int, default=TrainConfig.seed)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda")
    parser.add_argument("--amp", action="store_true", help="mixed precision on CUDA (bf16 where supported)")
    parser.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    parser.add_argument("--workers", type=int, default=0, help="data-loader worker processes")
    parser.add_argument("--augment", action="store_true", help="random crop/flip (CIFAR, ImageFolder)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument("--out", type=Path, required=True, help="output directory")


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    """Train as the CLI arguments say and write the train-stage directory; returns its manifest."""
    import json

    from cstar.checkpoint import save_checkpoint
    from cstar.data import load_dataset, to_tensors
    from cstar.models import build_model, default_model_for

    if args.epochs is not None and args.epochs < 1:
        raise CstarError(f"epochs must be >= 1, got {args.epochs}", "pass --epochs 1 or more")
    if args.eps is not None and args.eps < 0:
        raise CstarError(f"eps must be >= 0, got {args.eps}", "pass a non-negative --eps (inputs are [0,1])")
    bundle = load_dataset(args.data, image_size=args.image_size, augment=args.augment)
    spec = bundle.spec
    model_name = args.model or default_model_for(spec.name)
    options = {"width": args.width} if args.width else {}
    cfg = TrainConfig(
        epochs=args.epochs or DEFAULT_EPOCHS.get(spec.name, 30), batch_size=args.batch_size, lr=args.lr,
        optimizer=args.optimizer, schedule=args.schedule, method=args.method, trades_beta=args.trades_beta,
        eps=spec.default_eps if args.eps is None else args.eps, train_steps=args.train_steps,
        eval_steps=args.eval_steps, seed=args.seed, device=args.device, amp=args.amp,
        channels_last=args.channels_last, workers=args.workers,
    )
    cfg.validate()
    out: Path = args.out
    if (out / "manifest.json").exists() and not args.resume:
        raise CstarError(f"{out} already holds a finished run", "pick another --out, or delete it first")
    out.mkdir(parents=True, exist_ok=True)
    dist.init_from_env(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(model_name, spec, **options)
    train_set, val_set = split_train_val(bundle.train, cfg.val_fraction, cfg.seed)
    state_dir = out / ".state"
    if not args.resume and (state_dir / STATE_NAME).exists():
        raise CstarError(f"{out} holds an interrupted run", "pass --resume to continue it, or pick another --out")
    state_dir.mkdir(exist_ok=True)
    result = fit(model, train_set, val_set, cfg, state_dir=state_dir)
    test_x, test_y = to_tensors(bundle.test)
    metrics = evaluate(model, test_x, test_y, cfg.eps, cfg.eval_steps, norm=cfg.norm)
    manifest: dict[str, Any] = {}
    if dist.is_main():
        source = {"path": spec.data_arg, "sha256": None}
        path = save_checkpoint(out, model, "train", model_name, options, spec, {
            "inputs": [source], "eps": cfg.eps, "norm": cfg.norm,
            "config": {**cfg.__dict__, "data": args.data, "model": model_name, "world_size": dist.world_size()},
            "metrics": {k: metrics[k] for k in ("clean_acc", "robust_acc", "attack", "n")},
            "history": result.history, "best_epoch": result.best_epoch, "train_seconds": result.seconds,
        })
        manifest = json.loads(path.read_text())
        (state_dir / STATE_NAME).unlink(missing_ok=True)
        print(f"trained {model_name} on {spec.name} (eps {cfg.eps:g}, {cfg.method}) in {result.seconds:.0f}s: "
              f"clean {metrics['clean_acc']:.3f}, PGD-{cfg.eval_steps} robust {metrics['robust_acc']:.3f}, "
              f"{manifest['params']} params -> {out}", flush=True)
    dist.cleanup()
    return manifest


def main(args: argparse.Namespace) -> int:
    run_train(args)
    return 0
