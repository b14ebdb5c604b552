"""Model registry: every model takes [0,1] inputs of its dataset's shape; clear errors on bad names."""

from __future__ import annotations

import pytest
import torch

from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.models import Normalize, build_model, default_model_for, model_names

CIFAR = DatasetSpec("cifar10", (3, 32, 32), tuple("abcdefghij"), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 8 / 255)


@pytest.mark.parametrize("name", ["small-resnet", "resnet18", "preact-resnet18", "vgg16", "tv-resnet18"])
def test_models_produce_logits(name: str) -> None:
    model = build_model(name, CIFAR).eval()
    assert isinstance(model[0], Normalize)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32))
    assert tuple(out.shape) == (2, 10) and torch.isfinite(out).all()


def test_normalization_is_inside_the_model() -> None:
    model = build_model("small-resnet", CIFAR)
    x = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(model[0](x), torch.zeros_like(x))


def test_small_resnet_on_digits_shape(digits) -> None:  # type: ignore[no-untyped-def]
    model = build_model(default_model_for("digits"), digits.spec)
    assert default_model_for("digits") == "small-resnet"
    assert tuple(model(torch.rand(3, 1, 16, 16)).shape) == (3, 10)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(CstarError) as info:
        build_model("resnet1800", CIFAR)
    for name in model_names():
        assert name in (info.value.hint or "")
