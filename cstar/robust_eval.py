"""Robust accuracy under a named attack suite: the number every robust claim of the project reports.

Suites (`SUITES`), each attack run only on the points every earlier attack left robust (AutoAttack's
order, so a suite costs little more than its first attack):
- `aa`: APGD-CE (100 iterations), APGD-T (targeted DLR, 9 targets x 100 iterations), then the
  project's Square (black-box, 5,000 queries, p_init 0.8): the standard AutoAttack set (FAB-T left out;
  it rarely adds a point after APGD-T).
- `apgd`: APGD-CE (100 iterations) + APGD-T (3 targets x 100 iterations): a CPU-sized white-box run.
- `pgd20`: PGD-20 with cross-entropy (step 2.5 eps / 20, random start): training-time validation
  only; far too weak for a robustness claim on these models.
The headline is the per-example worst case over the suite (`SuiteResult.robust_acc`); each
attack's settings and the robust accuracy after it are recorded beside it (`to_manifest`).
Diagnostics (AutoAttack's own checks) land in `SuiteResult.warnings`: Square fooling more than 0.2%
of the points the white-box attacks missed (gradient masking), PGD-20 above the suite by more than 5 points (with
`compare_pgd20`), and a randomized model (two forward passes differ).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from cstar.apgd import APGDConfig, apgd, apgd_targeted, check_eps
from cstar.attacks import NORMS, default_step_size, eval_mode, pgd, torch_predict_fn
from cstar.errors import CstarError
from cstar.square import P_INIT, square_attack
from cstar.suites import (
    PGD20_PURPOSE,
    PGD_GAP_WARN,
    SQUARE_GAIN_WARN,
    SUITES,
    SuiteSettings,
    check_suite,
    pgd20_above_warning,
    suite_settings,
)

__all__ = ["PGD20_PURPOSE", "PGD_GAP_WARN", "SQUARE_GAIN_WARN", "SUITES", "SuiteSettings", "check_suite",
           "suite_settings", "evaluate_suite", "SuiteResult", "AttackRecord", "suite_summary"]

@dataclass
class AttackRecord:
    """One attack of a suite: its settings and the suite's robust accuracy after it (cumulative)."""

    name: str
    settings: dict[str, Any]
    robust_acc: float
    fooled: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "settings": self.settings, "robust_acc": self.robust_acc}


@dataclass
class SuiteResult:
    """Outcome of `evaluate_suite`; `robust` is the per-example mask after every attack."""

    suite: str
    eps: float
    norm: str
    clean_acc: float
    robust: np.ndarray
    attacks: list[AttackRecord] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    pgd20_robust_acc: float | None = None

    @property
    def n(self) -> int:
        return int(self.robust.size)

    @property
    def robust_acc(self) -> float:
        """Per-example worst case over the suite (fraction of examples no attack fooled)."""
        return int(self.robust.sum()) / max(self.robust.size, 1)

    def to_manifest(self) -> dict[str, Any]:
        """The `metrics.attack` block: suite, eps, norm and each attack's name, settings and accuracy."""
        block: dict[str, Any] = {"suite": self.suite, "eps": self.eps, "norm": self.norm, "n": self.n,
                                 "attacks": [a.to_dict() for a in self.attacks], "warnings": list(self.warnings)}
        if self.suite == "pgd20":
            block["purpose"] = PGD20_PURPOSE
        if self.pgd20_robust_acc is not None:
            block["pgd20_robust_acc"] = self.pgd20_robust_acc
        return block


def _fraction(mask: torch.Tensor) -> float:
    """Share of True entries, as count / n (the same float the numpy mask gives)."""
    return int(mask.sum()) / max(mask.numel(), 1)


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _predict(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model(x[s : s + batch_size]).float() for s in range(0, x.shape[0], batch_size)]) \
            if x.shape[0] else torch.zeros(0)


