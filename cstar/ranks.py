"""Global rank allocation: one params, FLOPs or latency budget shared by every factorizable layer.

Each candidate layer l has normalized mode spectra e_l,m(k) = s_k^2 / sum_j s_j^2 of its channel-mode
unfoldings (m = out, in; a single spectrum for Linear). Keeping ranks (r_out, r_in) retains the
energy proxy
    E_l(r_out, r_in) = (sum_{k<r_out} e_l,out(k)) * (sum_{k<r_in} e_l,in(k))      (1 = exact)
Starting from the smallest rank on the grid everywhere (1, or `step` with a rank step: ranks are
then multiples of `step` or a full dimension), the allocator repeatedly takes the single move (one rank step on
one mode of one layer, or "keep this layer dense" once factorizing would cost as much as the
dense layer) with the best marginal objective per marginal cost that still fits the budget.
The objective is sum_l log E_l by default ("log": errors compound through depth, and it refuses
to starve any layer to a near-zero-energy rank-1 bottleneck) or sum_l E_l ("linear": plain
normalized energy). Energies are normalized per layer, so every layer is weighed equally whatever
its size; cost is exact (it matches `cstar.flops` on the built model). A layer whose rank-1 form is
not cheaper than the dense layer stays dense. The greedy rule and objective are our choices (the
paper allocates ranks globally; see docs/method.md).

What a layer costs is ONE pluggable function (`CostModel.layer_cost(layer, ranks or None=dense)`):
exact params or MACs (`analytic_cost_model`), or the latency a `cstar profile` table predicts on the
target runtime (`cstar.latency.latency_cost_model`: the fastest deploy form of the factorized layer).
Latency is not monotone in rank (SIMD widths: a conv with 117 channels can be slower than one with
128), so a latency cost model also gives each layer's rank grid (the table's measured channel counts):
ranks then move from grid point to grid point (those on the --rank-step grid), and each layer starts
at its cheapest grid ranks rather than the smallest ones.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from cstar.errors import CstarError, UnreachableBudget
from cstar.flops import probe_forward
from cstar.tucker import singular_values, unfold

Ranks = tuple[int, ...]
ANALYTIC_BUDGETS = ("params", "flops")
BUDGETS = (*ANALYTIC_BUDGETS, "latency")


@dataclass
class LayerBudget:
    """What the allocator knows about one candidate layer: geometry, cost model and spectra."""

    name: str
    out_channels: int
    in_channels: int
    kernel: int  # kh * kw (1 for Linear)
    linear: bool
    bias: bool
    in_positions: int = 1  # H_in * W_in (1 for Linear)
    out_positions: int = 1  # H_out * W_out
    spectra: tuple[torch.Tensor, ...] = ()  # normalized squared singular values per mode, descending

    @property
    def full_ranks(self) -> Ranks:
        if self.linear:
            return (min(self.out_channels, self.in_channels),)
        return (self.out_channels, self.in_channels)

    @property
    def shape(self) -> list[int]:
        return [self.out_channels, self.in_channels] + ([] if self.linear else [self.kernel])

    def dense_cost(self, by: str) -> int:
        macs = self.out_channels * self.in_channels * self.kernel
        if by == "params":
            return macs + (self.out_channels if self.bias else 0)
        return macs * self.out_positions

    def cost(self, ranks: Ranks, by: str) -> int:
        """Exact params or MACs of the factorized layer at `ranks` (LowRankConv2d / LowRankLinear)."""
        o, i, k = self.out_channels, self.in_channels, self.kernel
        if self.linear:
            (r,) = ranks
            return r * (o + i) + (o if self.bias and by == "params" else 0)
        r_out, r_in = ranks
        if by == "params":
            return i * r_in + r_in * r_out * k + r_out * o + (o if self.bias else 0)
        return self.in_positions * i * r_in + self.out_positions * (r_in * k * r_out + r_out * o)

    def energy(self, ranks: Ranks) -> float:
        """Retained normalized energy proxy at `ranks`: product of the modes' kept energies (1.0 = exact)."""
        kept = 1.0
        for spec, r in zip(self.spectra, ranks, strict=True):
            kept *= min(1.0, float(spec[:r].sum()))
        return kept

    def score(self, ranks: Ranks | None, objective: str) -> float:
        """Allocator objective of one layer: its energy, or log-energy (dense = 1 / 0)."""
        if ranks is None:
            return 1.0 if objective == "linear" else 0.0
        energy = self.energy(ranks)
        return energy if objective == "linear" else math.log(max(energy, 1e-12))


