"""Structure-only compression: the layer shapes each method gives a model under a budget, before any training.

One path, keyed like the method registry (cstar.compress.methods), for everything that needs a compressed
structure without training: the baselines of the compress stage (uniform low-rank and pruning fine-tune this
structure), the benchmarks (latency_budget, cross_runtime) and the profile fit's allocated references. CSTAR's
structure is its global rank allocation factorized at once (the compress stage reaches the same ranks
through ADMM first). Importing it needs no torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cstar.errors import CstarError


@dataclass
class Structure:
    """A compressed model (untrained) with the allocation and/or pruning step that made it."""

    model: Any
    allocation: Any | None = None  # cstar.ranks.Allocation: the ranks (cstar, lowrank-uniform, hybrid's CSTAR step)
    pruned: Any | None = None  # cstar.baselines.PruneResult: the kept channels (prune, hybrid's pruning step)
    stage: Any | None = None  # cstar.hybrid.PruneStage: the split of the budget (hybrid only)

    def ranks(self, dense: Any) -> dict[str, dict[str, Any]]:
        """The manifest's per-layer rank map against `dense` (pruned channels included where pruned)."""
        if self.pruned is not None:
            from cstar.baselines import pruned_rank_map

            return pruned_rank_map(dense, self.model)
        from cstar.admm import rank_map

        return rank_map(self.model)


def _allocated(model: Any, budget: Any, sweeps: int, uniform: bool) -> Structure:
    from cstar.admm import allocate_for, factorize_model

    allocation = allocate_for(model, budget, uniform=uniform)
    return Structure(factorize_model(model, allocation.ranks, sweeps), allocation=allocation)


def _cstar_structure(model: Any, budget: Any, share: float, sweeps: int) -> Structure:
    """Global rank allocation under the budget, Tucker-2 / SVD at those ranks."""
    return _allocated(model, budget, sweeps, uniform=False)


def _lowrank_uniform_structure(model: Any, budget: Any, share: float, sweeps: int) -> Structure:
    """The same rank fraction in every layer, reaching the budget."""
    return _allocated(model, budget, sweeps, uniform=True)


def _prune_structure(model: Any, budget: Any, share: float, sweeps: int) -> Structure:
    """Robust channel pruning to the budget (on the latency table's width grid for a latency budget)."""
    from cstar.hybrid import prune_for_budget

    pruned = prune_for_budget(model, budget)
    return Structure(pruned.model, pruned=pruned)


def _hybrid_structure(model: Any, budget: Any, share: float, sweeps: int) -> Structure:
    """Pruning to ratio**share, then the rank allocation on the pruned model to the full ratio."""
    from cstar.hybrid import hybrid_compress

    result = hybrid_compress(model, budget, share, sweeps=sweeps)
    return Structure(result.model, allocation=result.allocation, pruned=result.stage.pruned, stage=result.stage)


StructureFn = Callable[[Any, Any, float, int], Structure]
# Keyed like cstar.compress.methods.COMPRESSION_METHODS (a test checks they agree).
STRUCTURES: dict[str, StructureFn] = {
    "cstar": _cstar_structure,
    "prune": _prune_structure,
    "lowrank-uniform": _lowrank_uniform_structure,
    "hybrid": _hybrid_structure,
}


def compress_structure(model: Any, budget: Any, method: str, *, share: float = 0.5, sweeps: int = 2) -> Structure:
    """`model` compressed by `method` to `budget` (a cstar.admm.Budget), structure only (no training).

    `share` is hybrid's pruning share of the log-ratio; `sweeps` the HOOI sweeps of the factorization
    (0: truncated HOSVD, enough where only the shapes matter). Raises UnreachableBudget (with the best
    reachable ratio) when the budget cannot be met."""
    try:
        build = STRUCTURES[method]
    except KeyError:
        raise CstarError(f"unknown compression method '{method}'", f"use one of: {', '.join(STRUCTURES)}") from None
    return build(model, budget, share, sweeps)