def _randomized(model: nn.Module, x: torch.Tensor) -> bool:
    """Two forward passes on the same inputs differ (dropout left on, noise layers): attacks need EOT."""
    if x.shape[0] == 0:
        return False
    first, second = _predict(model, x[:16], 16), _predict(model, x[:16], 16)
    return not torch.allclose(first, second, rtol=1e-4, atol=1e-5)


def _apgd_config(loss: str, norm: str, settings: SuiteSettings) -> APGDConfig:
    return APGDConfig(loss=loss, norm=norm, n_iter=settings.n_iter, n_restarts=settings.n_restarts,
                      n_targets=settings.n_targets, seed=settings.seed, batch_size=settings.batch_size)


def _pgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                settings: SuiteSettings) -> torch.Tensor:
    """PGD (CE, random start) on its own seeded RNG stream, so the caller's stream is untouched."""
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(settings.seed)
        fooled = []
        for s in range(0, x.shape[0], settings.batch_size):
            xb, yb = x[s : s + settings.batch_size], y[s : s + settings.batch_size]
            x_adv = pgd(model, xb, yb, eps, settings.pgd_steps, None, norm)
            fooled.append(_predict(model, x_adv, settings.batch_size).argmax(1) != yb)
    return torch.cat(fooled) if fooled else torch.zeros(0, dtype=torch.bool)


def _attack_settings(name: str, norm: str, eps: float, settings: SuiteSettings) -> dict[str, Any]:
    """The settings an attack of a suite records in the manifest."""
    if name in ("apgd-ce", "apgd-t"):
        return _apgd_config("ce" if name == "apgd-ce" else "dlr-targeted", norm, settings).to_dict()
    if name == "square":
        return {"n_queries": settings.square_queries, "p_init": P_INIT, "norm": norm, "seed": settings.seed,
                "restarts": 1, "loss": "margin", "black_box": True}
    return {"loss": "ce", "norm": norm, "steps": settings.pgd_steps,
            "step_size": default_step_size(eps, settings.pgd_steps), "random_start": True, "seed": settings.seed,
            "purpose": PGD20_PURPOSE}


def _attack_fooled(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                   settings: SuiteSettings) -> torch.Tensor:
    """Run one attack of a suite on (x, y); return which points it fooled."""
    if name in ("apgd-ce", "apgd-t"):
        run = apgd if name == "apgd-ce" else apgd_targeted
        loss = "ce" if name == "apgd-ce" else "dlr-targeted"
        return run(model, x, y, eps, _apgd_config(loss, norm, settings)).success
    if name == "square":
        result = square_attack(torch_predict_fn(model, settings.batch_size), x.cpu().numpy(), y.cpu().numpy(), eps,
                               settings.square_queries, P_INIT, settings.seed, norm=norm)
        return torch.from_numpy(result.success).to(x.device)
    return _pgd_fooled(model, x, y, eps, norm, settings)


def suite_attacks(suite: str, settings: SuiteSettings) -> list[str]:
    """The attacks a suite runs, in order (Square only with a positive query budget)."""
    check_suite(suite)
    if suite == "pgd20":
        return ["pgd20"]
    return ["apgd-ce", "apgd-t"] + (["square"] if suite == "aa" and settings.square_queries > 0 else [])


def _check_inputs(images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str) -> None:
    check_eps(eps)
    if norm not in NORMS:
        raise CstarError(f"unknown norm '{norm}'", f"use one of: {', '.join(NORMS)}")
    if images.shape[0] != labels.shape[0]:
        raise CstarError(f"{images.shape[0]} images but {labels.shape[0]} labels", "pass one label per image")


