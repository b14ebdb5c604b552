"""Square attack (numpy): invariants on a toy model, and a real accuracy drop on a standard-trained CNN."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from cstar.errors import CstarError
from cstar.square import Predict, margin, meta_pseudo_gaussian, p_selection, square_attack


def _linear_model(seed: int = 1) -> tuple[np.ndarray, Predict]:
    weights = np.random.default_rng(seed).normal(size=(10, 3 * 8 * 8)).astype(np.float32)

    def predict(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1) @ weights.T

    return weights, predict


def _toy_batch(n: int = 40) -> tuple[np.ndarray, np.ndarray, Predict]:
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
    start = np.clip(x + 0.03, 0, 1)
    a = square_attack(predict, x, y, eps=0.05, n_queries=50, seed=7, n_restarts=2, x_init=start)
    b = square_attack(predict, x, y, eps=0.05, n_queries=50, seed=7, n_restarts=2, x_init=start)
    assert np.array_equal(a.x_adv, b.x_adv) and np.array_equal(a.queries, b.queries)
    assert np.array_equal(a.margins, b.margins) and np.array_equal(a.start, b.start)
    c = square_attack(predict, x, y, eps=0.05, n_queries=50, seed=8, n_restarts=2, x_init=start)
    assert not np.array_equal(a.x_adv, c.x_adv)


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
    for bad in ({"p_init": 0.0}, {"p_init": 1.5}, {"n_restarts": 0}, {"norm": "l1"}, {"seed": -1}, {"n_queries": -1}):
        with pytest.raises(CstarError):
            square_attack(predict, x, y, eps=0.1, **bad)


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


# ------------------------------------------------------------------------------ a small trained model

@pytest.fixture(scope="module")
def mlp_digits() -> tuple[np.ndarray, np.ndarray, Predict]:
    """scikit-learn's 8x8 digits and a small MLP trained on them, as numpy logits: fast, and the attack has
    real work to do (robust accuracy ~0.4-0.7 at eps 0.1 with a few hundred queries)."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]
    mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=200, alpha=1e-3, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp.fit(images[:1400].reshape(1400, -1), digits.target[:1400])
    w1, b1, w2, b2 = mlp.coefs_[0], mlp.intercepts_[0], mlp.coefs_[1], mlp.intercepts_[1]

    def predict(x: np.ndarray) -> np.ndarray:
        hidden = np.maximum(x.reshape(len(x), -1).astype(np.float64) @ w1 + b1, 0.0)
        return (hidden @ w2 + b2).astype(np.float32)

    return images[1400:1500], digits.target[1400:1500], predict


def _robust(predict: Predict, x: np.ndarray, y: np.ndarray) -> float:
    return float((predict(x).argmax(axis=1) == y).mean())


def test_at_least_as_strong_as_art_square(mlp_digits: tuple[np.ndarray, np.ndarray, Predict]) -> None:
    """Cross-check against an independent implementation: ART's SquareAttack at the same eps, budget, p_init."""
    art = pytest.importorskip("art", reason="adversarial-robustness-toolbox not installed (pip install -e '.[dev]')")
    from art.attacks.evasion import SquareAttack
    from art.estimators.classification import BlackBoxClassifierNeuralNetwork

    assert art.__version__
    x, y, predict = mlp_digits
    eps, budget = 0.1, 300
    classifier = BlackBoxClassifierNeuralNetwork(predict, input_shape=x.shape[1:], nb_classes=10, clip_values=(0.0, 1.0),
                                                 channels_first=True)
    state = np.random.get_state()
    try:
        np.random.seed(0)  # ART draws from numpy's global generator
        attack = SquareAttack(classifier, norm=np.inf, eps=eps, max_iter=budget, p_init=0.8, nb_restarts=1, verbose=False)
        theirs_adv = attack.generate(x, y=np.eye(10)[y])
    finally:
        np.random.set_state(state)
    assert np.abs(theirs_adv - x).max() <= eps + 1e-6
    theirs = _robust(predict, theirs_adv, y)
    ours = square_attack(predict, x, y, eps, n_queries=budget, p_init=0.8, seed=0)
    assert ours.robust_acc == pytest.approx(_robust(predict, ours.x_adv, y))
    assert 0.2 <= theirs <= 0.9 and 0.1 <= ours.robust_acc <= 0.8, (theirs, ours.robust_acc)  # real work to do
    assert ours.robust_acc <= theirs + 0.02, (ours.robust_acc, theirs)


