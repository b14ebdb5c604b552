"""CSTAR's ADMM: adversarial training under Tucker-2 rank constraints, then factorization.

Problem (for the factorizable layers l, ranks r_l chosen globally by `cstar.ranks.allocate`):
    min_W  E_(x,y) max_{||d|| <= eps} L(f_W(x + d), y)   s.t.  rank_{1,2}(W_l) <= r_l
Split W_l = Z_l, Z_l in the rank set C_l, scaled dual U_l:
    W-step:  k SGD steps of the adversarial loss + sum_l rho/2 ||W_l - Z_l + U_l||^2   (one epoch)
    Z-step:  Z_l = Proj_{C_l}(W_l + U_l)       (Tucker-2 HOSVD + HOOI, cstar.tucker)
    U-step:  U_l = U_l + W_l - Z_l
    rho     <- min(rho * growth, rho_max), U rescaled by rho_old / rho_new (scaled-form ADMM)
During the first `realloc_epochs` epochs the ranks are re-allocated from the spectra of W + U.
At the end every constrained layer is replaced by `LowRankConv2d` / `LowRankLinear` built from the
Tucker-2 factors of its final weight; adversarial fine-tuning of the factorized model follows (the
caller, cstar.compress).

Under torchrun every rank runs the same ADMM: the W-step is DDP training (identical weights), the
allocation and Z/U are computed from those weights and then broadcast from rank 0, so rank maps,
Z, U and the rho schedule are identical on every rank by construction, not by luck of determinism.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn

from cstar import distributed as dist
from cstar.checkpoint import set_submodule
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.ranks import Allocation, Ranks, allocate, candidate_layers, layer_budgets, uniform_allocation
from cstar.tucker import matrix_project, project, tucker2_project


@dataclass
class AdmmConfig:
    """ADMM knobs (defaults tuned on digits / small-resnet; see docs/method.md)."""

    epochs: int = 5
    rho: float = 0.1
    rho_growth: float = 3.0
    rho_max: float = 10.0
    sweeps: int = 2
    realloc_epochs: int = 2
    rank_step: int = 1


@dataclass
class Budget:
    """What to allocate: the ratio, the quantity, the input shape, and layers that stay dense."""

    ratio: float
    by: str
    input_shape: tuple[int, ...]
    keep_dense: tuple[str, ...] = ()
    rank_step: int = 1
    objective: str = "log"
    latency_table: Any = None  # cstar.latency_table.LatencyTable when by == "latency"
    latency_batch: int | tuple[int, ...] = 1  # the table's batch size(s) whose latencies are the budget (each)

    @property
    def latency_batches(self) -> tuple[int, ...]:
        """Every batch size the latency budget must hold at; the first is the headline (and picks the forms)."""
        from cstar.latency_table import latency_batches

        return latency_batches(self.latency_batch)


def allocate_for(model: nn.Module, budget: Budget, weights: dict[str, torch.Tensor] | None = None,
                 uniform: bool = False) -> Allocation:
    """Global (or uniform) rank allocation for `model`, spectra taken from `weights` where given.

    Distributed: rank 0's allocation is broadcast, so every rank factorizes to the same ranks.
    """
    from cstar.budget import budget_limits

    layers = candidate_layers(model, budget.keep_dense)
    budgets = layer_budgets(model, budget.input_shape, layers)
    if weights:
        from cstar.ranks import weight_spectra

        for item in budgets:
            if item.name in weights:
                item.spectra = weight_spectra(weights[item.name])
    (cost_model, dense_total, reference), limits = budget_limits(model, budget.input_shape, budget.by,
                                                                 budget.latency_table, budget.latency_batches)
    if uniform:
        allocation = uniform_allocation(budgets, dense_total, budget.ratio, budget.by, cost_model, limits, reference)
    else:
        allocation = allocate(budgets, dense_total, budget.ratio, budget.by, budget.rank_step, budget.objective,
                              cost_model, limits, reference)
    return dist.broadcast_object(allocation)


def factorize_model(model: nn.Module, ranks: dict[str, Ranks | None], sweeps: int = 2) -> nn.Module:
    """A copy of `model` with every layer that has ranks replaced by its Tucker-2 / SVD factorization."""
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    for name, layer_ranks in ranks.items():
        if layer_ranks is None:
            continue
        module = modules[name]
        if isinstance(module, nn.Conv2d):
            _, (u_out, core, u_in) = tucker2_project(module.weight, (layer_ranks[0], layer_ranks[1]), sweeps)
            set_submodule(result, name, LowRankConv2d.from_factors(module, u_out, core, u_in))
        elif isinstance(module, nn.Linear):
            _, (u, v) = matrix_project(module.weight, layer_ranks[0])
            set_submodule(result, name, LowRankLinear.from_factors(module, u, v))
    return result


def rank_map(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Manifest `ranks`: {layer: {kind tucker2|svd|dense, ranks, shape}} for every conv/linear layer."""
    entries: dict[str, dict[str, Any]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankConv2d):
            shape = [module.out_channels, module.in_channels, *module.kernel_size]
            entries[name] = {"kind": "tucker2", "ranks": list(module.ranks), "shape": shape}
        elif isinstance(module, LowRankLinear):
            entries[name] = {"kind": "svd", "ranks": [module.rank], "shape": [module.out_features, module.in_features]}
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            shape = list(module.weight.shape)
            entries[name] = {"kind": "dense", "ranks": shape[:2], "shape": shape}
    return entries


