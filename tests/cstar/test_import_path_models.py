"""Models by import path (`package.module:factory`): built, recorded, rebuilt by later stages; torchvision's
MobileNetV2 compressed with its depthwise convolutions left dense and exported with parity."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.models import build_model, model_options

SPEC = DatasetSpec("synthetic", (3, 32, 32), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 8 / 255)
MOBILENET = "torchvision.models:mobilenet_v2"


class TwoBranchNet(nn.Module):
    """Not a ResNet: two branches whose features are concatenated."""

    def __init__(self, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


def with_trained_looking_bn(model: nn.Module) -> nn.Module:
    """BatchNorm statistics away from (0, 1), so BN folding is really exercised; returns `model`."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return model


def make_two_branch(num_classes: int = 10, width: int = 8) -> nn.Module:
    return TwoBranchNet(num_classes, width)


def not_a_module(num_classes: int = 10) -> str:
    return "no"


def test_factory_gets_num_classes_and_options() -> None:
    model = build_model(f"{__name__}:make_two_branch", SPEC, width=4)
    assert isinstance(model.net, TwoBranchNet) and model.net.head[-1].in_features == 8
    assert model(torch.rand(2, *SPEC.input_shape)).shape == (2, 10)
    assert model_options(16, '{"width_mult": 0.5}') == {"width_mult": 0.5, "width": 16}


@pytest.mark.parametrize("name,needle", [
    ("no_such_package_xyz.nets:make", "cannot import module 'no_such_package_xyz.nets'"),
    (f"{__name__}:missing_factory", "has no 'missing_factory'"),
    (f"{__name__}:SPEC", "is not callable"),
    (f"{__name__}:not_a_module", "returned str, not an nn.Module"),
    ("torchvision.models:mobilenet_v2", "gives (1, 3)"),
    (":make", "is not package.module:factory"),
])
def test_bad_import_paths_are_one_clear_error(name: str, needle: str) -> None:
    options = {"num_classes": 3} if name == MOBILENET else {}
    with pytest.raises(CstarError) as caught:
        build_model(name, SPEC, **options)
    assert needle in caught.value.message and caught.value.hint


def test_bad_model_options_json_is_a_clear_error() -> None:
    for text, needle in (("{width: 3}", "not JSON"), ("[1, 2]", "JSON object")):
        with pytest.raises(CstarError, match=needle):
            model_options(None, text)


def test_mobilenet_v2_compresses_with_depthwise_dense_and_exports_with_parity(tmp_path: Path) -> None:
    from cstar.admm import Budget, allocate_for, factorize_model, rank_map
    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.lowrank import LowRankConv2d
    from cstar.ranks import first_and_last
    from export.exporter import run_export

    torch.manual_seed(0)
    dense = build_model(MOBILENET, SPEC, width_mult=0.5).eval()
    with_trained_looking_bn(dense)
    budget = Budget(2.0, "params", SPEC.input_shape, first_and_last(dense))
    compressed = factorize_model(dense, allocate_for(dense, budget).ranks).eval()
    depthwise = {name: m for name, m in dense.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}
    after = dict(compressed.named_modules())
    assert len(depthwise) == 17
    for name, conv in depthwise.items():  # depthwise layers untouched: same type, same weights
        assert type(after[name]) is nn.Conv2d and torch.equal(after[name].weight, conv.weight)
    assert sum(isinstance(m, LowRankConv2d) for m in compressed.modules()) > 0
    dense_params = sum(p.numel() for p in dense.parameters())
    assert dense_params / sum(p.numel() for p in compressed.parameters()) >= 1.5  # depthwise + BN stay dense
    save_checkpoint(tmp_path / "ckpt", compressed, "compress", MOBILENET, {"width_mult": 0.5}, SPEC,
                    {"eps": 8 / 255, "norm": "linf", "metrics": {}, "ranks": rank_map(compressed)})
    rebuilt, manifest = load_checkpoint(tmp_path / "ckpt")  # the later stages rebuild it from the import path
    x = torch.rand(6, *SPEC.input_shape)
    assert manifest["model"]["name"] == MOBILENET
    assert torch.allclose(rebuilt.eval()(x), compressed(x), atol=1e-6)
    exported = run_export(tmp_path / "ckpt", tmp_path / "onnx", parity_samples=8, progress=False,
                          parity_data=(torch.rand(20, *SPEC.input_shape), torch.arange(20) % 10))
    assert exported["parity"]["passed"] and exported["parity"]["max_abs_diff"] <= 1e-4
    assert "BatchNormalization" not in exported["onnx"]["nodes"]  # every BN folded, Conv2dNormActivation included
    assert exported["model"]["name"] == MOBILENET
