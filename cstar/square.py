"""Square attack (Andriushchenko et al., ECCV 2020), Linf and L2, untargeted margin loss; numpy only.

Score-based black-box attack: it only needs `predict(x) -> logits`, so it runs against any runtime
(ONNX Runtime, TensorRT, a torch model through `cstar.attacks.torch_predict_fn`). Device side: this
module imports numpy and the standard library only, never torch.

Linf (the paper's `square_attack_linf`, at AutoAttack's strength: p_init 0.8): start from vertical
stripes of +-eps, then at every iteration propose, for each still-correct example, a random square
window of side s (s shrinks with the paper's p schedule) whose perturbation is reset to +-eps per
channel. L2 (the paper's `square_attack_l2`): start from a grid of +-"meta pseudo-gaussian" bumps
scaled to the eps sphere; each proposal moves the mass of a second window into a new bump in the
first window, keeping the perturbation on the sphere.

Two additions to the paper, both for attacking deployed runtimes:
- equal-margin moves are accepted (`<=`, the paper keeps only strict improvements). On float logits
  ties essentially never happen, so nothing changes there; on quantized runtimes logits move in
  steps and proposals tie (5% of them on the digits INT8 demo, most of them when logits are coarsely
  rounded): strict acceptance freezes an example on its plateau, `<=` random-walks across it until a
  step down appears (digits INT8, 1000 queries: robust 0.365 vs 0.385 strict; logits rounded to 1.0 on
  a small MLP: 0.58 vs 0.69). A tie-break on a smoother score (true logit - logsumexp of the others)
  was measured too and is worse (0.64): it turns the random walk back into a greedy search.
- `x_init`: extra start points (e.g. transfer adversarial examples crafted on the reference); each
  example starts from whichever start has the lowest margin.
One batched `predict` call per iteration covers all active examples; an example stops being queried
as soon as it is misclassified (argmax != label, the same test verify applies).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from cstar.errors import CstarError

Predict = Callable[[np.ndarray], np.ndarray]
NORMS = ("linf", "l2")
P_INIT = 0.8  # AutoAttack's Square (Linf and L2); the paper used 0.05 (Linf) / 0.1 (L2) on undefended models

# (upper bound of iteration, rescaled to a 10000-iteration run) -> divisor of p_init
_P_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
               (8000, 256), (10000, 512))


@dataclass
class SquareResult:
    """Outcome of `square_attack`.

    `x_adv`: adversarial inputs (same shape as x, in the eps-ball and [0,1]); `queries`: attack queries
    per example over every restart (0 for examples misclassified without attack); `success`: the
    final input is misclassified (True as well for examples that were already wrong); `n_queries`:
    the budget per restart. `margins`: final margin per example (logit_y - max other; <= 0 when
    fooled); `start`: the start each example's first run began from (-1 not attacked, 0 the
    algorithm's own init, k >= 1 `x_init[k-1]`); `flat_fraction`: share of proposals whose margin
    tied the current best exactly (near 0 on float logits, high on quantized ones).
    """

    x_adv: np.ndarray
    queries: np.ndarray
    success: np.ndarray
    n_queries: int
    margins: np.ndarray = field(default_factory=lambda: np.zeros(0))
    start: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    restarts: int = 1
    flat_fraction: float = 0.0
    norm: str = "linf"
    p_init: float = P_INIT

    @property
    def robust_acc(self) -> float:
        """Fraction of examples still correctly classified after the attack."""
        return float(1.0 - self.success.mean()) if self.success.size else 0.0

    @property
    def mean_queries(self) -> float:
        """Mean queries over the examples the attack had to query (clean-correct ones)."""
        used = self.queries[self.queries > 0]
        return float(used.mean()) if used.size else 0.0


@dataclass
class _Run:
    """One restart on the still-correct examples."""

    best: np.ndarray
    margin: np.ndarray
    fooled: np.ndarray
    used: np.ndarray
    start: np.ndarray
    flat: int = 0
    proposals: int = 0


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


# ------------------------------------------------------------------------------------------ checks

def _check_inputs(x: np.ndarray, y: np.ndarray, eps: float, n_queries: int, p_init: float, norm: str,
                  n_restarts: int, seed: int) -> None:
    if x.ndim != 4:
        raise CstarError(f"square_attack needs NCHW inputs, got shape {x.shape}", "pass a batch of images")
    if y.shape != (x.shape[0],):
        raise CstarError(f"labels shape {y.shape} does not match {x.shape[0]} inputs", "pass one label per input")
    if norm not in NORMS:
        raise CstarError(f"unknown norm '{norm}' for the Square attack", f"use one of: {', '.join(NORMS)}")
    if not np.isfinite(eps) or eps < 0:
        raise CstarError(f"eps must be >= 0, got {eps}", "pass a non-negative eps (inputs are [0,1] pixels)")
    if n_queries < 0:
        raise CstarError(f"n_queries must be >= 0, got {n_queries}", "pass a non-negative query budget")
    if not 0 < p_init <= 1:
        raise CstarError(f"p_init must be in (0, 1], got {p_init}",
                         "AutoAttack uses 0.8 (robust models need large early squares)")
    if n_restarts < 1:
        raise CstarError(f"n_restarts must be >= 1, got {n_restarts}", "pass 1 for a single run")
    if seed < 0:
        raise CstarError(f"seed must be >= 0, got {seed}", "pass a non-negative seed")
    if not np.isfinite(x).all() or x.min(initial=0.0) < 0 or x.max(initial=0.0) > 1:
        raise CstarError("square_attack inputs must be finite pixels in [0, 1]", "scale images to [0, 1] first")


def _check_starts(x_init: np.ndarray | Sequence[np.ndarray] | None, x: np.ndarray) -> list[np.ndarray]:
    """x_init as a list of arrays shaped like x: None, one array like x, a stack (K, *x.shape) or a list."""
    if x_init is None:
        return []
    if isinstance(x_init, np.ndarray) and x_init.ndim == x.ndim:
        x_init = [x_init]
    starts = [np.asarray(s, dtype=np.float32) for s in x_init]
    for start in starts:
        if start.shape != x.shape:
            raise CstarError(f"x_init start of shape {start.shape} does not match the inputs {x.shape}",
                             "pass start points shaped like x (one per example)")
        if not np.isfinite(start).all():
            raise CstarError("x_init contains NaN or Inf", "pass finite start points")
    return starts


def _logits(predict: Predict, x: np.ndarray) -> np.ndarray:
    out = np.asarray(predict(np.ascontiguousarray(x, dtype=np.float32)))
    if out.ndim != 2 or out.shape[0] != x.shape[0]:
        raise CstarError(f"predict returned shape {out.shape} for {x.shape[0]} inputs", "predict must return logits (N, K)")
    return out


def _score(predict: Predict, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(margin, misclassified) of a batch; misclassified uses argmax, as every caller checks it."""
    logits = _logits(predict, x)
    return margin(logits, y), logits.argmax(axis=1) != y


