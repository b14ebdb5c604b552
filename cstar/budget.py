"""The "by" dispatchers of a compression budget: params, FLOPs (cstar.flops) or latency (cstar.latency).

They sit above both the allocator (cstar.ranks) and the latency model (cstar.latency), so neither has
to import the other lazily: ranks <- latency <- budget, one way.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from cstar.errors import CstarError
from cstar.flops import count_flops, count_params
from cstar.latency import latency_cost_model, latency_limits, reference_latency_ms
from cstar.ranks import CostModel, Limit, analytic_cost_model


def model_cost(model: nn.Module, input_shape: tuple[int, ...], by: str, table: Any = None, batch: int = 1) -> float:
    """Params or MACs of the whole model as cstar.flops counts them, or its latency by `table`: measured for the
    table's own dense model, predicted for any other (cstar.latency.reference_latency_ms)."""
    if by == "latency":
        if table is None:
            raise CstarError("a latency budget needs a latency table", "pass --latency-table TABLE (cstar profile)")
        return reference_latency_ms(model, table, batch)
    return count_params(model) if by == "params" else count_flops(model, input_shape)


def cost_model_for(by: str, table: Any = None, batch: int = 1) -> CostModel:
    """The layer cost model of budget `by`: exact params/MACs, or latency from `table` at `batch`."""
    if by == "latency" and table is not None:
        return latency_cost_model(table, batch)
    return analytic_cost_model(by)


def budget_limits(model: nn.Module, input_shape: tuple[int, ...], by: str, table: Any = None,
                  batches: tuple[int, ...] = (1,)) -> tuple[Limit, tuple[Limit, ...]]:
    """((cost model, dense total, reference) of the budget, the further budgets it must also meet). params/MACs:
    the reference is the total; latency: the measured dense latency when `model` is the table's dense model
    (cstar.latency.reference_latency_ms), one budget per batch size, each layer in the form fastest at the first."""
    if by != "latency" or table is None:
        total = model_cost(model, input_shape, by, table, batches[0])
        return (cost_model_for(by, table, batches[0]), total, total), ()
    budgets = latency_limits(model, table, batches)
    return budgets[0], budgets[1:]
