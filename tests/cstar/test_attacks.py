"""Attacks: eps=0 is the identity, results stay in the eps-ball and [0,1], PGD hurts a standard model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cstar.attacks import fast_example, fgsm, pgd
from cstar.checkpoint import load_checkpoint
from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError


@pytest.fixture(scope="module")
def standard(standard_digits_dir: Path, digits: DataBundle) -> tuple:
    model, _ = load_checkpoint(standard_digits_dir)
    x, y = to_tensors(digits.test, limit=120)
    return model, x, y


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_eps_zero_changes_nothing(standard: tuple) -> None:
    model, x, y = standard
    assert torch.equal(pgd(model, x, y, 0.0), x)
    assert torch.equal(fgsm(model, x, y, 0.0), x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 1.0)])
def test_pgd_stays_in_ball_and_box(standard: tuple, norm: str, eps: float) -> None:
    model, x, y = standard
    x_adv = pgd(model, x, y, eps, steps=5, norm=norm)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0


def test_pgd_lowers_accuracy_of_standard_model(standard: tuple) -> None:
    model, x, y = standard
    clean = _acc(model, x, y)
    robust = _acc(model, pgd(model, x, y, 0.2, steps=10), y)
    assert clean >= 0.85
    assert robust <= clean - 0.4


def test_model_left_in_train_mode_is_restored(standard: tuple) -> None:
    model, x, y = standard
    model.train()
    pgd(model, x[:8], y[:8], 0.1, steps=2)
    assert model.training
    model.eval()


@pytest.mark.parametrize("kwargs", [{"eps": -0.1}, {"eps": 0.1, "norm": "l3"}])
def test_bad_attack_arguments(standard: tuple, kwargs: dict) -> None:
    model, x, y = standard
    with pytest.raises(CstarError):
        pgd(model, x[:2], y[:2], **kwargs)


def test_nan_input_is_refused(standard: tuple) -> None:
    model, x, y = standard
    bad = x[:2].clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(CstarError, match="NaN"):
        pgd(model, bad, y[:2], 0.1)


@pytest.mark.parametrize("method,bound", [("fgsm-rs", 0.1), ("n-fgsm", 0.3)])
def test_fast_examples_take_one_gradient_and_stay_in_their_bounds(standard: tuple, method: str, bound: float) -> None:
    """fgsm-rs is projected onto the eps-ball; n-fgsm is not (noise 2 eps + step eps = 3 eps at most)."""
    model, x, y = standard
    calls = []
    handle = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        x_adv = fast_example(model, x, y, 0.1, method)
    finally:
        handle.remove()
    assert len(calls) == 1
    size = (x_adv - x).flatten(1).abs().amax(1)
    assert float(size.max()) <= bound + 1e-5 and float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    if method == "n-fgsm":
        assert float(size.max()) > 0.1 + 1e-3  # the unprojected step leaves the eps-ball
    assert _acc(model, x_adv, y) <= _acc(model, x, y) - 0.2  # a standard model falls to one step


def test_fast_example_rejects_a_bad_method(standard: tuple) -> None:
    model, x, y = standard
    with pytest.raises(CstarError, match="fast attack"):
        fast_example(model, x, y, 0.1, "fgsm-magic")