@dataclass
class AdmmState:
    """Per-layer Z (projected), U (scaled dual), ranks and the current rho."""

    layers: dict[str, nn.Conv2d | nn.Linear]  # the constrained layers (cstar.ranks.candidate_layers)
    ranks: dict[str, Ranks]
    rho: float
    sweeps: int
    z: dict[str, torch.Tensor] = field(default_factory=dict)
    u: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def start(cls, model: nn.Module, allocation: Allocation, rho: float, sweeps: int) -> AdmmState:
        modules = dict(model.named_modules())
        ranks = {n: r for n, r in allocation.ranks.items() if r is not None}
        state = cls({n: cast("nn.Conv2d | nn.Linear", modules[n]) for n in ranks}, ranks, rho, sweeps)
        for name, module in state.layers.items():
            state.u[name] = torch.zeros_like(module.weight.detach())
        state.z_step()
        state.broadcast()
        return state

    def broadcast(self) -> None:
        """Make Z and U rank 0's on every rank (no-op outside torchrun)."""
        names = sorted(self.layers)
        dist.broadcast_tensors([self.z[n] for n in names] + [self.u[n] for n in names])

    def penalty(self) -> torch.Tensor:
        """sum_l rho/2 ||W_l - Z_l + U_l||^2 (differentiable in W)."""
        total = torch.zeros((), device=next(iter(self.layers.values())).weight.device)
        for name, module in self.layers.items():
            total = total + (module.weight - self.z[name] + self.u[name]).pow(2).sum()
        return 0.5 * self.rho * total

    def targets(self) -> dict[str, torch.Tensor]:
        return {n: m.weight.detach() + self.u[n] for n, m in self.layers.items()}

    def z_step(self) -> None:
        for name, target in self.targets().items():
            self.z[name] = project(target, self.ranks[name], self.sweeps)

    def u_step(self) -> None:
        for name, module in self.layers.items():
            self.u[name] = self.u[name] + module.weight.detach() - self.z[name]

    def set_rho(self, rho: float) -> None:
        scale = self.rho / rho
        self.u = {n: u * scale for n, u in self.u.items()}
        self.rho = rho

    def residual(self) -> float:
        """Relative primal residual sum ||W - Z||^2 / sum ||W||^2 (0 = constraints met)."""
        num = sum(float((m.weight.detach() - self.z[n]).pow(2).sum()) for n, m in self.layers.items())
        den = sum(float(m.weight.detach().pow(2).sum()) for m in self.layers.values())
        return num / max(den, 1e-12)


TrainEpoch = Callable[[nn.Module, Callable[[], torch.Tensor], int], dict[str, float]]


@dataclass
class AdmmResult:
    """Dense weights after ADMM, the final allocation and per-epoch history."""

    model: nn.Module
    allocation: Allocation
    history: list[dict[str, Any]]


def run_admm(
    model: nn.Module, budget: Budget, config: AdmmConfig, train_one_epoch: TrainEpoch, progress: bool = False
) -> AdmmResult:
    """ADMM epochs: `train_one_epoch(model, extra_loss, epoch)` is the W-step (adversarial training).

    The training epoch is injected so the same recipe (cstar.train) drives every method.
    """
    from tqdm import tqdm

    from cstar.train import progress_bars

    allocation = allocate_for(model, budget)
    state = AdmmState.start(model, allocation, config.rho, config.sweeps)
    history: list[dict[str, Any]] = []
    bar = tqdm(range(config.epochs), desc="admm", unit="epoch", disable=not progress_bars(progress), leave=False)
    for epoch in bar:
        stats = train_one_epoch(model, state.penalty, epoch)
        if epoch < config.realloc_epochs:
            allocation = allocate_for(model, budget, weights=state.targets())
            state.ranks = {n: r for n, r in allocation.ranks.items() if r is not None and n in state.layers}
            state.ranks.update({n: allocation.ranks[n] or _full(state.layers[n]) for n in state.layers
                                if n not in state.ranks})
        state.z_step()
        state.u_step()
        state.broadcast()
        record = {"epoch": epoch, "rho": state.rho, "residual": state.residual(),
                  "ranks_total": sum(sum(r) for r in state.ranks.values()), **stats}
        history.append(record)
        bar.set_postfix(rho=f"{state.rho:.3g}", residual=f"{record['residual']:.4f}")
        state.set_rho(min(state.rho * config.rho_growth, config.rho_max))
    return AdmmResult(model, allocation, history)


def _full(module: nn.Module) -> Ranks:
    weight = cast(torch.Tensor, module.weight)
    return (int(weight.shape[0]), int(weight.shape[1])) if weight.ndim == 4 else (min(weight.shape),)
