"""to_deploy: plain ops only, BatchNorms folded, same function as the original (atol 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cstar.flops import count_flops
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.models import build_model
from export.deploy_form import count_modules, fold_bn_into_conv, register_deploy_rule, to_deploy
from export.forms import CONVS_PER_FORM, choose_forms
from tests.export.helpers import random_factorize, randomize_batchnorms, synthetic_spec

# (registry name, options, input size, BatchNorms left after folding)
CASES = [
    ("small-resnet", {"width": 8}, 16, 0),
    ("resnet18", {"width": 8}, 16, 0),
    ("preact-resnet18", {"width": 8}, 16, 9),  # per block bn1 (before ReLU -> conv1) + bn1_final
    ("vgg16", {}, 8, 0),
    ("tv-resnet18", {}, 32, 0),
]


def _model(name: str, options: dict[str, object], size: int) -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorms(build_model(name, synthetic_spec(size=size), **options)).eval()


def _max_diff(a: nn.Module, b: nn.Module, size: int) -> float:
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


@pytest.mark.parametrize(("name", "options", "size", "bn_left"), CASES, ids=[c[0] for c in CASES])
def test_dense_deploy_equals_original(name: str, options: dict[str, object], size: int, bn_left: int) -> None:
    model = _model(name, options, size)
    deployed = to_deploy(model)
    assert _max_diff(model, deployed, size) <= 1e-5
    assert count_modules(deployed, nn.BatchNorm2d) == bn_left
    assert count_modules(model, nn.BatchNorm2d) > bn_left  # something was folded
    assert not deployed.training and model.training is False


@pytest.mark.parametrize(("name", "options", "size", "bn_left"), CASES, ids=[c[0] for c in CASES])
def test_factorized_deploy_equals_original(name: str, options: dict[str, object], size: int, bn_left: int) -> None:
    model = random_factorize(_model(name, options, size))
    n_lowrank_conv = count_modules(model, LowRankConv2d)
    n_lowrank_linear = count_modules(model, LowRankLinear)
    assert n_lowrank_conv > 0 and n_lowrank_linear == 1
    deployed = to_deploy(model)
    assert _max_diff(model, deployed, size) <= 1e-5
    assert count_modules(deployed, LowRankConv2d) == 0 and count_modules(deployed, LowRankLinear) == 0
    forms = choose_forms(model, input_shape=(3, size, size))  # the default: fewest MACs per layer
    assert len(forms) == n_lowrank_conv and forms == choose_forms(model)
    assert count_modules(deployed, nn.Conv2d) == sum(CONVS_PER_FORM[form] for form in forms.values())
    assert set(forms.values()) != {"three-conv"}  # 1x1 shortcuts / the stem merge at half ranks
    assert count_flops(deployed, (3, size, size)) < count_flops(model, (3, size, size))
    assert count_modules(deployed, nn.Linear) == 2 * n_lowrank_linear
    assert count_modules(deployed, nn.BatchNorm2d) == bn_left


def test_factorized_conv_becomes_three_plain_convs_with_fold() -> None:
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, dilation=1, bias=False)
    torch.manual_seed(0)
    layer = LowRankConv2d.from_factors(conv, torch.randn(10, 4), torch.randn(4, 3, 3, 3), torch.randn(3, 6))
    model = randomize_batchnorms(nn.Sequential(layer, nn.BatchNorm2d(10), nn.ReLU())).eval()
    deployed = to_deploy(model)
    first, middle, last = deployed[0]
    assert (first.kernel_size, middle.kernel_size, last.kernel_size) == ((1, 1), (3, 3), (1, 1))
    assert (first.out_channels, middle.out_channels, middle.stride, middle.padding) == (3, 4, (2, 2), (1, 1))
    assert first.bias is None and middle.bias is None and last.bias is not None  # BN went into the last 1x1
    assert isinstance(deployed[1], nn.Identity)
    x = torch.rand(2, 6, 9, 9)
    with torch.no_grad():
        assert float((model(x) - deployed(x)).abs().max()) <= 1e-5


def test_original_is_untouched_and_dropout_removed() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5), nn.Flatten(), nn.Linear(36, 2))
    model.train()
    deployed = to_deploy(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], nn.Dropout) and model.training
    assert isinstance(deployed[1], nn.Identity) and isinstance(deployed[2], nn.Identity)
    assert not any(p.requires_grad for p in deployed.parameters())


def test_fold_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="cannot fold"):
        fold_bn_into_conv(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))


class _Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_register_deploy_rule_plugs_in_new_types() -> None:
    register_deploy_rule(_Doubler, lambda m: nn.Identity())
    deployed = to_deploy(nn.Sequential(nn.ReLU(), _Doubler()))
    assert isinstance(deployed[1], nn.Identity)
