"""Hybrid compression (issue 15): robust channel pruning first, then CSTAR Tucker-2 on what remains.

Why: Tucker-2 never narrows the activations between layers (its 1x1 factors read and write the full
width; ReLU, Add and the stem run at full width), so on small spatial sizes its measured speed stalls
while pruning keeps narrowing. Pruning alone, on the other hand, removes whole channels from every
layer alike. The hybrid spends ONE global budget in two steps, both measured against the DENSE model:

    prune ratio  p = ratio ** share          (share of the log-ratio, `--hybrid-prune-share`, default 0.5)
    prune        cost(pruned) <= cost(dense) / p           (cstar.baselines.prune_to_budget)
    CSTAR        cost(final)  <= cost(dense) / ratio       (allocation on the pruned model at the residual
                                                             ratio cost(pruned) / (cost(dense) / ratio))

`cost` is one function of a model (params, MACs, or a predicted latency), so the same code serves
every budget. A latency budget at several batch sizes takes the tightest batch's share (budget_cost);
the residual ratio then holds at every batch (at the others with room to spare). The layers CSTAR keeps dense (stem and classifier unless --compress-ends) are kept whole
by both steps. `hybrid_compress` is the structural part alone (no training); `cstar compress --method
hybrid` runs the pruning, then CSTAR's ADMM on the pruned model, then the shared fine-tuning.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn

from cstar.admm import Budget, allocate_for, factorize_model
from cstar.baselines import CostFn, PruneResult, WidthOptions, prune_to_budget
from cstar.budget import model_cost
from cstar.errors import CstarError, UnreachableBudget
from cstar.ranks import Allocation


def budget_cost(budget: Budget, reference: nn.Module | None = None) -> CostFn:
    """The budget's cost of a whole model (what the ratio divides): params, MACs or predicted latency.

    Latency is the latency table's prediction at the budget's batch (cstar.latency), so pruned and
    factorized models are priced by the same measured table; the dense model itself costs its measured latency
    (cstar.latency.reference_latency_ms), so a ratio divides what the runtime measured. A budget at several batch sizes costs a model
    its largest latency as a fraction of `reference`'s (the dense model) at the same batch, in the reference's
    headline ms: cost(m) <= cost(reference) / ratio holds exactly when it holds at every batch.
    """
    batches = budget.latency_batches
    if budget.by != "latency" or len(batches) < 2:
        return lambda model: float(model_cost(model, budget.input_shape, budget.by, budget.latency_table,
                                              batches[0]))
    if reference is None:
        raise CstarError("internal error: a latency budget at several batch sizes needs the dense reference model",
                         "pass reference= to budget_cost")
    from cstar.latency import reference_latency_ms

    table, headline = budget.latency_table, batches[0]
    scale = {b: reference_latency_ms(reference, table, b, headline) for b in batches}

    def cost(model: nn.Module) -> float:
        shares = [reference_latency_ms(model, table, b, headline) / scale[b] for b in batches]
        return max(shares) * scale[headline]

    return cost


def budget_widths(budget: Budget) -> WidthOptions | None:
    """The channel counts pruning may keep under `budget`: a latency table's measured grid (a width off it is
    interpolated, and often off the runtime's fast kernel path), any count for params/MACs."""
    if budget.by != "latency" or budget.latency_table is None:
        return None
    from cstar.latency import table_widths

    return table_widths(budget.latency_table)


def prune_for_budget(model: nn.Module, budget: Budget, ratio: float | None = None,
                     cost: CostFn | None = None) -> PruneResult:
    """Channel pruning to `ratio` (default the budget's) of the budget's cost, on the budget's width grid."""
    return prune_to_budget(model, budget.input_shape, budget.ratio if ratio is None else ratio, budget.by,
                           keep_dense=budget.keep_dense,
                           cost=cost if cost is not None else budget_cost(budget, model),
                           widths=budget_widths(budget))


def prune_ratio(ratio: float, share: float) -> float:
    """The pruning step's ratio against the dense model: `share` of the log-ratio (0.5 -> sqrt(ratio))."""
    if not 0.0 < share < 1.0:
        raise CstarError(f"--hybrid-prune-share must be in (0, 1), got {share}",
                         "pass e.g. --hybrid-prune-share 0.5 (use --method prune or cstar for the ends)")
    return float(ratio**share)


@dataclass
class PruneStage:
    """The pruning step: its result, its ratio and the budget left for CSTAR on the pruned model."""

    pruned: PruneResult
    prune_ratio: float  # achieved, dense cost / pruned cost
    residual: Budget  # ratio relative to the pruned model, so that its target is cost(dense) / ratio


def prune_stage(model: nn.Module, budget: Budget, share: float, cost: CostFn | None = None) -> PruneStage:
    """Prune `model` to ratio ** share of the budget; the residual CSTAR budget reaches the full ratio."""
    measure = cost if cost is not None else budget_cost(budget, model)
    dense_cost = measure(model)
    pruned = prune_for_budget(model, budget, prune_ratio(budget.ratio, share), measure)
    pruned_cost = measure(pruned.model)
    residual = max(1.0, budget.ratio * pruned_cost / dense_cost)
    return PruneStage(pruned, dense_cost / pruned_cost, dataclasses.replace(budget, ratio=residual))


def residual_error(stage: PruneStage, ratio: float, error: CstarError) -> CstarError:
    """The allocator's error on the pruned model, restated against the dense model (its best reachable ratio
    too: the pruning's times the best the allocator reaches on the pruned model)."""
    message = (f"hybrid: after pruning {stage.prune_ratio:.2f}x, Tucker-2 cannot reach the remaining "
               f"{stage.residual.ratio:.2f}x (total {ratio:g}x): {error.message}")
    hint = "pass a larger --hybrid-prune-share (prune more), or a smaller --ratio"
    if isinstance(error, UnreachableBudget):
        return UnreachableBudget(message, hint, stage.prune_ratio * error.best_ratio)
    return CstarError(message, hint)


@dataclass
class HybridResult:
    """The pruned-then-factorized model, the pruning step and the rank allocation on the pruned model."""

    model: nn.Module
    stage: PruneStage
    allocation: Allocation


def hybrid_compress(model: nn.Module, budget: Budget, share: float = 0.5, cost: CostFn | None = None,
                    sweeps: int = 2) -> HybridResult:
    """Structural hybrid compression (no training): prune, allocate ranks on the pruned model, factorize."""
    stage = prune_stage(model, budget, share, cost)
    try:
        allocation = allocate_for(stage.pruned.model, stage.residual)
    except CstarError as error:
        raise residual_error(stage, budget.ratio, error) from None
    return HybridResult(factorize_model(stage.pruned.model, allocation.ranks, sweeps), stage, allocation)


def stage_summary(stage: PruneStage, share: float) -> dict[str, object]:
    """Manifest `hybrid` entry: the split of the budget between pruning and CSTAR."""
    return {"prune_share": share, "prune_ratio": stage.prune_ratio, "cstar_ratio": stage.residual.ratio}
