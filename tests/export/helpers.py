"""Shared helpers for the export tests: synthetic specs, non-trivial BN statistics, full factorization."""

from __future__ import annotations

import torch
from torch import nn

from cstar.admm import factorize_model
from cstar.data import DatasetSpec


def synthetic_spec(channels: int = 3, size: int = 16, classes: int = 10) -> DatasetSpec:
    """A hand-built dataset spec (no data behind it)."""
    return DatasetSpec(
        name="synthetic", input_shape=(channels, size, size), classes=tuple(f"c{i}" for i in range(classes)),
        mean=(0.45,) * channels, std=(0.25,) * channels, default_eps=8 / 255,
    )


def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine parameters (folding must matter)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                n = module.num_features
                module.running_mean.copy_(torch.rand(n, generator=generator) * 0.4 - 0.2)
                module.running_var.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.weight.copy_(torch.rand(n, generator=generator) * 0.5 + 0.75)
                module.bias.copy_(torch.rand(n, generator=generator) * 0.2 - 0.1)
    return model


def half_ranks(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Ranks at half of each dimension for every Conv2d and Linear layer."""
    ranks: dict[str, tuple[int, ...]] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.groups == 1:
            ranks[name] = (max(1, module.out_channels // 2), max(1, module.in_channels // 2))
        elif isinstance(module, nn.Linear):
            ranks[name] = (max(1, min(module.in_features, module.out_features) // 2),)
    return ranks


def factorize_all(model: nn.Module) -> nn.Module:
    """Every conv -> LowRankConv2d, every linear -> LowRankLinear (Tucker-2 / SVD at half ranks)."""
    return factorize_model(model, half_ranks(model), sweeps=1).eval()  # type: ignore[arg-type]


def _orthonormal_rows(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Gaussian rows of unit expected norm: nearly orthonormal, without a QR (cheap for big layers)."""
    return torch.randn(rows, cols, generator=generator) / cols**0.5


def random_factorize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fast stand-in for `factorize_all`: project each weight on random subspaces at half ranks.

    Same layer types and ranks as a real Tucker-2 / SVD factorization, no eigen-solves or QR (cheap).
    """
    import copy

    from cstar.checkpoint import set_submodule
    from cstar.lowrank import LowRankConv2d, LowRankLinear

    generator = torch.Generator().manual_seed(seed)
    result = copy.deepcopy(model)
    modules = dict(result.named_modules())
    with torch.no_grad():
        for name, ranks in half_ranks(result).items():
            module = modules[name]
            if isinstance(module, nn.Conv2d):
                u_out = _orthonormal_rows(ranks[0], module.out_channels, generator).T
                u_in = _orthonormal_rows(ranks[1], module.in_channels, generator)
                core = torch.einsum("oihw,or,si->rshw", module.weight, u_out, u_in)
                set_submodule(result, name, LowRankConv2d.from_factors(module, u_out, core, u_in))
            else:
                v = _orthonormal_rows(ranks[0], module.in_features, generator)
                set_submodule(result, name, LowRankLinear.from_factors(module, module.weight @ v.T, v))
    return result.eval()
