"""Test metrics of a stage (`cstar train`, `cstar compress`): clean accuracy and the suite's worst case.

One source for the `metrics` block that train and compress write (design.md): `robust_acc` is the
per-example worst case over the named suite (cstar.robust_eval), `attack` records the suite, each
attack's settings and accuracy, the diagnostics, and PGD-20 beside it (`pgd20_robust_acc`, never the
headline). Under torchrun every rank evaluates every W-th image and the counts are summed, so all
ranks return the numbers of the whole set.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from cstar import validate
from cstar.errors import CstarError
from cstar.suites import (
    PGD20_ABOVE_PREFIX,
    PGD_GAP_WARN,
    SUITES,
    SuiteSettings,
    check_suite,
    pgd20_above_warning,
    suite_settings,
)

if TYPE_CHECKING:  # torch only where metrics are computed: the CLI parser stays torch-free
    import torch
    from torch import nn

    from cstar.robust_eval import SuiteResult

DEFAULT_SUITE = "aa"


@dataclass(frozen=True)
class EvalSpec:
    """Which suite a stage reports and how hard it runs: `steps` overrides the gradient attacks'
    iterations (APGD's 100, PGD's 20), `queries` Square's 5,000; both recorded in the manifest."""

    suite: str = DEFAULT_SUITE
    steps: int | None = None
    queries: int | None = None
    compare_pgd20: bool = True
    seed: int = 0

    def check(self) -> None:
        check_suite(self.suite)
        if self.steps is not None:
            validate.count("--eval-steps", self.steps, minimum=1)
        if self.queries is not None:
            validate.count("--eval-queries", self.queries, minimum=0)

    def settings(self) -> SuiteSettings:
        """The suite's SuiteSettings with this spec's overrides."""
        overrides: dict[str, Any] = {"seed": self.seed}
        if self.steps is not None:
            overrides.update(n_iter=self.steps, pgd_steps=self.steps)
        if self.queries is not None:
            overrides["square_queries"] = self.queries
        return suite_settings(self.suite, **overrides)

    def label(self) -> str:
        """Short name for logs: 'aa', 'apgd (10 iterations)', 'pgd20 (2 steps)'."""
        if self.steps is None:
            return self.suite
        return f"{self.suite} ({self.steps} {'steps' if self.suite == 'pgd20' else 'iterations'})"


def add_eval_arguments(parser: argparse.ArgumentParser, default_suite: str = DEFAULT_SUITE) -> None:
    """--eval-suite / --eval-steps / --eval-queries, shared by train and compress."""
    parser.add_argument("--eval-suite", default=default_suite, choices=SUITES,
                        help="attack suite of the test metrics: aa (APGD-CE, APGD-T, Square; the standard), "
                             "apgd (APGD-CE + APGD-T, CPU-sized), pgd20 (training-time validation only)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="iterations of the suite's gradient attacks (default: the suite's, APGD 100, PGD 20)")
    parser.add_argument("--eval-queries", type=int, default=None,
                        help="Square's query budget in the aa suite (default 5000)")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="evaluate on a stratified subset of this many test images (default: the whole split)")


def test_tensors(bundle: Any, limit: int | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The test images a stage evaluates: the whole split, or a class-stratified subset of `limit`."""
    from cstar.data import stratified_indices, to_tensors

    if limit is None:
        return to_tensors(bundle.test)
    validate.count("--eval-limit", limit, minimum=1)
    return to_tensors(bundle.test, stratified_indices(bundle.labels("test"), limit, seed))


def spec_from_args(args: argparse.Namespace, seed: int = 0) -> EvalSpec:
    """The EvalSpec the CLI arguments ask for (checked)."""
    spec = EvalSpec(getattr(args, "eval_suite", DEFAULT_SUITE), getattr(args, "eval_steps", None),
                    getattr(args, "eval_queries", None), seed=seed)
    spec.check()
    return spec


def _shard(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from cstar import distributed as dist

    if not dist.is_active():
        return images, labels
    return images[dist.rank() :: dist.world_size()], labels[dist.rank() :: dist.world_size()]


def _counts(result: SuiteResult) -> list[float]:
    """What ranks sum: clean, worst-case robust, each attack's cumulative robust, PGD-20 robust."""
    n = result.n
    per_attack = [round(a.robust_acc * n) for a in result.attacks]
    pgd = round((result.pgd20_robust_acc or 0.0) * n)
    return [round(result.clean_acc * n), int(result.robust.sum()), *per_attack, pgd]


def stage_metrics(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float, norm: str,
                  spec: EvalSpec) -> dict[str, Any]:
    """`metrics` of a stage manifest: clean_acc, robust_acc (suite worst case), n, attack, pgd20_robust_acc."""
    from cstar import distributed as dist
    from cstar.robust_eval import evaluate_suite

    if images.shape[0] == 0:
        raise CstarError("no test images to evaluate", "check the dataset's test split (or --eval-limit)")
    model = dist.unwrap(model)
    x, y = _shard(images, labels)
    compare = spec.compare_pgd20 and spec.suite != "pgd20"
    result = evaluate_suite(model, x, y, eps, norm, spec.suite, spec.settings(), compare_pgd20=compare)
    n = int(images.shape[0])
    counts = _counts(result)
    if dist.is_active():
        counts = [int(round(v)) for v in dist.sum_across_ranks(counts)]
    clean, robust, *per_attack, pgd = counts
    attacks = [replace(a, robust_acc=c / n) for a, c in zip(result.attacks, per_attack, strict=True)]
    total = replace(result, attacks=attacks, pgd20_robust_acc=(pgd / n if compare else None))
    block = total.to_manifest()
    block.update(n=n, iterations_overridden=spec.steps is not None)
    block["warnings"] = _warnings(result.warnings, robust / n, total.pgd20_robust_acc, spec.suite)
    metrics: dict[str, Any] = {"clean_acc": clean / n, "robust_acc": robust / n, "n": n, "attack": block}
    if compare:
        metrics["pgd20_robust_acc"] = pgd / n
    return metrics


def _warnings(local: list[str], robust_acc: float, pgd20: float | None, suite: str) -> list[str]:
    """The rank's own diagnostics, with the PGD-20 gap re-judged on the whole set's numbers."""
    kept = [w for w in local if not w.startswith(PGD20_ABOVE_PREFIX)]
    above = None if pgd20 is None else pgd20_above_warning(suite, robust_acc, pgd20)
    if above is not None:
        kept.append(above)
    if pgd20 is not None and robust_acc - pgd20 > PGD_GAP_WARN:
        kept.append(f"PGD-20 fooled more than the {suite} suite ({100 * pgd20:.1f}% vs {100 * robust_acc:.1f}% robust): "
                    "the suite ran too few iterations (--eval-steps) to be trusted")
    return kept


def metrics_summary(metrics: dict[str, Any]) -> str:
    """'clean 0.93, aa robust 0.38 (PGD-20 0.52)' for a stage's one-line summary."""
    attack = metrics.get("attack", {})
    text = f"clean {metrics['clean_acc']:.3f}, {attack.get('suite', '?')} robust {metrics['robust_acc']:.3f}"
    if "pgd20_robust_acc" in metrics:
        text += f" (PGD-20 {metrics['pgd20_robust_acc']:.3f})"
    return text
