"""Square attack (numpy): invariants on a toy model, and a real accuracy drop on a standard-trained CNN."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cstar.errors import CstarError
from cstar.square import margin, p_selection, square_attack


def _linear_model(seed: int = 1) -> tuple[np.ndarray, object]:
    weights = np.random.default_rng(seed).normal(size=(10, 3 * 8 * 8)).astype(np.float32)

    def predict(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) @ weights.T

    return weights, predict


def _toy_batch(n: int = 40) -> tuple[np.ndarray, np.ndarray, object]:
    _, predict = _linear_model()
    x = np.random.default_rng(2).random((n, 3, 8, 8)).astype(np.float32)
    y = predict(x).argmax(axis=1)
    return x, y, predict


def test_eps_zero_returns_inputs_unchanged() -> None:
    x, y, predict = _toy_batch()
    result = square_attack(predict, x, y, eps=0.0, n_queries=50)
    assert np.array_equal(result.x_adv, x)
    assert result.queries.sum() == 0
    assert not result.success.any()


def test_outputs_stay_in_eps_ball_and_unit_box() -> None:
    x, y, predict = _toy_batch()
    x[:, :, :2] = 0.0
    x[:, :, -2:] = 1.0
    y = predict(x).argmax(axis=1)  # labels of the modified inputs: every example starts correct
    eps = 0.05
    result = square_attack(predict, x, y, eps=eps, n_queries=200, seed=3)
    assert result.x_adv.dtype == np.float32 and result.x_adv.shape == x.shape
    assert np.abs(result.x_adv - x).max() <= eps + 1e-6
    assert result.x_adv.min() >= 0.0 and result.x_adv.max() <= 1.0
    assert result.success.any() and not result.success.all()
    assert result.queries.max() <= 200 and result.queries.min() >= 1
    fooled = predict(result.x_adv).argmax(axis=1) != y
    assert np.array_equal(fooled, result.success)


def test_only_correct_examples_are_queried_in_batched_calls() -> None:
    x, y, predict = _toy_batch(20)
    y = y.copy()
    y[:5] = (y[:5] + 1) % 10  # already misclassified: never attacked
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return predict(batch)

    result = square_attack(counting, x, y, eps=0.05, n_queries=30)
    assert result.success[:5].all() and (result.queries[:5] == 0).all()
    assert calls[0] == 20 and calls[1] == 15  # clean check, then stripes init on the 15 correct ones
    assert len(calls) <= 1 + 30
    assert sum(calls[1:]) == int(result.queries.sum())


def test_deterministic_for_a_seed() -> None:
    x, y, predict = _toy_batch()
    a = square_attack(predict, x, y, eps=0.05, n_queries=50, seed=7)
    b = square_attack(predict, x, y, eps=0.05, n_queries=50, seed=7)
    assert np.array_equal(a.x_adv, b.x_adv) and np.array_equal(a.queries, b.queries)


def test_schedule_margin_and_errors() -> None:
    assert p_selection(0.05, 0, 1000) == 0.05
    assert p_selection(0.05, 3, 1000) == 0.025  # it 30 of 10000
    assert p_selection(0.05, 10, 1000) == 0.0125  # it 100 of 10000
    assert p_selection(0.05, 999, 1000) == pytest.approx(0.05 / 512)
    assert margin(np.array([[2.0, 1.0, 0.5], [0.0, 3.0, 1.0]]), np.array([0, 0])).tolist() == [1.0, -3.0]
    x, y, predict = _toy_batch(4)
    with pytest.raises(CstarError):
        square_attack(predict, x, y, eps=-0.1)
    with pytest.raises(CstarError):
        square_attack(predict, x * 3, y, eps=0.1)


def test_square_lowers_accuracy_of_standard_model(standard_digits_dir: Path) -> None:
    from cstar.attacks import torch_predict_fn
    from cstar.checkpoint import load_checkpoint
    from cstar.data import load_dataset, stratified_indices, to_tensors

    model, manifest = load_checkpoint(standard_digits_dir)
    bundle = load_dataset("digits")
    indices = stratified_indices(bundle.labels("test"), 100, seed=0)
    images, labels = to_tensors(bundle.test, indices)
    x, y = images.numpy(), labels.numpy()
    predict = torch_predict_fn(model)
    clean = float((predict(x).argmax(axis=1) == y).mean())
    result = square_attack(predict, x, y, eps=0.2, n_queries=300, seed=0)
    robust = float((predict(result.x_adv).argmax(axis=1) == y).mean())
    assert robust == pytest.approx(result.robust_acc)
    assert np.abs(result.x_adv - x).max() <= 0.2 + 1e-6
    assert clean >= 0.8
    assert clean - robust >= 0.20, (clean, robust)
