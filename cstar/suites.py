"""The named attack suites (aa, apgd, pgd20) and their standard settings: torch-free, so the CLI can
offer and check a suite without importing torch. The attacks themselves run in cstar.robust_eval."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from cstar.errors import CstarError

SUITES = ("aa", "apgd", "pgd20")
PGD20_PURPOSE = "training-time validation (PGD-20 overstates robustness; report aa or apgd)"
PGD_GAP_WARN = 0.05
SQUARE_GAIN_WARN = 0.002  # AutoAttack's check_square_sr: Square lowering robust accuracy by more than 0.2 points


@dataclass
class SuiteSettings:
    """The knobs of a suite; `suite_settings` gives each suite's standard values, tests shrink them."""

    n_iter: int = 100
    n_targets: int = 9
    n_restarts: int = 1
    square_queries: int = 5000
    pgd_steps: int = 20
    seed: int = 0
    batch_size: int = 500


_STANDARD = {
    "aa": SuiteSettings(),
    "apgd": SuiteSettings(n_targets=3, square_queries=0),
    "pgd20": SuiteSettings(),
}


def check_suite(suite: str) -> None:
    """A suite name must be one of SUITES."""
    if suite not in SUITES:
        raise CstarError(f"unknown evaluation suite '{suite}'",
                         f"use one of: {', '.join(SUITES)} (aa: the standard AutoAttack set; apgd: a CPU-sized "
                         "APGD-CE + APGD-T run; pgd20: training-time validation only)")


def suite_settings(suite: str, **overrides: Any) -> SuiteSettings:
    """The standard settings of `suite`, with `overrides` (e.g. n_iter=10 for quick tests)."""
    check_suite(suite)
    return replace(_STANDARD[suite], **overrides)


PGD20_ABOVE_PREFIX = "PGD-20 reads"


def pgd20_above_warning(suite: str, robust_acc: float, pgd20: float) -> str | None:
    """AutoAttack-style check: PGD-20 more than PGD_GAP_WARN above the suite's worst case."""
    gap = pgd20 - robust_acc
    if gap <= PGD_GAP_WARN:
        return None
    return (f"{PGD20_ABOVE_PREFIX} {100 * gap:.1f} points above the {suite} suite ({100 * pgd20:.1f}% vs "
            f"{100 * robust_acc:.1f}%): PGD-20 numbers overstate this model's robustness")
