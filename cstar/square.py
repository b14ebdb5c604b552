"""Square attack (Andriushchenko et al., ECCV 2020), Linf, untargeted margin loss; numpy only.

Score-based black-box attack: it only needs `predict(x) -> logits`, so it runs against any runtime
(ONNX Runtime, TensorRT, a torch model through `cstar.attacks.torch_predict_fn`). Device side: this
module imports numpy and the standard library only, never torch.

Algorithm (the paper's `square_attack_linf`): start from vertical stripes of +-eps, then at every
iteration propose, for each still-correct example, a random square window of side s (s shrinks with
the paper's p schedule) whose perturbation is reset to +-eps per channel; keep the proposal when it
lowers the margin `logit_y - max_{j != y} logit_j`. One batched `predict` call per iteration covers
all active examples; an example stops being queried once it is misclassified.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cstar.errors import CstarError

Predict = Callable[[np.ndarray], np.ndarray]

# (upper bound of iteration, rescaled to a 10000-iteration run) -> divisor of p_init
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
               (8000, 256), (10000, 512))


@dataclass
class SquareResult:
    """Outcome of `square_attack`.

    `x_adv`: adversarial inputs (same shape as x, in the eps-ball and [0,1]); `queries`: attack queries
    per example (0 for examples misclassified without attack); `success`: the final input is
    misclassified (True as well for examples that were already wrong); `n_queries`: the budget.
    """

    x_adv: np.ndarray
    queries: np.ndarray
    success: np.ndarray
    n_queries: int

    @property
    def robust_acc(self) -> float:
        """Fraction of examples still correctly classified after the attack."""
        return float(1.0 - self.success.mean()) if self.success.size else 0.0

    @property
    def mean_queries(self) -> float:
        """Mean queries over the examples the attack had to query (clean-correct ones)."""
        used = self.queries[self.queries > 0]
        return float(used.mean()) if used.size else 0.0


def p_selection(p_init: float, iteration: int, n_iters: int) -> float:
    """Fraction of pixels changed at `iteration` (the paper's piecewise-constant schedule)."""
    it = int(iteration / max(n_iters, 1) * 10000)
    if it <= 10:
        return p_init
    for bound, divisor in _P_SCHEDULE[1:]:
        if it <= bound:
            return p_init / divisor
    return p_init


def margin(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """logit of the true class minus the largest other logit (negative = misclassified)."""
    logits = np.asarray(logits, dtype=np.float64)
    rows = np.arange(logits.shape[0])
    correct = logits[rows, y]
    others = logits.copy()
    others[rows, y] = -np.inf
    return correct - others.max(axis=1)


def _check_inputs(x: np.ndarray, y: np.ndarray, eps: float, n_queries: int, p_init: float) -> None:
    if x.ndim != 4:
        raise CstarError(f"square_attack needs NCHW inputs, got shape {x.shape}", "pass a batch of images")
    if y.shape != (x.shape[0],):
        raise CstarError(f"labels shape {y.shape} does not match {x.shape[0]} inputs", "pass one label per input")
    if eps < 0:
        raise CstarError(f"eps must be >= 0, got {eps}", "pass a non-negative eps (inputs are [0,1] pixels)")
    if n_queries < 0:
        raise CstarError(f"n_queries must be >= 0, got {n_queries}", "pass a non-negative query budget")
    if not 0 < p_init <= 1:
        raise CstarError(f"p_init must be in (0, 1], got {p_init}", "the paper uses 0.05 (0.3 for MNIST-like data)")
    if not np.isfinite(x).all() or x.min(initial=0.0) < 0 or x.max(initial=0.0) > 1:
        raise CstarError("square_attack inputs must be finite pixels in [0, 1]", "scale images to [0, 1] first")


def _logits(predict: Predict, x: np.ndarray) -> np.ndarray:
    out = np.asarray(predict(np.ascontiguousarray(x, dtype=np.float32)))
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise CstarError(f"predict returned shape {out.shape} for {x.shape[0]} inputs", "predict must return logits (N, K)")
    return out


def _propose(
    x: np.ndarray, x_best: np.ndarray, eps: float, p: float, rng: np.random.Generator
) -> np.ndarray:
    """New candidates: for each example, a random s x s window re-drawn to +-eps per channel."""
    n, c, h, w = x.shape
    side = int(round(np.sqrt(p * h * w)))
    side = min(max(side, 1), max(min(h, w) - 1, 1))
    deltas = x_best - x
    top = rng.integers(0, h - side + 1, size=n) if h > side else np.zeros(n, dtype=np.int64)
    left = rng.integers(0, w - side + 1, size=n) if w > side else np.zeros(n, dtype=np.int64)
    rows = top[:, None] + np.arange(side)[None, :]
    cols = left[:, None] + np.arange(side)[None, :]
    index = (np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
             rows[:, None, :, None], cols[:, None, None, :])
    x_win, best_win = x[index], x_best[index]
    pending = np.ones(n, dtype=bool)
    new = deltas[index]
    for _ in range(100):  # redraw windows that would not change x_best (the paper's while loop)
        draw = rng.choice(np.array([-eps, eps], dtype=x.dtype), size=(int(pending.sum()), c, 1, 1))
        new[pending] = np.broadcast_to(draw, new[pending].shape)
        unchanged = np.all(np.abs(np.clip(x_win + new, 0, 1) - best_win) < 1e-7, axis=(1, 2, 3))
        pending = unchanged
        if not pending.any():
            break
    deltas[index] = new
    return np.clip(x + deltas, 0.0, 1.0)


def _project(x: np.ndarray, x_adv: np.ndarray, eps: float) -> np.ndarray:
    """Clip into the eps-ball around x and [0,1] (guards float rounding)."""
    return np.clip(np.clip(x_adv, x - eps, x + eps), 0.0, 1.0).astype(x.dtype, copy=False)


def square_attack(
    predict: Predict,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    n_queries: int = 1000,
    p_init: float = 0.05,
    seed: int = 0,
) -> SquareResult:
    """Linf Square attack on `predict` (numpy NCHW [0,1] -> logits); deterministic for a seed.

    One extra `predict` call on the clean inputs selects the examples to attack (not counted in
    `queries`). eps == 0 or n_queries == 0 returns x unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    _check_inputs(x, y, eps, n_queries, p_init)
    n = x.shape[0]
    queries = np.zeros(n, dtype=np.int64)
    x_adv = x.copy()
    if n == 0:
        return SquareResult(x_adv, queries, np.zeros(0, dtype=bool), n_queries)
    success = _logits(predict, x).argmax(axis=1) != y
    if eps == 0 or n_queries == 0:
        return SquareResult(x_adv, queries, success, n_queries)
    rng = np.random.default_rng(seed)
    todo = np.flatnonzero(~success)
    if todo.size == 0:
        return SquareResult(x_adv, queries, success, n_queries)
    xs, ys = x[todo], y[todo]
    c, w = xs.shape[1], xs.shape[3]
    stripes = rng.choice(np.array([-eps, eps], dtype=np.float32), size=(todo.size, c, 1, w))
    best = _project(xs, xs + stripes, eps)
    best_margin = margin(_logits(predict, best), ys)
    used = np.ones(todo.size, dtype=np.int64)
    for iteration in range(n_queries - 1):
        active = np.flatnonzero(best_margin >= 0)
        if active.size == 0:
            break
        p = p_selection(p_init, iteration, n_queries)
        candidate = _project(xs[active], _propose(xs[active], best[active], eps, p, rng), eps)
        new_margin = margin(_logits(predict, candidate), ys[active])
        used[active] += 1
        improved = new_margin < best_margin[active]
        best[active[improved]] = candidate[improved]
        best_margin[active[improved]] = new_margin[improved]
    x_adv[todo] = best
    queries[todo] = used
    success[todo] = best_margin < 0
    return SquareResult(x_adv, queries, success, n_queries)
