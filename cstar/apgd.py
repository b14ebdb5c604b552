"""Auto-PGD (Croce & Hein, ICML 2020): APGD-CE, APGD-DLR and APGD-T (targeted DLR), Linf and L2.

The white-box half of AutoAttack. Written from the paper (Algorithm 1, Sec. 3) with the reference
implementation's standard settings (fra31/auto-attack `autopgd_base.py`):
- 100 iterations; step size 2*eps, halved at checkpoints w_j = ceil(p_j * N) with p_0 = 0,
  p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (as integer periods: 22, 19, 16, ...,
  never below 6% of N, the reference's form of the same schedule);
- at a checkpoint an example's step is halved when (1) fewer than rho = 0.75 of the steps since the
  last checkpoint raised its loss, or (2) neither its step size nor its best loss changed since the
  last checkpoint; a halved example restarts from its best point (with that point's gradient);
- momentum alpha = 0.75 (the first step has none);
- random start on the eps-sphere (Linf: eps * t / ||t||_inf, t ~ U[-1,1]; L2: eps * t / ||t||_2,
  t ~ N(0,1)), every iterate projected onto the eps-ball and [0,1];
- restarts attack only the examples no earlier restart fooled; APGD-T runs one attack per target,
  the clean logits' 2nd..(k+1)-th classes (k = 9, n_classes - 1 where fewer), on the survivors.
Two readings where paper and reference differ: condition (1) is the paper's strict `<`, and its
loss history starts at the checkpoint's own iterate (the reference counts one stale entry at the
first checkpoint). Success is untargeted (argmax != label) for every loss, as in the reference.

An example counts as fooled as soon as any iterate is misclassified, and that iterate is kept.
The model runs in eval mode (its mode is restored); random starts come from a local
`torch.Generator`, so a seed fixes the result and the global RNG is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cstar.attacks import NORMS, eval_mode, project_delta
from cstar.errors import CstarError

LOSSES = ("ce", "dlr", "dlr-targeted")
Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class APGDConfig:
    """One APGD attack as recorded in manifests (`metrics.attack.attacks[].settings`)."""

    loss: str = "ce"
    norm: str = "linf"
    n_iter: int = 100
    n_restarts: int = 1
    n_targets: int = 9
    rho: float = 0.75
    momentum: float = 0.75
    seed: int = 0
    batch_size: int = 500

    def to_dict(self) -> dict[str, object]:
        values: dict[str, object] = asdict(self)
        values.pop("batch_size")
        if self.loss != "dlr-targeted":
            values.pop("n_targets")
        return values


@dataclass
class APGDResult:
    """`x_adv`: the fooling iterate where one was found, else the highest-loss point (in the ball);
    `success`: misclassified at `x_adv` (True for clean errors too, which are not attacked)."""

    x_adv: torch.Tensor
    success: torch.Tensor
    eps: float
    config: APGDConfig = field(default_factory=APGDConfig)

    @property
    def robust_acc(self) -> float:
        """Fraction of examples still correctly classified."""
        return float(1.0 - self.success.float().mean()) if self.success.numel() else 0.0


def check_eps(eps: float) -> None:
    """eps must be a finite number >= 0 (inputs are [0,1] pixels)."""
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise CstarError(f"eps must be a finite number >= 0, got {eps}",
                         "pass a non-negative eps in [0,1] pixel units, e.g. --eps 0.2")


def _check(x: torch.Tensor, y: torch.Tensor, eps: float, config: APGDConfig) -> None:
    check_eps(eps)
    if config.norm not in NORMS:
        raise CstarError(f"unknown norm '{config.norm}'", f"use one of: {', '.join(NORMS)}")
    if config.loss not in LOSSES:
        raise CstarError(f"unknown APGD loss '{config.loss}'", f"use one of: {', '.join(LOSSES)}")
    if min(config.n_iter, config.n_restarts, config.n_targets, config.batch_size) < 1:
        raise CstarError("APGD n_iter, n_restarts, n_targets and batch_size must be >= 1",
                         "pass positive counts (the standard setting is 100 iterations, 1 restart, 9 targets)")
    if x.shape[0] != y.shape[0]:
        raise CstarError(f"{x.shape[0]} inputs but {y.shape[0]} labels", "pass one label per input")
    if not torch.isfinite(x).all():
        raise CstarError("input contains NaN or Inf", "clean the input data; pixels must be finite values in [0,1]")


def checkpoint_periods(n_iter: int) -> list[int]:
    """Iterations between successive checkpoints (22, 19, 16, 13, 10, 7, 6, ... for N = 100)."""
    period, shrink, floor = max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)
    periods, total = [], 0
    while total + period <= n_iter:
        periods.append(period)
        total += period
        period = max(period - shrink, floor)
    return periods


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Untargeted DLR: -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3), per example (needs >= 3 classes)."""
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None])[:, 0]
    top_is_true = logits.argmax(1) == y
    other = torch.where(top_is_true, ordered[:, 1], ordered[:, 0])
    third = ordered[:, min(2, logits.shape[1] - 1)]
    return -(true - other) / (ordered[:, 0] - third + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2), per example (needs >= 4 classes)."""
    ordered = logits.sort(dim=1, descending=True).values
    last = logits.shape[1] - 1
    scale = ordered[:, 0] - 0.5 * (ordered[:, min(2, last)] + ordered[:, min(3, last)])
    return -(logits.gather(1, y[:, None])[:, 0] - logits.gather(1, target[:, None])[:, 0]) / (scale + 1e-12)


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.ndim - 1)))


def _norm(t: torch.Tensor, norm: str) -> torch.Tensor:
    flat = t.flatten(1)
    return _view(flat.abs().amax(1) if norm == "linf" else flat.norm(dim=1), t)


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Project x_adv onto the eps-ball around x (Linf or L2), then onto [0,1] (which stays in the ball)."""
    return (x + project_delta(x_adv - x, eps, norm)).clamp(0.0, 1.0)


