"""Global rank allocation: one params (or FLOPs) budget shared by every factorizable layer.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from cstar.errors import CstarError
from cstar.flops import count_flops, count_params
from cstar.tucker import singular_values, unfold

Ranks = tuple[int, ...]


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
    total_cost: int  # the whole model after allocation (fixed + candidate layers)
    dense_total: int
    energy: dict[str, float] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.dense_total / max(self.total_cost, 1)


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
    handles = []
    for name, module in layers:
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str = name) -> None:
            if isinstance(mod, nn.Conv2d):
                positions[name] = (inputs[0].shape[-1] * inputs[0].shape[-2], output.shape[-1] * output.shape[-2])
            else:
                positions[name] = (1, 1)
        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    budgets = []
    for name, module in layers:
        linear = isinstance(module, nn.Linear)
        weight = cast(torch.Tensor, module.weight)
        kernel = 1 if linear else int(weight.shape[2] * weight.shape[3])
        pin, pout = positions.get(name, (1, 1))
        budgets.append(LayerBudget(name, int(weight.shape[0]), int(weight.shape[1]), kernel, linear,
                                   module.bias is not None, pin, pout, weight_spectra(weight)))
    return budgets


def model_cost(model: nn.Module, input_shape: tuple[int, ...], by: str) -> int:
    """Params or MACs of the whole model, as cstar.flops counts them."""
    return count_params(model) if by == "params" else count_flops(model, input_shape)


def _moves(
    layer: LayerBudget, ranks: Ranks, step: int, by: str, objective: str
) -> list[tuple[Ranks | None, float, int]]:
    """Candidate moves from `ranks`: (new ranks or None=dense, objective gain, cost delta)."""
    current_cost, current = layer.cost(ranks, by), layer.score(ranks, objective)
    dense: tuple[Ranks | None, float, int] = (
        None, layer.score(None, objective) - current, layer.dense_cost(by) - current_cost
    )
    moves: list[tuple[Ranks | None, float, int]] = []
    for mode, full in enumerate(layer.full_ranks):
        if ranks[mode] >= full:
            continue
        new = tuple(next_rank(r, step, full) if m == mode else r for m, r in enumerate(ranks))
        new_cost = layer.cost(new, by)
        if new_cost >= layer.dense_cost(by):
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


def allocate(
    layers: list[LayerBudget], dense_total: int, ratio: float, by: str = "params", step: int = 1,
    objective: str = "log",
) -> Allocation:
    """Greedy global allocation so that fixed + sum(layer costs) <= dense_total / ratio.

    `dense_total` is the dense model's params (or MACs); everything outside `layers` is fixed.
    Raises CstarError naming the best achievable ratio when rank 1 everywhere is still too big.
    """
    if by not in ("params", "flops"):
        raise CstarError(f"unknown budget '{by}'", "use --by params or --by flops")
    if ratio < 1:
        raise CstarError(f"compression ratio must be >= 1, got {ratio}", "pass --ratio 2, 4, 8 ...")
    if step < 1:
        raise CstarError(f"rank step must be >= 1, got {step}", "pass --rank-step 1 (any rank) or e.g. 8")
    target = dense_total / ratio
    fixed = dense_total - sum(layer.dense_cost(by) for layer in layers)
    state: dict[str, Ranks | None] = {}
    for layer in layers:
        smallest = start_ranks(layer, step)
        state[layer.name] = smallest if layer.cost(smallest, by) < layer.dense_cost(by) else None
    by_name = {layer.name: layer for layer in layers}
    used = fixed + sum(_cost(by_name[n], r, by) for n, r in state.items())
    if used > target + 1e-9:
        best = dense_total / used
        floor = "rank 1" if step == 1 else f"rank {step} (--rank-step {step})"
        raise CstarError(
            f"a {by} ratio of {ratio:g} is not reachable: {floor} in every factorizable layer gives at most "
            f"{best:.2f}x",
            f"pass --ratio {math.floor(best * 100) / 100:g} or less"
            + (", or a smaller --rank-step" if step > 1 else "") + ", or let the first/last layers be factorized",
        )
    while True:
        best_move: tuple[float, str, Ranks | None, int] | None = None
        for name, ranks in state.items():
            if ranks is None:
                continue
            for new, gain, delta in _moves(by_name[name], ranks, step, by, objective):
                if used + delta > target or gain <= 1e-12:
                    continue
                score = gain / max(delta, 1e-9)
                if best_move is None or score > best_move[0]:
                    best_move = (score, name, new, delta)
        if best_move is None:
            break
        _, name, new, delta = best_move
        state[name] = new
        used += delta
    energy = {n: (1.0 if r is None else by_name[n].energy(r)) for n, r in state.items()}
    return Allocation(state, by, target, int(used), dense_total, energy)


def _cost(layer: LayerBudget, ranks: Ranks | None, by: str) -> int:
    return layer.dense_cost(by) if ranks is None else layer.cost(ranks, by)


def uniform_allocation(
    layers: list[LayerBudget], dense_total: int, ratio: float, by: str = "params"
) -> Allocation:
    """Baseline: the same rank fraction f in every layer (rank = ceil(f * dim)), largest f meeting the budget.

    A layer is kept dense when its factorized form at f would not be cheaper.
    """
    target = dense_total / ratio
    fixed = dense_total - sum(layer.dense_cost(by) for layer in layers)

    def at(fraction: float) -> tuple[dict[str, Ranks | None], int]:
        state: dict[str, Ranks | None] = {}
        for layer in layers:
            ranks = tuple(max(1, math.ceil(fraction * d)) for d in layer.full_ranks)
            state[layer.name] = ranks if layer.cost(ranks, by) < layer.dense_cost(by) else None
        return state, fixed + sum(_cost(layer, state[layer.name], by) for layer in layers)

    state, used = at(0.0)
    if used > target:
        raise CstarError(
            f"a {by} ratio of {ratio:g} is not reachable with uniform ranks (best {dense_total / used:.2f}x)",
            "pass a smaller --ratio",
        )
    low = largest_fraction_within(lambda fraction: at(fraction)[1], target, iterations=40)
    state, used = at(low)
    energy = {n: (1.0 if r is None else next(x for x in layers if x.name == n).energy(r)) for n, r in state.items()}
    return Allocation(state, by, target, int(used), dense_total, energy)


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