def test_equal_moves_cross_plateaus_of_quantized_scores(mlp_digits: tuple[np.ndarray, np.ndarray, Predict]) -> None:
    """Logits rounded to a grid of 1.0 (like an INT8 output): strict acceptance stalls on the plateaus."""
    x, y, predict = mlp_digits

    def quantized(batch: np.ndarray) -> np.ndarray:
        return np.round(predict(batch))

    equal = square_attack(quantized, x, y, 0.1, n_queries=300, seed=0)
    strict = square_attack(quantized, x, y, 0.1, n_queries=300, seed=0, accept_equal=False)
    assert equal.flat_fraction > 0.3 and strict.flat_fraction > 0.3
    assert equal.robust_acc <= strict.robust_acc - 0.05, (equal.robust_acc, strict.robust_acc)
    smooth = square_attack(predict, x, y, 0.1, n_queries=300, seed=0)
    assert smooth.flat_fraction < 0.1


def test_x_init_start_is_never_worse_than_the_start(mlp_digits: tuple[np.ndarray, np.ndarray, Predict]) -> None:
    x, y, predict = mlp_digits
    eps = 0.1
    strong = square_attack(predict, x, y, eps, n_queries=300, seed=1)
    noise = np.random.default_rng(0).uniform(-3 * eps, 3 * eps, size=x.shape).astype(np.float32)
    starts = [x + noise, strong.x_adv]  # the first is outside the ball: projected
    result = square_attack(predict, x, y, eps, n_queries=30, seed=0, x_init=starts)
    assert np.abs(result.x_adv - x).max() <= eps + 1e-6 and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    projected = [np.clip(np.clip(s, x - eps, x + eps), 0, 1) for s in starts]
    start_margin = np.min([margin(predict(p), y) for p in projected], axis=0)
    attacked = result.start >= 0
    # an example is either fooled (the attack stops at the first fooling start) or at most at its best start's margin
    assert (result.success | (result.margins <= start_margin + 1e-6))[attacked].all()
    assert attacked.sum() >= 80 and (~result.success[attacked]).sum() >= 20
    assert result.success[strong.success].all()  # every example the start breaks stays broken
    assert result.robust_acc <= strong.robust_acc
    assert (result.start[strong.success & (result.start >= 0)] >= 1).mean() > 0.8  # the fooling start was picked
    assert result.queries.max() <= 30
    with pytest.raises(CstarError, match="x_init"):
        square_attack(predict, x, y, eps, x_init=[x[:3]])


def test_restarts_only_query_still_robust_examples(mlp_digits: tuple[np.ndarray, np.ndarray, Predict]) -> None:
    x, y, predict = mlp_digits
    calls: list[int] = []

    def counting(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.shape[0])
        return predict(batch)

    one = square_attack(predict, x, y, 0.1, n_queries=40, seed=0)
    two = square_attack(counting, x, y, 0.1, n_queries=40, seed=0, n_restarts=2)
    assert two.success[one.success].all() and two.robust_acc < one.robust_acc
    first_run = 1 + 40  # clean check, then at most 40 queries in the first run
    still_robust = int((~one.success).sum())
    assert calls[first_run] == still_robust  # the second run's init: only examples the first run left robust
    assert max(calls[first_run:]) == still_robust
    assert sum(calls[1:]) == int(two.queries.sum()) and two.queries.max() <= 2 * 40
    assert (two.queries[one.success] == one.queries[one.success]).all()


def test_l2_stays_on_the_ball_and_lowers_accuracy(mlp_digits: tuple[np.ndarray, np.ndarray, Predict]) -> None:
    x, y, predict = mlp_digits
    big = np.repeat(np.repeat(x, 2, axis=2), 2, axis=3)  # 16x16, so windows and the init grid have room

    def predict16(batch: np.ndarray) -> np.ndarray:
        return predict(batch.reshape(len(batch), 1, 8, 2, 8, 2).mean(axis=(3, 5)))

    eps = 1.5
    result = square_attack(predict16, big, y, eps, n_queries=200, norm="l2", seed=0)
    norms = np.sqrt(((result.x_adv.astype(np.float64) - big) ** 2).reshape(len(big), -1).sum(axis=1))
    assert norms.max() <= eps * (1 + 1e-5) and result.x_adv.min() >= 0 and result.x_adv.max() <= 1
    assert result.robust_acc == pytest.approx(_robust(predict16, result.x_adv, y))
    assert _robust(predict16, big, y) - result.robust_acc >= 0.25
    again = square_attack(predict16, big, y, eps, n_queries=200, norm="l2", seed=0)
    assert np.array_equal(again.x_adv, result.x_adv)
    bump = meta_pseudo_gaussian(5)
    assert np.sum(bump ** 2) == pytest.approx(1.0) and bump[:2].sum() > 0 > bump[2:].sum()