def evaluate_suite(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str = "linf",
                   suite: str = "aa", settings: SuiteSettings | None = None,
                   compare_pgd20: bool = False) -> SuiteResult:
    """Clean accuracy and the per-example worst case over `suite` at `eps` (fractions in [0,1]).

    Each attack sees only the points still robust. `compare_pgd20` also runs PGD-20 on every point
    (not part of the worst case) and warns when it reads more than 5 points above the suite.
    """
    check_suite(suite)
    _check_inputs(images, labels, eps, norm)
    settings = settings or suite_settings(suite)
    device = _model_device(model)
    x, y = images.detach().float().to(device), labels.detach().long().to(device)
    robust = _predict(model, x, settings.batch_size).argmax(1) == y if x.shape[0] else torch.zeros(0, dtype=torch.bool)
    result = SuiteResult(suite, float(eps), norm, _fraction(robust),
                         np.zeros(0, dtype=bool))
    if _randomized(model, x):
        result.warnings.append("the model is randomized (two forward passes on the same inputs differ): gradient "
                               "attacks without EOT overstate its robustness; evaluate it in eval mode without noise")
    for name in suite_attacks(suite, settings):
        todo = torch.nonzero(robust).flatten()
        started = time.monotonic()
        fooled = torch.zeros(todo.numel(), dtype=torch.bool, device=device)
        if todo.numel() and eps > 0:
            fooled = _attack_fooled(name, model, x[todo], y[todo], eps, norm, settings)
        robust[todo[fooled]] = False
        result.attacks.append(AttackRecord(name, _attack_settings(name, norm, eps, settings),
                                           _fraction(robust),
                                           int(fooled.sum()), time.monotonic() - started))
    result.robust = robust.cpu().numpy()
    _diagnose(result, model, x, y, eps, norm, settings, compare_pgd20)
    return result


def _diagnose(result: SuiteResult, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
              settings: SuiteSettings, compare_pgd20: bool) -> None:
    """AutoAttack's checks: black-box beating white-box, PGD-20 far above the suite."""
    square = next((a for a in result.attacks if a.name == "square"), None)
    if square is not None and square.fooled > SQUARE_GAIN_WARN * result.n:
        result.warnings.append(f"Square (black-box) fooled {square.fooled} point(s) the white-box attacks left "
                               f"robust ({100 * square.fooled / result.n:.1f} points): a sign of gradient masking; "
                               "trust the worst case, not the white-box numbers")
    if compare_pgd20 and result.suite != "pgd20" and result.n:
        correct = _predict(model, x, settings.batch_size).argmax(1) == y
        if eps > 0:
            correct &= ~_pgd_fooled(model, x, y, eps, norm, replace(settings, pgd_steps=20))
        result.pgd20_robust_acc = _fraction(correct)
        above = pgd20_above_warning(result.suite, result.robust_acc, result.pgd20_robust_acc)
        if above is not None:
            result.warnings.append(above)


def suite_summary(result: SuiteResult) -> str:
    """One line for logs: suite, worst case and each attack's accuracy."""
    steps = ", ".join(f"{a.name} {100 * a.robust_acc:.1f}%" for a in result.attacks)
    return f"{result.suite} worst case {100 * result.robust_acc:.1f}% ({steps}; clean {100 * result.clean_acc:.1f}%)"


def settings_dict(settings: SuiteSettings) -> dict[str, Any]:
    """SuiteSettings as a plain dict (for configs)."""
    return asdict(settings)


def transfer_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, ce: APGDConfig,
                      targeted: APGDConfig) -> dict[str, torch.Tensor]:
    """The suite's white-box examples to replay elsewhere (a runtime, an INT8 model): APGD-CE on every
    point; APGD-T on the points APGD-CE left correct, the others carrying APGD-CE's example (already
    adversarial on `model`). Per example, the worst over both is the suite's white-box worst case."""
    first = apgd(model, x, y, eps, ce)
    second = first.x_adv.clone()
    todo = ~first.success
    if bool(todo.any()):
        second[todo] = apgd_targeted(model, x[todo], y[todo], eps, targeted).x_adv
    return {"apgd_ce": first.x_adv.detach(), "apgd_t": second.detach()}