@dataclass
class Allocation:
    """Result: ranks per layer (None = keep dense), the budget and what it achieves."""

    ranks: dict[str, Ranks | None]
    by: str
    target_cost: float
    total_cost: float  # the whole model after allocation (fixed + candidate layers): params, MACs or ms
    dense_total: float
    energy: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_total / self.total_cost if self.total_cost > 0 else math.inf


LayerCost = Callable[["LayerBudget", "Ranks | None"], float]


@dataclass(frozen=True)
class CostModel:
    """What one candidate layer costs: `layer_cost(layer, ranks)` (ranks None = the dense layer).

    `monotone`: the cost grows with every rank (params, MACs), so the smallest ranks are the cheapest;
    a measured latency is not, and the allocator then starts each layer at its cheapest grid ranks.
    `rank_grid(layer)`: per mode, the ascending ranks the cost is known at (None: every rank).
    """

    by: str
    layer_cost: LayerCost
    monotone: bool = True
    rank_grid: Callable[[LayerBudget], tuple[list[int], ...]] | None = None

    def __call__(self, layer: LayerBudget, ranks: Ranks | None) -> float:
        return self.layer_cost(layer, ranks)


def analytic_cost_model(by: str) -> CostModel:
    """Exact params or MACs of the dense or factorized layer (LayerBudget.dense_cost / .cost)."""
    if by not in ANALYTIC_BUDGETS:
        hint = ("--by latency needs --latency-table TABLE (cstar profile)" if by == "latency"
                else "use --by params or --by flops")
        raise CstarError(f"unknown budget '{by}'" if by != "latency" else "a latency budget needs a latency table",
                         hint)

    def cost(layer: LayerBudget, ranks: Ranks | None) -> float:
        return layer.dense_cost(by) if ranks is None else layer.cost(ranks, by)

    return CostModel(by, cost)


def normalized_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """s_k^2 / sum s^2 (float64); uniform if the matrix is all zeros."""
    energy = singular_values(matrix).pow(2)
    total = float(energy.sum())
    return energy / total if total > 0 else torch.full_like(energy, 1.0 / energy.numel())


