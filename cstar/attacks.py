"""White-box attacks on torch models (FGSM, PGD Linf/L2) and a numpy bridge for black-box ones.

Inputs are [0,1] pixels, so eps means the same at every stage. Attacks run the model in eval mode
(BatchNorm uses running statistics, as at deployment) and restore its previous mode afterwards.
The score-based Square attack lives in `cstar.square` (numpy only, so it also runs on devices).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cstar.errors import CstarError

NORMS = ("linf", "l2")


@dataclass
class AttackConfig:
    """A white-box attack as recorded in manifests (`metrics.attack`)."""

    name: str = "pgd"
    eps: float = 0.0
    steps: int = 20
    step_size: float | None = None
    norm: str = "linf"
    random_start: bool = True

    def resolved_step_size(self) -> float:
        return default_step_size(self.eps, self.steps) if self.step_size is None else self.step_size

    def to_dict(self) -> dict[str, object]:
        values = asdict(self)
        values["step_size"] = self.resolved_step_size()
        return values


def default_step_size(eps: float, steps: int) -> float:
    """2.5 * eps / steps (Madry et al.): enough to reach the ball's boundary from a random start."""
    return 2.5 * eps / max(steps, 1)


def _check(x: torch.Tensor, eps: float, norm: str) -> None:
    if eps < 0:
        raise CstarError(f"eps must be >= 0, got {eps}", "pass a non-negative eps (inputs are [0,1] pixels)")
    if norm not in NORMS:
        raise CstarError(f"unknown norm '{norm}'", f"use one of: {', '.join(NORMS)}")
    if not torch.isfinite(x).all():
        raise CstarError("input contains NaN or Inf", "clean the input data; pixels must be finite values in [0,1]")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run `model` in eval mode inside the block, then restore its mode (train or eval)."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def project_delta(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project a perturbation onto the eps-ball (Linf: clamp; L2: rescale the rows longer than eps)."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    flat = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (delta.ndim - 1)))
    return delta * (eps / flat).clamp(max=1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return (torch.rand_like(x) * 2 - 1) * eps
    direction = torch.randn_like(x)
    direction = direction / direction.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.ndim - 1)))
    radius = torch.rand(x.shape[0], device=x.device).view(-1, *([1] * (x.ndim - 1))) * eps
    return direction * radius


def _step(grad: torch.Tensor, step_size: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    unit = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.ndim - 1)))
    return step_size * unit


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    norm: str = "linf",
    random_start: bool = True,
    loss_fn: LossFn | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al. 2018), Linf or L2; result in the eps-ball and [0,1].

    `loss_fn(logits, y)` is maximized (default: cross-entropy); TRADES passes a KL loss.
    """
    _check(x, eps, norm)
    if eps == 0 or steps <= 0:
        return x.detach().clone()
    step = default_step_size(eps, steps) if step_size is None else step_size
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x = x.detach()
    delta = _random_start(x, eps, norm) if random_start else torch.zeros_like(x)
    delta = ((x + delta).clamp(0, 1) - x).detach()
    with eval_mode(model):
        for _ in range(steps):
            delta.requires_grad_(True)
            loss = loss_fn(model(x + delta), y)
            (grad,) = torch.autograd.grad(loss, delta)
            delta = project_delta(delta.detach() + _step(grad, step, norm), eps, norm)
            delta = ((x + delta).clamp(0, 1) - x).detach()
    return (x + delta).detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: one Linf step of size eps from the clean input."""
    return pgd(model, x, y, eps, steps=1, step_size=eps, norm="linf", random_start=False)


def attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: AttackConfig) -> torch.Tensor:
    """Run the attack an `AttackConfig` describes."""
    if config.name == "fgsm":
        return fgsm(model, x, y, config.eps)
    if config.name == "pgd":
        return pgd(model, x, y, config.eps, config.steps, config.step_size, config.norm, config.random_start)
    raise CstarError(f"unknown attack '{config.name}'", "use 'pgd' or 'fgsm'")


def torch_predict_fn(model: nn.Module, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """numpy NCHW float32 in -> numpy logits out, in eval mode without gradients (for black-box attacks)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def predict(batch: np.ndarray) -> np.ndarray:
        outputs = []
        with eval_mode(model), torch.no_grad():
            for start in range(0, batch.shape[0], batch_size):
                chunk = torch.from_numpy(np.ascontiguousarray(batch[start : start + batch_size], dtype=np.float32))
                outputs.append(model(chunk.to(device)).float().cpu().numpy())
        return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.float32)

    return predict


FAST_METHODS = {"fgsm-rs": (1.0, 1.25, True), "n-fgsm": (2.0, 1.0, False)}  # noise x eps, step x eps, project


def fast_example(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, method: str = "fgsm-rs",
                 loss_fn: LossFn | None = None) -> torch.Tensor:
    """One-step training examples of fast adversarial training (Linf), one gradient per batch:

    - `fgsm-rs` (Wong, Rice & Kolter 2020, "Fast is better than free"): uniform start in the eps-ball,
      one signed step of 1.25 eps, projected back onto the ball;
    - `n-fgsm` (de Jorge et al. 2022): uniform noise of 2 eps, one signed step of eps, no projection
      (the larger noise, not clipping, is what keeps it from catastrophic overfitting).
    Always inside [0,1]; `loss_fn(logits, y)` is maximized (default cross-entropy).
    """
    if method not in FAST_METHODS:
        raise CstarError(f"unknown fast attack '{method}'", f"use one of: {', '.join(FAST_METHODS)}")
    _check(x, eps, "linf")
    if eps == 0:
        return x.detach().clone()
    noise, step, projected = FAST_METHODS[method]
    loss_fn = loss_fn or (lambda logits, target: F.cross_entropy(logits, target))
    x = x.detach()
    delta = ((torch.rand_like(x) * 2 - 1) * noise * eps)
    delta = ((x + delta).clamp(0, 1) - x).requires_grad_(True)
    with eval_mode(model):
        (grad,) = torch.autograd.grad(loss_fn(model(x + delta), y), delta)
    delta = delta.detach() + step * eps * grad.sign()
    if projected:
        delta = delta.clamp(-eps, eps)
    return (x + delta).clamp(0, 1).detach()
