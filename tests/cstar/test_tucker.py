"""Tucker-2 projection and the factorized layers it feeds."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.tucker import hosvd2, matrix_project, tucker2_project, tucker2_reconstruct, unfold


def _low_rank_ish(shape: tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=generator)
    return base * torch.linspace(1.0, 0.05, shape[0]).view(-1, 1, 1, 1)


def test_unfold_shapes() -> None:
    w = torch.randn(6, 4, 3, 3)
    assert unfold(w, 0).shape == (6, 36)
    assert unfold(w, 1).shape == (4, 54)


@pytest.mark.parametrize("ranks", [(3, 2), (5, 4), (1, 1), (8, 6)])
def test_projection_is_idempotent_and_beats_hosvd(ranks: tuple[int, int]) -> None:
    w = _low_rank_ish((8, 6, 3, 3))
    projected, factors = tucker2_project(w, ranks, sweeps=3)
    again, _ = tucker2_project(projected, ranks, sweeps=3)
    assert torch.allclose(again, projected, atol=1e-5)
    hosvd_err = (tucker2_reconstruct(*hosvd2(w, ranks)) - w).norm()
    assert (projected - w).norm() <= hosvd_err + 1e-5
    u_out, core, u_in = factors
    assert u_out.shape == (8, ranks[0]) and u_in.shape == (ranks[1], 6)
    assert core.shape == (ranks[0], ranks[1], 3, 3)
    assert torch.allclose(tucker2_reconstruct(*factors), projected, atol=1e-5)


def test_full_rank_projection_is_exact() -> None:
    w = torch.randn(5, 4, 3, 3)
    projected, _ = tucker2_project(w, (5, 4))
    assert torch.allclose(projected, w, atol=1e-5)


def test_matrix_projection_is_eckart_young() -> None:
    w = torch.randn(10, 7)
    projected, (u, v) = matrix_project(w, 3)
    s = torch.linalg.svdvals(w)
    assert torch.isclose((w - projected).norm(), s[3:].norm(), atol=1e-4)
    assert torch.allclose(u @ v, projected, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1, bias=False),
        dict(kernel_size=3, stride=2, padding=1, bias=True),
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(0, 2), dilation=(2, 1), bias=True),
        dict(kernel_size=1, stride=2, padding=0, bias=False),
    ],
)
def test_lowrank_conv_equals_dense_conv_from_factors(kwargs: dict) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, **kwargs)
    _, (u_out, core, u_in) = tucker2_project(conv.weight, (3, 4))
    layer = LowRankConv2d.from_factors(conv, u_out, core, u_in)
    dense = nn.Conv2d(6, 8, **kwargs)
    with torch.no_grad():
        dense.weight.copy_(layer.dense_weight())
        if conv.bias is not None:
            dense.bias.copy_(conv.bias)
    x = torch.randn(2, 6, 11, 13)
    assert torch.allclose(layer(x), dense(x), atol=1e-5)
    assert torch.allclose(layer.to_convs()(x), dense(x), atol=1e-5)


def test_lowrank_linear_equals_dense_from_factors() -> None:
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    projected, (u, v) = matrix_project(linear.weight, 3)
    layer = LowRankLinear.from_factors(linear, u, v)
    x = torch.randn(4, 12)
    assert torch.allclose(layer(x), x @ projected.T + linear.bias, atol=1e-5)