def _random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    if norm == "linf":
        t = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
    else:
        t = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (x + eps * t / (_norm(t, norm) + 1e-12)).clamp(0.0, 1.0)


def _direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    return grad.sign() if norm == "linf" else grad / (_norm(grad, norm) + 1e-12)


def _loss_grad(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor,
               loss_fn: Loss) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example loss, its gradient w.r.t. the input, and the predicted classes."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model(x_adv).float()
        loss = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(loss.sum(), x_adv)
    return loss.detach(), grad.detach(), logits.detach().argmax(1)


@dataclass
class _State:
    """Per-example state of one APGD run."""

    x_adv: torch.Tensor
    grad: torch.Tensor
    x_best: torch.Tensor
    grad_best: torch.Tensor
    loss_best: torch.Tensor
    x_found: torch.Tensor
    fooled: torch.Tensor
    step: torch.Tensor


def _track(state: _State, x_adv: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor, pred: torch.Tensor,
           y: torch.Tensor) -> None:
    """Keep the first misclassified iterate per example and the highest-loss point with its gradient."""
    wrong = (pred != y) & ~state.fooled
    state.x_found[wrong] = x_adv[wrong]
    state.fooled |= wrong
    better = loss > state.loss_best
    state.x_best[better] = x_adv[better]
    state.grad_best[better] = grad[better]
    state.loss_best[better] = loss[better]


def _halve(state: _State, history: list[torch.Tensor], period: int, rho: float, last_best: torch.Tensor,
           halved_last: torch.Tensor) -> torch.Tensor:
    """Checkpoint: halve the step (and restart from the best point) where progress stalled."""
    losses = torch.stack(history[-period - 1:])
    oscillating = (losses[1:] > losses[:-1]).sum(0) < rho * period
    stuck = ~halved_last & (state.loss_best <= last_best)
    halve = oscillating | stuck
    state.step[halve] /= 2.0
    state.x_adv[halve] = state.x_best[halve]
    state.grad[halve] = state.grad_best[halve]
    return halve