# ------------------------------------------------------------------------------------------ Linf

def _windows(n: int, h: int, w: int, side: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (n, side) of one random side x side window per example."""
    top = rng.integers(0, h - side + 1, size=n)
    left = rng.integers(0, w - side + 1, size=n)
    return top[:, None] + np.arange(side)[None, :], left[:, None] + np.arange(side)[None, :]


def _window_index(n: int, c: int, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, ...]:
    return (np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
            rows[:, None, :, None], cols[:, None, None, :])


def _side(p: float, h: int, w: int, minimum: int = 1) -> int:
    side = int(round(np.sqrt(p * h * w)))
    return min(max(side, minimum), max(min(h, w) - 1, 1))


def _propose_linf(x: np.ndarray, x_best: np.ndarray, eps: float, p: float, rng: np.random.Generator) -> np.ndarray:
    """New candidates: for each example, a random s x s window re-drawn to +-eps per channel."""
    n, c, h, w = x.shape
    index = _window_index(n, c, *_windows(n, h, w, _side(p, h, w), rng))
    x_win, best_win = x[index], x_best[index]
    deltas = x_best - x
    new = deltas[index]
    pending = np.ones(n, dtype=bool)
    for _ in range(100):  # redraw windows that would not change x_best (the paper's while loop)
        draw = rng.choice(np.array([-eps, eps], dtype=x.dtype), size=(int(pending.sum()), c, 1, 1))
        new[pending] = np.broadcast_to(draw, new[pending].shape)
        pending = np.all(np.abs(np.clip(x_win + new, 0, 1) - best_win) < 1e-7, axis=(1, 2, 3))
        if not pending.any():
            break
    deltas[index] = new
    return np.clip(x + deltas, 0.0, 1.0)


def _init_linf(x: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    n, c, _, w = x.shape
    return x + rng.choice(np.array([-eps, eps], dtype=np.float32), size=(n, c, 1, w))


# ------------------------------------------------------------------------------------------ L2

def _pseudo_gaussian(rows: int, cols: int) -> np.ndarray:
    """The paper's `pseudo_gaussian_pert_rectangles`: nested rectangles weighted 1/(k+1)^2, unit norm."""
    delta = np.zeros((rows, cols))
    r_c, c_c = rows // 2, cols // 2
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r_c - k, 0):min(r_c - k + 2 * k + 1, rows), max(c_c - k, 0):min(c_c - k + 2 * k + 1, cols)] \
            += 1.0 / (k + 1) ** 2
    return delta / max(np.sqrt(np.sum(delta ** 2)), 1e-12)


