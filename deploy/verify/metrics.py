"""The measurements of verify: accuracy, agreement and robustness of the runtime and of the reference.

The runtime replays the clean inputs and every transfer attack of the set, then the score-based Square
attack (`cstar.square`, numpy) attacks the runtime itself on a class-stratified subset. The headline is
the per-example worst case over every attack, so a model whose robustness was lost in deployment (or
only hidden from the transfer attacks, e.g. gradient masking after INT8 quantization) reads as broken.
The reference side is read from the logits the set carries: no model runs for it, and no torch.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np

from cstar.square import NORMS as SQUARE_NORMS
from cstar.square import SquareResult, square_attack
from deploy.verify.attack_set import AttackSet
from deploy.verify.options import square_plan

if TYPE_CHECKING:
    from deploy.backends.base import Runner


def correct(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example top-1 correctness."""
    return np.asarray(logits).argmax(axis=1) == labels


def mean_of(mask: np.ndarray) -> float:
    """The fraction of True in `mask` (0 for an empty one)."""
    return float(mask.mean()) if mask.size else 0.0


def stratified_subset(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted class-stratified indices of `n` examples (all of them when n >= len)."""
    if n >= labels.shape[0]:
        return np.arange(labels.shape[0])
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [pool[i] for i in range(max(len(p) for p in pools)) for pool in pools if i < len(pool)]
    return np.sort(np.asarray(order[:n], dtype=np.int64))


def reference_metrics(attack_set: AttackSet) -> dict[str, Any]:
    """The reference's metrics from the logits the set carries (clean and each transfer attack)."""
    y = attack_set.labels
    clean = correct(attack_set.ref_clean, y)
    transfer = {a: correct(logits, y) for a, logits in attack_set.ref_adv.items()}
    worst = clean.copy()
    for mask in transfer.values():
        worst &= mask
    return {"clean_acc": mean_of(clean), "agreement": 1.0, "max_abs_diff": 0.0,
            "transfer": {a: mean_of(m) for a, m in transfer.items()}, "square": None,
            "worst_case_robust_acc": mean_of(worst), "n": attack_set.n}


def square_block(runner: Runner, attack_set: AttackSet, eps: float, norm: str, transfer_worst: np.ndarray,
                 clean: np.ndarray, queries: int | None, samples: int | None, p_init: float, seed: int,
                 restarts: int = 1, strict: bool = False
                 ) -> tuple[dict[str, Any] | None, np.ndarray | None, np.ndarray | None]:
    """Square on the runtime: (metrics block, subset indices, per-example robust mask) or Nones when skipped.

    Examples a transfer attack already breaks on this runtime count as broken: Square started from that
    transfer example is misclassified at its first query. Every other example is attacked from the best
    of Square's own start and the transfer examples. On the transfer-broken ones Square also runs from
    its own start alone (`alone_check`): examples known to be breakable that the black-box attack
    cannot break show it stalled (the stall warning), which transfer-started Square can no longer show.
    """
    queries, samples = square_plan(attack_set.n, queries, samples, strict)
    if queries <= 0 or samples <= 0 or norm not in SQUARE_NORMS:
        return None, None, None
    started = time.perf_counter()
    subset = stratified_subset(attack_set.labels, samples, seed)
    x, y = attack_set.x[subset], attack_set.labels[subset]
    known = (clean & ~transfer_worst)[subset]
    rest = ~known
    starts = [attack_set.adv[a][subset][rest] for a in sorted(attack_set.adv)]
    options: dict[str, Any] = {"n_queries": queries, "p_init": p_init, "seed": seed, "norm": norm}
    main = square_attack(runner.predict, x[rest], y[rest], eps, n_restarts=restarts, x_init=starts or None, **options)
    alone = square_attack(runner.predict, x[known], y[known], eps, **options)
    robust = np.zeros(subset.size, dtype=bool)
    robust[rest] = ~main.success
    survivors = transfer_worst[subset]
    block = {"queries": int(queries), "robust_acc": mean_of(robust), "n": int(subset.size),
             "mean_queries": main.mean_queries, "p_init": p_init, "restarts": restarts, "seed": seed, "strict": strict,
             "norm": norm, "started_from_transfer": bool(starts),
             "transfer_survivors": int(survivors.sum()), "broke_transfer_survivors": int((survivors & ~robust).sum()),
             "alone_check": alone_check(alone, known),
             "flat_fraction": round(main.flat_fraction, 4), "seconds": round(time.perf_counter() - started, 3)}
    return block, subset, robust


def alone_check(alone: SquareResult, known: np.ndarray) -> dict[str, Any]:
    """Square from its own start on the transfer-broken examples: how many of them it broke too."""
    return {"n": int(known.sum()), "broken": int(alone.success.sum()), "mean_queries": alone.mean_queries}


def runtime_metrics(runner: Runner, attack_set: AttackSet, eps: float, norm: str, square_args: dict[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runtime metrics and the per-example masks needed for the gate and warnings."""
    y = attack_set.labels
    logits = runner.predict(attack_set.x)
    clean = correct(logits, y)
    transfer = {a: correct(runner.predict(adv), y) for a, adv in attack_set.adv.items()}
    transfer_worst = clean.copy()
    for mask in transfer.values():
        transfer_worst &= mask
    square, subset, square_robust = square_block(runner, attack_set, eps, norm, transfer_worst, clean, **square_args)
    if subset is None:
        subset = np.arange(attack_set.n)
    worst = transfer_worst[subset].copy()
    if square_robust is not None:
        worst &= square_robust
    metrics = {
        "clean_acc": mean_of(clean),
        "agreement": mean_of(logits.argmax(axis=1) == attack_set.ref_clean.argmax(axis=1)),
        "max_abs_diff": float(np.abs(logits - attack_set.ref_clean).max()) if attack_set.n else 0.0,
        "transfer": {a: mean_of(m) for a, m in transfer.items()},
        "square": square,
        "worst_case_robust_acc": mean_of(worst),
        "worst_case_n": int(subset.size),
        "transfer_worst_case_robust_acc": mean_of(transfer_worst),
        "n": attack_set.n,
    }
    return metrics, {"subset": subset, "transfer": transfer}