def _single_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Loss, eps: float,
                config: APGDConfig, generator: torch.Generator) -> _State:
    """One APGD run (Algorithm 1) from a random start on the sphere."""
    x_adv = _random_start(x, eps, config.norm, generator)
    loss, grad, pred = _loss_grad(model, x_adv, y, loss_fn)
    state = _State(x_adv, grad, x_adv.clone(), grad.clone(), loss.clone(), x_adv.clone(), pred != y,
                   _view(torch.full((x.shape[0],), 2.0 * eps, device=x.device, dtype=x.dtype), x))
    periods = iter(checkpoint_periods(config.n_iter))
    period, since = next(periods, 0), 0
    history, last_best = [loss], state.loss_best.clone()
    halved_last = torch.zeros_like(state.fooled)
    x_prev = x_adv
    for i in range(config.n_iter):
        a = config.momentum if i > 0 else 1.0
        z = project(x, state.x_adv + state.step * _direction(state.grad, config.norm), eps, config.norm)
        x_new = project(x, state.x_adv + a * (z - state.x_adv) + (1 - a) * (state.x_adv - x_prev), eps, config.norm)
        x_prev, state.x_adv = state.x_adv, x_new
        loss, state.grad, pred = _loss_grad(model, x_new, y, loss_fn)
        _track(state, x_new, loss, state.grad, pred, y)
        history.append(loss)
        since += 1
        if since == period:
            halved_last = _halve(state, history, period, config.rho, last_best, halved_last)
            last_best, since, period = state.loss_best.clone(), 0, next(periods, 0)
    return state


def _run_on_survivors(model: nn.Module, x: torch.Tensor, y: torch.Tensor, success: torch.Tensor,
                      x_out: torch.Tensor, loss_out: torch.Tensor, loss_fn: Callable[[torch.Tensor], Loss],
                      eps: float, config: APGDConfig, generator: torch.Generator) -> None:
    """Attack the examples not yet fooled, in batches; record fooling points (or higher-loss ones)."""
    todo = torch.nonzero(~success).flatten()
    for start in range(0, todo.numel(), config.batch_size):
        idx = todo[start : start + config.batch_size]
        state = _single_run(model, x[idx], y[idx], loss_fn(idx), eps, config, generator)
        fooled, higher = state.fooled, state.loss_best > loss_out[idx]
        keep_best = higher & ~fooled
        x_out[idx[fooled]] = state.x_found[fooled]
        x_out[idx[keep_best]] = state.x_best[keep_best]
        loss_out[idx[keep_best]] = state.loss_best[keep_best]
        success[idx[fooled]] = True


def _clean_logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s : s + batch_size]).float() for s in range(0, x.shape[0], batch_size)])


def _prepare(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
             config: APGDConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator]:
    _check(x, y, eps, config)
    x, y = x.detach().float(), y.detach().long()
    generator = torch.Generator(device=x.device)
    generator.manual_seed(config.seed)
    return x, y, _clean_logits(model, x, config.batch_size), generator


def apgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
         config: APGDConfig | None = None) -> APGDResult:
    """Untargeted APGD on the CE (default) or DLR loss; `config.n_restarts` restarts on the survivors."""
    config = config or APGDConfig()
    if config.loss == "dlr-targeted":
        return apgd_targeted(model, x, y, eps, config)
    loss = _ce if config.loss == "ce" else dlr_loss
    with eval_mode(model):
        x, y, logits, generator = _prepare(model, x, y, eps, config)
        success, x_out = logits.argmax(1) != y, x.clone()
        loss_out = torch.full((x.shape[0],), -math.inf, device=x.device)
        for _ in range(config.n_restarts if eps > 0 else 0):
            _run_on_survivors(model, x, y, success, x_out, loss_out, lambda idx: loss, eps, config, generator)
    return APGDResult(x_out, success, eps, config)


def apgd_targeted(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                  config: APGDConfig | None = None) -> APGDResult:
    """APGD-T: targeted DLR towards each of the clean logits' top-k other classes, on the survivors."""
    config = config or APGDConfig(loss="dlr-targeted")
    if config.loss != "dlr-targeted":
        config = APGDConfig(**{**asdict(config), "loss": "dlr-targeted"})
    with eval_mode(model):
        x, y, logits, generator = _prepare(model, x, y, eps, config)
        ranked = logits.argsort(dim=1, descending=True)
        success, x_out = logits.argmax(1) != y, x.clone()
        loss_out = torch.full((x.shape[0],), -math.inf, device=x.device)
        n_targets = min(config.n_targets, logits.shape[1] - 1) if eps > 0 else 0
        for rank in range(1, n_targets + 1):
            target = ranked[:, rank]

            def loss(idx: torch.Tensor, target: torch.Tensor = target) -> Loss:
                return lambda out, labels: dlr_targeted_loss(out, labels, target[idx])

            for _ in range(config.n_restarts):
                _run_on_survivors(model, x, y, success, x_out, loss_out, loss, eps, config, generator)
    return APGDResult(x_out, success, eps, config)