def weight_spectra(weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Normalized spectra of the channel-mode unfoldings (conv: out and in modes; linear: the matrix)."""
    w = weight.detach().float().cpu()
    if w.ndim == 2:
        return (normalized_spectrum(w),)
    return normalized_spectrum(unfold(w, 0)), normalized_spectrum(unfold(w, 1))


def candidate_layers(model: nn.Module, keep_dense: tuple[str, ...] = ()) -> list[tuple[str, nn.Module]]:
    """Conv2d (groups=1) and Linear layers that may be factorized, in model order, minus `keep_dense`."""
    found = [
        (name, module)
        for name, module in model.named_modules()
        if (isinstance(module, nn.Conv2d) and module.groups == 1) or isinstance(module, nn.Linear)
    ]
    return [(name, module) for name, module in found if name not in keep_dense]


def first_and_last(model: nn.Module) -> tuple[str, ...]:
    """Names of the first conv/linear layer (the stem) and the last one (the classifier)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return tuple(dict.fromkeys([names[0], names[-1]])) if names else ()


def layer_budgets(
    model: nn.Module, input_shape: tuple[int, ...], layers: list[tuple[str, nn.Module]]
) -> list[LayerBudget]:
    """Geometry (incl. spatial positions from one forward pass) and spectra of each candidate layer."""
    positions: dict[str, tuple[int, int]] = {}

    def hook(name: str) -> Any:
        def record(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                positions[name] = (inputs[0].shape[-1] * inputs[0].shape[-2], output.shape[-1] * output.shape[-2])
            else:
                positions[name] = (1, 1)
        return record

    probe_forward(model, input_shape, [(module, hook(name)) for name, module in layers])
    budgets = []
    for name, module in layers:
        linear = isinstance(module, nn.Linear)
        weight = cast(torch.Tensor, module.weight)
        kernel = 1 if linear else int(weight.shape[2] * weight.shape[3])
        pin, pout = positions.get(name, (1, 1))
        budgets.append(LayerBudget(name, int(weight.shape[0]), int(weight.shape[1]), kernel, linear,
                                   module.bias is not None, pin, pout, weight_spectra(weight)))
    return budgets


Move = tuple["Ranks | None", float, float]  # (new ranks or None=dense, objective gain, cost delta)


# one more budget the allocation must meet: (cost model, dense model's total by it, the total its ratio divides)
Limit = tuple[CostModel, float, float]


class _Costs:
    """Memoized costs of the budget's cost models (a latency lookup interpolates; the greedy asks again and
    again). Several models (a latency budget at several batch sizes) each have a target; `__call__` is the
    cost summed over them as fractions of their targets (one model: its cost / target, same order), which the
    greedy ranks moves by; `vector` is each model's own cost, which every budget is checked on."""

    def __init__(self, cost_model: CostModel, layers: list[LayerBudget], limits: tuple[Limit, ...] = (),
                 reference: float = 1.0, ratio: float = 1.0) -> None:
        self.model = cost_model
        self.models = [cost_model, *(model for model, _, _ in limits)]
        self.targets = [total / ratio for total in (reference, *(ref for _, _, ref in limits))]
        self.by_name = {layer.name: layer for layer in layers}
        self.cache: dict[tuple[str, Ranks | None], tuple[float, ...]] = {}

    def vector(self, layer: LayerBudget, ranks: Ranks | None) -> tuple[float, ...]:
        key = (layer.name, ranks)
        if key not in self.cache:
            self.cache[key] = tuple(float(model(layer, ranks)) for model in self.models)
        return self.cache[key]

    def __call__(self, layer: LayerBudget, ranks: Ranks | None) -> float:
        return sum(c / max(abs(t), 1e-12) for c, t in zip(self.vector(layer, ranks), self.targets, strict=True))

    def totals(self, state: dict[str, Ranks | None], dense_total: float,
               limits: tuple[Limit, ...]) -> tuple[list[float], list[float]]:
        """(fixed costs, totals of `state`) per cost model: fixed = the dense total minus the candidate layers."""
        layers = list(self.by_name.values())
        dense_totals = [dense_total, *(total for _, total, _ in limits)]
        fixed = [total - sum(self.vector(layer, None)[i] for layer in layers) for i, total in enumerate(dense_totals)]
        used = [f + sum(self.vector(self.by_name[n], r)[i] for n, r in state.items()) for i, f in enumerate(fixed)]
        return fixed, used


def _moves(layer: LayerBudget, ranks: Ranks, options: tuple[list[int], ...], objective: str,
           cost: _Costs) -> list[Move]:
    """Candidate moves from `ranks`: one mode to its next allowed rank, or dense; (new, gain, cost delta)."""
    current_cost, current = cost(layer, ranks), layer.score(ranks, objective)
    dense_cost = cost(layer, None)
    dense: Move = (None, layer.score(None, objective) - current, dense_cost - current_cost)
    moves: list[Move] = []
    for mode, allowed in enumerate(options):
        bigger = next((r for r in allowed if r > ranks[mode]), None)
        if bigger is None:
            continue
        new = tuple(bigger if m == mode else r for m, r in enumerate(ranks))
        new_cost = cost(layer, new)
        if new_cost >= dense_cost:
            moves.append(dense)
        else:
            moves.append((new, layer.score(new, objective) - current, new_cost - current_cost))
    if all(r >= f for r, f in zip(ranks, layer.full_ranks, strict=True)):
        moves.append(dense)
    return moves


def next_rank(rank: int, step: int, full: int) -> int:
    """The next rank on the grid {step, 2*step, ...} above `rank`, capped at the full dimension."""
    return min(full, (rank // step + 1) * step)


def start_ranks(layer: LayerBudget, step: int) -> Ranks:
    """Smallest ranks on the grid: `step` per mode (the full dimension where that is smaller)."""
    return tuple(min(step, full) for full in layer.full_ranks)


def rank_options(layer: LayerBudget, step: int, cost_model: CostModel | None = None) -> tuple[list[int], ...]:
    """Per mode, the ascending ranks the allocator may use: multiples of `step` and the full dimension,
    restricted to the cost model's rank grid when it has one (a latency table's measured channel counts)."""
    grid = cost_model.rank_grid(layer) if cost_model is not None and cost_model.rank_grid is not None else None
    options = []
    for mode, full in enumerate(layer.full_ranks):
        if grid is None:
            options.append(sorted({*range(step, full, step), full}))
        else:
            options.append(sorted({r for r in grid[mode] if r < full and r % step == 0} | {full}))
    return tuple(options)


def cheapest_start(layer: LayerBudget, options: tuple[list[int], ...], cost: _Costs) -> Ranks | None:
    """Where the allocator starts a layer: the smallest allowed ranks (monotone cost model), else the cheapest
    allowed ranks (smaller first among equals); None (dense) when even those are not cheaper than dense."""
    if cost.model.monotone or max(len(o) for o in options) > 64:
        candidates: list[Ranks] = [tuple(o[0] for o in options)]
    else:
        candidates = list(itertools.product(*options))
    best = min(candidates, key=lambda ranks: cost(layer, ranks))
    return best if cost(layer, best) < cost(layer, None) else None


def allocate(
    layers: list[LayerBudget], dense_total: float, ratio: float, by: str = "params", step: int = 1,
    objective: str = "log", cost_model: CostModel | None = None, limits: tuple[Limit, ...] = (),
    reference: float | None = None,
) -> Allocation:
    """Greedy global allocation so that fixed + sum(layer costs) <= reference / ratio.

    `dense_total` is the dense model's params, MACs or predicted ms (by `cost_model`, which defaults to
    the exact params/MACs of `by`); everything outside `layers` is fixed (dense_total minus the dense
    layers). `reference` (default `dense_total`) is what the ratio divides: a latency budget divides the
    dense model's MEASURED latency. `limits`: more (cost model, dense total, reference) budgets held to the
    same ratio (a latency budget at several batch sizes); a move is taken only
    when every budget still holds, and moves are ranked by their cost summed over the budgets as fractions
    of each target. Raises CstarError naming the best reachable ratio when the cheapest ranks everywhere are
    still too costly.
    """
    cost_model = cost_model if cost_model is not None else analytic_cost_model(by)
    _check_allocation_args(ratio, step)
    reference = dense_total if reference is None else reference
    cost = _Costs(cost_model, layers, limits, reference, ratio)
    options = {layer.name: rank_options(layer, step, cost_model) for layer in layers}
    state = {layer.name: cheapest_start(layer, options[layer.name], cost) for layer in layers}
    _, used = cost.totals(state, dense_total, limits)
    slack = [t + 1e-9 * max(abs(t), 1.0) for t in cost.targets]
    if any(u > s for u, s in zip(used, slack, strict=True)):
        references = [reference, *(ref for _, _, ref in limits)]
        worst = min(range(len(used)), key=lambda i: references[i] / used[i] if used[i] > 0 else math.inf)
        raise _unreachable(cost_model, references[worst], used[worst], ratio, step)
    moves = {n: _moves(cost.by_name[n], r, options[n], objective, cost) for n, r in state.items() if r is not None}
    while True:
        best_move: tuple[float, str, Ranks | None, tuple[float, ...]] | None = None
        for name, candidates in moves.items():
            for new, gain, delta in candidates:
                if gain <= 1e-12:
                    continue
                step_costs = _step_costs(cost, name, state[name], new)
                if any(u + d > t for u, d, t in zip(used, step_costs, cost.targets, strict=True)):
                    continue
                score = gain / max(delta, 1e-9)
                if best_move is None or score > best_move[0]:
                    best_move = (score, name, new, step_costs)
        if best_move is None:
            break
        _, name, new, step_costs = best_move
        state[name] = new
        used = [u + d for u, d in zip(used, step_costs, strict=True)]
        if new is None:
            del moves[name]
        else:
            moves[name] = _moves(cost.by_name[name], new, options[name], objective, cost)
    energy = {n: (1.0 if r is None else cost.by_name[n].energy(r)) for n, r in state.items()}
    return Allocation(state, cost_model.by, cost.targets[0], float(used[0]), reference, energy)


def _step_costs(cost: _Costs, name: str, ranks: Ranks | None, new: Ranks | None) -> tuple[float, ...]:
    """What moving layer `name` from `ranks` to `new` costs under each budget."""
    layer = cost.by_name[name]
    before, after = cost.vector(layer, ranks), cost.vector(layer, new)
    return tuple(a - b for a, b in zip(after, before, strict=True))


def _check_allocation_args(ratio: float, step: int) -> None:
    if ratio < 1:
        raise CstarError(f"compression ratio must be >= 1, got {ratio}", "pass --ratio 2, 4, 8 ...")
    if step < 1:
        raise CstarError(f"rank step must be >= 1, got {step}", "pass --rank-step 1 (any rank) or e.g. 8")


def _unreachable(cost_model: CostModel, dense_total: float, used: float, ratio: float, step: int) -> UnreachableBudget:
    """The error for a ratio the cheapest ranks cannot reach: names the best reachable ratio."""
    best = dense_total / used if used > 0 else math.inf
    if cost_model.monotone:
        floor = "rank 1" if step == 1 else f"rank {step} (--rank-step {step})"
        where = f"{floor} in every factorizable layer gives at most"
    else:
        where = "the fastest measured ranks (or dense) of every factorizable layer give at most"
    return UnreachableBudget(
        f"a {cost_model.by} ratio of {ratio:g} is not reachable: {where} {best:.2f}x",
        f"pass --ratio {math.floor(best * 100) / 100:g} or less"
        + (", or a smaller --rank-step" if step > 1 else "") + ", or let the first/last layers be factorized",
        best,
    )


def uniform_allocation(
    layers: list[LayerBudget], dense_total: float, ratio: float, by: str = "params",
    cost_model: CostModel | None = None, limits: tuple[Limit, ...] = (), reference: float | None = None,
) -> Allocation:
    """Baseline: the same rank fraction f in every layer (rank = ceil(f * dim)), largest f meeting the budget
    (and every budget of `limits`, see allocate).

    A layer is kept dense when its factorized form at f would not be cheaper.
    """
    cost_model = cost_model if cost_model is not None else analytic_cost_model(by)
    reference = dense_total if reference is None else reference
    cost = _Costs(cost_model, layers, limits, reference, ratio)
    fixed, _ = cost.totals({}, dense_total, limits)

    options = {layer.name: rank_options(layer, 1, cost_model) for layer in layers}
    references = [reference, *(ref for _, _, ref in limits)]

    def at(fraction: float) -> tuple[dict[str, Ranks | None], list[float]]:
        state: dict[str, Ranks | None] = {}
        for layer in layers:
            ranks = tuple(next(r for r in allowed if r >= max(1, math.ceil(fraction * d)))
                          for d, allowed in zip(layer.full_ranks, options[layer.name], strict=True))
            state[layer.name] = ranks if cost(layer, ranks) < cost(layer, None) else None
        return state, cost.totals(state, dense_total, limits)[1]

    def worst_share(used: list[float]) -> float:
        """The tightest budget's cost as a fraction of its target (<= 1: every budget holds)."""
        return max(u / t for u, t in zip(used, cost.targets, strict=True))

    state, used = at(0.0)
    if worst_share(used) > 1.0:
        best = min(d / u if u > 0 else math.inf for d, u in zip(references, used, strict=True))
        raise UnreachableBudget(
            f"a {cost_model.by} ratio of {ratio:g} is not reachable with uniform ranks (best {best:.2f}x)",
            "pass a smaller --ratio", best,
        )
    low = largest_fraction_within(lambda fraction: worst_share(at(fraction)[1]), 1.0, iterations=40)
    state, used = at(low)
    energy = {n: (1.0 if r is None else cost.by_name[n].energy(r)) for n, r in state.items()}
    return Allocation(state, cost_model.by, cost.targets[0], float(used[0]), reference, energy)


def largest_fraction_within(cost: Callable[[float], float], target: float, iterations: int) -> float:
    """Largest keep-fraction in [0, 1] whose cost stays within `target` (bisection; cost grows with it)."""
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        if cost(mid) <= target:
            low = mid
        else:
            high = mid
    return low