def meta_pseudo_gaussian(side: int, transpose: bool = False) -> np.ndarray:
    """The paper's `meta_pseudo_gaussian_pert`: a +bump over a -bump in a side x side square, unit L2 norm."""
    delta = np.zeros((side, side))
    delta[:side // 2] = _pseudo_gaussian(side // 2, side)
    delta[side // 2:] = -_pseudo_gaussian(side - side // 2, side)
    delta /= max(np.sqrt(np.sum(delta ** 2)), 1e-12)
    return delta.T if transpose else delta


def _l2_norms(delta: np.ndarray, axis: tuple[int, ...] = (1, 2, 3)) -> np.ndarray:
    return np.sqrt(np.sum(delta.astype(np.float64) ** 2, axis=axis, keepdims=True))


def _init_l2(x: np.ndarray, eps: float, rng: np.random.Generator) -> np.ndarray:
    """A 5 x 5 grid (h//5 squares) of meta pseudo-gaussian bumps with random signs, scaled to norm eps."""
    n, c, h, w = x.shape
    side = max(min(h, w) // 5, 1)
    delta = np.zeros(x.shape)
    bump = meta_pseudo_gaussian(side)[None, None]
    top0, left0 = (h - side * 5) // 2 if h >= 5 * side else 0, (w - side * 5) // 2 if w >= 5 * side else 0
    for top in range(max(top0, 0), h - side + 1, side):
        for left in range(max(left0, 0), w - side + 1, side):
            delta[:, :, top:top + side, left:left + side] += bump * rng.choice([-1.0, 1.0], size=(n, c, 1, 1))
    return x + delta / np.maximum(_l2_norms(delta), 1e-12) * eps


def _propose_l2(x: np.ndarray, x_best: np.ndarray, eps: float, p: float, rng: np.random.Generator) -> np.ndarray:
    """The paper's L2 update, one window pair per example: window 2's mass moves into a new bump in window 1."""
    n, c, h, w = x.shape
    side = _side(p, h, w, minimum=3)
    side = min(side + 1 - side % 2, max(min(h, w) - 1, 1))  # odd, as in the paper
    delta = (x_best - x).astype(np.float64)
    index1 = _window_index(n, c, *_windows(n, h, w, side, rng))
    index2 = _window_index(n, c, *_windows(n, h, w, side, rng))
    mask1, mask2 = np.zeros(x.shape, dtype=bool), np.zeros(x.shape, dtype=bool)
    mask1[index1] = True
    mask2[index2] = True
    norm_win1 = _l2_norms(delta[index1], (2, 3))
    norm_image = _l2_norms(delta)
    norm_windows = _l2_norms(delta * (mask1 | mask2), (2, 3))
    bump = meta_pseudo_gaussian(side)
    flip = np.asarray(rng.random(n) > 0.5).reshape(n, 1, 1, 1)  # the paper's random transpose
    bumps = np.where(flip, bump.T[None, None], bump[None, None])
    new = bumps * rng.choice([-1.0, 1.0], size=(n, c, 1, 1)) + delta[index1] / (1e-10 + norm_win1)
    budget = np.sqrt(np.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
    new = new / np.maximum(_l2_norms(new, (2, 3)), 1e-12) * budget
    delta[index2] = 0.0
    delta[index1] = new
    delta = delta / np.maximum(_l2_norms(delta), 1e-12) * eps
    return np.clip(x + delta, 0.0, 1.0)


# ------------------------------------------------------------------------------------------ shared

def _project(x: np.ndarray, x_adv: np.ndarray, eps: float, norm: str = "linf") -> np.ndarray:
    """Into the eps-ball around x (Linf clip or L2 rescale) and [0,1]; guards float rounding."""
    if norm == "linf":
        out = np.clip(x_adv, x - eps, x + eps)
    else:
        delta = (x_adv - x).astype(np.float64)
        norms = _l2_norms(delta)
        out = x + delta * np.where(norms > eps, eps / np.maximum(norms, 1e-12) * (1 - 1e-6), 1.0)
    return np.clip(out, 0.0, 1.0).astype(x.dtype, copy=False)


_INIT = {"linf": _init_linf, "l2": _init_l2}
_PROPOSE = {"linf": _propose_linf, "l2": _propose_l2}


def _start(predict: Predict, xs: np.ndarray, ys: np.ndarray, eps: float, norm: str, rng: np.random.Generator,
           starts: list[np.ndarray]) -> _Run:
    """Evaluate the algorithm's own init, then each extra start on the examples not yet fooled; keep the best."""
    best = _project(xs, _INIT[norm](xs, eps, rng), eps, norm)
    best_margin, fooled = _score(predict, best, ys)
    run = _Run(best, best_margin, fooled, np.ones(len(xs), dtype=np.int64), np.zeros(len(xs), dtype=np.int64))
    for k, start in enumerate(starts, start=1):
        active = np.flatnonzero(~run.fooled)
        if active.size == 0:
            break
        candidate = _project(xs[active], start[active], eps, norm)
        new_margin, new_fooled = _score(predict, candidate, ys[active])
        run.used[active] += 1
        take = new_fooled | (new_margin < run.margin[active])
        _accept(run, active[take], candidate[take], new_margin[take], new_fooled[take])
        run.start[active[take]] = k
    return run


def _accept(run: _Run, idx: np.ndarray, candidate: np.ndarray, new_margin: np.ndarray, new_fooled: np.ndarray) -> None:
    run.best[idx] = candidate
    run.margin[idx] = new_margin
    run.fooled[idx] = new_fooled


def _single_run(predict: Predict, xs: np.ndarray, ys: np.ndarray, eps: float, n_queries: int, p_init: float,
                norm: str, rng: np.random.Generator, starts: list[np.ndarray], accept_equal: bool) -> _Run:
    """One Square run (starts included in the n_queries budget) on still-correct examples."""
    run = _start(predict, xs, ys, eps, norm, rng, starts)
    propose = _PROPOSE[norm]
    for iteration in range(n_queries - 1 - len(starts)):
        active = np.flatnonzero(~run.fooled)
        if active.size == 0:
            break
        p = p_selection(p_init, iteration, n_queries)
        candidate = _project(xs[active], propose(xs[active], run.best[active], eps, p, rng), eps, norm)
        new_margin, new_fooled = _score(predict, candidate, ys[active])
        run.used[active] += 1
        old = run.margin[active]
        run.flat += int(np.count_nonzero(new_margin == old))
        run.proposals += int(active.size)
        better = new_margin <= old if accept_equal else new_margin < old
        take = new_fooled | better
        _accept(run, active[take], candidate[take], new_margin[take], new_fooled[take])
    return run


def square_attack(
    predict: Predict,
    x: np.ndarray,
    y: np.ndarray,
    eps: float,
    n_queries: int = 1000,
    p_init: float = P_INIT,
    seed: int = 0,
    *,
    norm: str = "linf",
    n_restarts: int = 1,
    x_init: np.ndarray | Sequence[np.ndarray] | None = None,
    accept_equal: bool = True,
) -> SquareResult:
    """Square attack on `predict` (numpy NCHW [0,1] -> logits); deterministic for a seed.

    `n_queries` is the budget per example and restart (the starts count against it). Each restart
    attacks only the examples still correctly classified, with a fresh random stream; the first run
    also tries `x_init` (start points shaped like x, or a list/stack of them; projected into the
    eps-ball and [0,1]). p_init defaults to AutoAttack's 0.8. One extra `predict` call
    on the clean inputs selects the examples to attack (not counted in `queries`). eps == 0 or
    n_queries == 0 returns x unchanged.
    """
    x = np.asarray(x, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    p_init = float(p_init)
    _check_inputs(x, y, eps, n_queries, p_init, norm, n_restarts, seed)
    starts = _check_starts(x_init, x)[: max(n_queries - 1, 0)]
    n = x.shape[0]
    x_adv, queries, start = x.copy(), np.zeros(n, dtype=np.int64), np.full(n, -1, dtype=np.int64)
    margins, success = _score(predict, x, y) if n else (np.zeros(0), np.zeros(0, dtype=bool))
    flat = proposals = 0
    for restart in range(n_restarts if eps > 0 and n_queries > 0 else 0):
        todo = np.flatnonzero(~success)
        if todo.size == 0:
            break
        first = restart == 0
        run = _single_run(predict, x[todo], y[todo], eps, n_queries, p_init, norm, np.random.default_rng([seed, restart]),
                          [s[todo] for s in starts] if first else [], accept_equal)
        queries[todo] += run.used
        keep = np.ones(todo.size, dtype=bool) if first else run.fooled | (run.margin < margins[todo])
        x_adv[todo[keep]] = run.best[keep]
        margins[todo[keep]] = run.margin[keep]
        success[todo] = run.fooled
        if first:
            start[todo] = run.start
        flat, proposals = flat + run.flat, proposals + run.proposals
    return SquareResult(x_adv, queries, success, n_queries, margins, start, n_restarts,
                        flat / proposals if proposals else 0.0, norm, p_init)
