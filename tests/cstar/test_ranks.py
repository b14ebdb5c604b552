"""Global rank allocation: budget, preference for slowly decaying spectra, impossible ratios."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar.errors import CstarError
from cstar.ranks import (
    LayerBudget,
    allocate,
    candidate_layers,
    first_and_last,
    layer_budgets,
    uniform_allocation,
)


def _spectrum(n: int, decay: float) -> torch.Tensor:
    values = torch.tensor([decay**k for k in range(n)], dtype=torch.float64)
    return values / values.sum()


def _layer(name: str, decay: float, channels: int = 32) -> LayerBudget:
    return LayerBudget(name, channels, channels, 9, False, False, 64, 64,
                       (_spectrum(channels, decay), _spectrum(channels, decay)))


def _max_step_cost(layers: list[LayerBudget], allocation, by: str) -> int:
    worst = 0
    for layer in layers:
        ranks = allocation.ranks[layer.name]
        if ranks is None:
            continue
        for mode in range(len(ranks)):
            bigger = tuple(r + 1 if m == mode else r for m, r in enumerate(ranks))
            worst = max(worst, min(layer.cost(bigger, by), layer.dense_cost(by)) - layer.cost(ranks, by))
    return worst


@pytest.mark.parametrize("objective", ["log", "linear"])
@pytest.mark.parametrize("by", ["params", "flops"])
@pytest.mark.parametrize("ratio", [3.0, 8.0])
def test_budget_met_within_one_rank_step(by: str, ratio: float, objective: str) -> None:
    layers = [_layer("fast", 0.5), _layer("slow", 0.95), _layer("mid", 0.8, 16)]
    dense_total = sum(layer.dense_cost(by) for layer in layers) + 500
    allocation = allocate(layers, dense_total, ratio, by, objective=objective)
    assert allocation.total_cost <= dense_total / ratio
    assert dense_total / ratio - allocation.total_cost <= _max_step_cost(layers, allocation, by)
    assert allocation.ratio >= ratio


@pytest.mark.parametrize("objective", ["log", "linear"])
def test_slower_decay_gets_more_rank(objective: str) -> None:
    layers = [_layer("fast", 0.6), _layer("slow", 0.97)]
    dense_total = sum(layer.dense_cost("params") for layer in layers)
    allocation = allocate(layers, dense_total, 6.0, "params", objective=objective)
    fast, slow = allocation.ranks["fast"], allocation.ranks["slow"]
    assert fast is not None and slow is not None
    assert sum(slow) > sum(fast)


def test_impossible_ratio_names_best_achievable() -> None:
    layers = [_layer("a", 0.9)]
    dense_total = layers[0].dense_cost("params") + 1000
    with pytest.raises(CstarError, match=r"at most \d+\.\d+x"):
        allocate(layers, dense_total, 1000.0, "params")
    with pytest.raises(CstarError):
        uniform_allocation(layers, dense_total, 1000.0, "params")


def test_layer_stays_dense_when_factorizing_does_not_pay() -> None:
    tiny = LayerBudget("tiny", 2, 3, 1, False, False, 4, 4, (_spectrum(2, 0.5), _spectrum(3, 0.5)))
    big = _layer("big", 0.9)
    total = tiny.dense_cost("params") + big.dense_cost("params")
    allocation = allocate([tiny, big], total, 4.0, "params")
    assert allocation.ranks["tiny"] is None
    assert allocation.ranks["big"] is not None


def test_budgets_from_model_match_counted_cost() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Conv2d(32, 32, 1), nn.Flatten(), nn.Linear(32 * 16, 10))
    keep = first_and_last(model)
    assert keep == ("0", "6")
    budgets = layer_budgets(model, (3, 8, 8), candidate_layers(model, keep))
    assert [b.name for b in budgets] == ["2", "4"]
    assert budgets[0].in_positions == 64 and budgets[0].out_positions == 16
    assert budgets[0].cost((16, 32), "flops") > budgets[0].dense_cost("flops")


@pytest.mark.parametrize("step", [4, 8])
@pytest.mark.parametrize("by", ["params", "flops"])
def test_rank_step_gives_true_multiples(step: int, by: str) -> None:
    layers = [_layer("fast", 0.5, 36), _layer("slow", 0.95, 36), _layer("mid", 0.8, 20)]
    dense_total = sum(layer.dense_cost(by) for layer in layers) + 500
    allocation = allocate(layers, dense_total, 4.0, by, step=step)
    assert allocation.total_cost <= dense_total / 4.0
    ranks = [r for layer_ranks in allocation.ranks.values() if layer_ranks for r in layer_ranks]
    assert ranks, "at 4x some layer must be factorized"
    full = {36, 20}
    assert all(r % step == 0 or r in full for r in ranks), ranks


def test_rank_step_too_coarse_for_ratio_names_the_step() -> None:
    layers = [_layer("a", 0.9, 16), _layer("b", 0.9, 16)]
    dense_total = sum(layer.dense_cost("params") for layer in layers)
    with pytest.raises(CstarError, match="rank-step 8"):
        allocate(layers, dense_total, 10.0, "params", step=8)
    with pytest.raises(CstarError, match="rank step must be >= 1"):
        allocate(layers, dense_total, 2.0, "params", step=0)


def test_compression_methods_registry_matches_cli_choices() -> None:
    from cstar.compress import COMPRESSION_METHODS, METHODS, compression_method

    assert tuple(COMPRESSION_METHODS) == METHODS
    assert compression_method("prune") is COMPRESSION_METHODS["prune"]
    with pytest.raises(CstarError, match="unknown compression method 'svd'") as info:
        compression_method("svd")
    assert "lowrank-uniform" in (info.value.hint or "")
