"""Calibrate a latency table on whole models: fit how its ops cost INSIDE a model (torch-free, numpy).

A micro-graph runs one op again and again: its weights and input stay hot in cache and nothing runs
between its calls. Inside a whole model every op is a little slower (measured on ONNX Runtime CPU,
ResNet-18 at CIFAR shapes: 1.1-1.25x for small factorized convs, more where weights exceed the per-core
cache), and the table's first calibration, on the dense model alone, cannot tell a per-op slowdown
from weight streaming. `cstar profile` therefore also times a few reference models built from the
same architecture (uniform Tucker-2 and uniform pruning at grid widths, deploy forms by the table) and
fits, per batch size, the coefficients of `LatencyTable.model_price`:

    call_ms = rest + op_scale * alone_ms + weight_ms_per_mb * beyond_mib + stream_ms_per_mb * weight_mib
              + node_ms * extra_nodes + spill_ms_per_mb * max(0, weight_mib - spill_cache_mib)

over the dense and reference models, minimising the squared RELATIVE error (a small model counts as
much as the dense one) with every coefficient >= 0 (and op_scale > 0). `rest` (the call overhead and
the nodes the table does not price) stays as measured when the profile measured it (ort-cpu kernel
timing); otherwise it is fitted as well. `node_ms` (what one more node of a deploy form costs) is
measured on a chain of tiny convs, and may be refitted too: on digits' small-resnet at batch 8 the
measured 3.7 us per extra node overpriced every factorized model by 5-16% while the dense and pruned
ones fitted within 2% (fitted: ~0; the factor convs' own kernel time already holds their dispatch).
The spill term is the shared cache (L3) seen from one model: the weights of a model below
`spill_cache_mib` stay in it between calls, those of a larger one come from memory. On this project's
2-core VM (L3 shared with other tenants) batch 1 showed it plainly: with per-op terms only, ResNet-18
models of 8-12 MiB of weights ran 6-9% slower than priced and models of 4-7 MiB up to 11% faster (26
models at CIFAR shapes fitted in-sample: worst error 11.4%; with the hinge at ~5 MiB, 4.3%; the
profile's own fit on its 18 references: 12.4-13.6% before, 6.6-6.7% with the spill). The cache size is
searched on a grid between the timed models' weights (at least two models on each side), never below the
per-core cache (weights that fit there do not spill: digits' models fit no spill).
Every subset of the optional coefficients is solved and the best feasible one kept, so a coefficient
the data does not support keeps its measured value (node_ms, rest) or 0 (weight_ms_per_mb, stream, spill).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

from cstar.latency_table import CostParts


@dataclass(frozen=True)
class CalibrationPoint:
    """One whole model timed on the runtime at one batch size, and its cost parts in the table's terms."""

    name: str
    parts: CostParts
    measured_ms: float


@dataclass(frozen=True)
class CalibrationFit:
    """The fitted price of one batch size and how well it predicts the models it was fitted on."""

    op_scale: float
    weight_ms_per_mb: float
    rest_ms: float
    node_ms: float
    points: tuple[CalibrationPoint, ...]
    stream_ms_per_mb: float = 0.0
    spill_ms_per_mb: float = 0.0
    spill_cache_mib: float = 0.0

    def predict(self, parts: CostParts) -> float:
        return (self.rest_ms + self.op_scale * parts.alone_ms + self.weight_ms_per_mb * parts.beyond_mib
                + self.stream_ms_per_mb * parts.weight_mib + self.node_ms * parts.extra_nodes
                + self.spill_ms_per_mb * max(0.0, parts.weight_mib - self.spill_cache_mib))

    def errors(self) -> dict[str, float]:
        """{model: (predicted - measured) / measured}."""
        return {p.name: (self.predict(p.parts) - p.measured_ms) / p.measured_ms for p in self.points}

    def to_dict(self, before: dict[str, float] | None = None) -> dict[str, Any]:
        """Manifest/table block: coefficients and per model measured, predicted, error (and error before)."""
        models = []
        for point in self.points:
            predicted = self.predict(point.parts)
            row: dict[str, Any] = {"model": point.name, "measured_ms": round(point.measured_ms, 5),
                                   "predicted_ms": round(predicted, 5),
                                   "error": round((predicted - point.measured_ms) / point.measured_ms, 4)}
            if before is not None and point.name in before:
                row["predicted_uncalibrated_ms"] = round(before[point.name], 5)
            models.append(row)
        worst = max((abs(m["error"]) for m in models), default=0.0)
        return {"op_scale": self.op_scale, "weight_ms_per_mb": self.weight_ms_per_mb,
                "stream_ms_per_mb": self.stream_ms_per_mb, "spill_ms_per_mb": self.spill_ms_per_mb,
                "spill_cache_mib": self.spill_cache_mib, "rest_ms": self.rest_ms,
                "node_ms": self.node_ms, "max_abs_error": worst, "models": models}


SPILL_GRID_POINTS = 24  # candidate shared-cache sizes, geometric between the timed models' weights
MIN_SIDE = 2  # models a spill cache size must leave on each side (one model alone would fix the rate)


def spill_caches(weights: np.ndarray, floor_mib: float = 0.0) -> list[float]:
    """Candidate spill_cache_mib values: a geometric grid over the models' weight MiB, none below `floor_mib` (the
    per-core cache: weights that fit it do not spill), that leaves MIN_SIDE models at or below and MIN_SIDE above."""
    ordered = np.sort(weights)
    low = max(float(ordered[0]) if len(ordered) else 0.0, floor_mib)
    if len(ordered) < 2 * MIN_SIDE or low <= 0 or low >= ordered[-1]:
        return []
    grid = np.geomspace(low, ordered[-1], SPILL_GRID_POINTS)
    return [float(c) for c in grid if (ordered <= c).sum() >= MIN_SIDE and (ordered > c).sum() >= MIN_SIDE]


def fit_price(points: list[CalibrationPoint], node_ms: float, rest_ms: float | None,
              spill_floor_mib: float = 0.0) -> CalibrationFit:
    """Least relative-squared-error fit of op_scale, weight_ms_per_mb, stream_ms_per_mb, node_ms and the spill
    (rate and cache size) (and rest when `rest_ms` is None), all >= 0, op_scale > 0: every subset of the free
    coefficients (and every candidate spill cache) is solved and the best feasible kept (node_ms outside the
    subset: the measured `node_ms`); the spill cache is never below `spill_floor_mib` (the per-core cache)."""
    if not points:
        raise ValueError("fit_price needs at least one timed model")
    measured = np.array([p.measured_ms for p in points], dtype=np.float64)
    nodes = np.array([p.parts.extra_nodes for p in points], dtype=np.float64)
    weights = np.array([p.parts.weight_mib for p in points], dtype=np.float64)
    columns = {"op_scale": np.array([p.parts.alone_ms for p in points]),
               "weight_ms_per_mb": np.array([p.parts.beyond_mib for p in points]),
               "stream_ms_per_mb": weights, "node_ms": nodes, "spill_ms_per_mb": np.zeros(len(points))}
    if rest_ms is None:
        columns["rest_ms"] = np.ones(len(points))
    known = measured - (rest_ms if rest_ms is not None else 0.0)
    weight = 1.0 / measured
    caches = spill_caches(weights, spill_floor_mib)
    best: tuple[float, dict[str, float]] | None = None
    optional = [name for name in columns if name != "op_scale"]
    for size in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, size):
            names = ["op_scale", *chosen]
            target = known if "node_ms" in chosen else known - node_ms * nodes
            for cache in (caches if "spill_ms_per_mb" in chosen else [0.0]):
                columns["spill_ms_per_mb"] = np.maximum(weights - cache, 0.0)
                solved = _solve(np.stack([columns[n] for n in names], axis=1), target, weight)
                if solved is not None and (best is None or solved[0] < best[0] - 1e-15):
                    coef = dict(zip(names, solved[1], strict=True))
                    if "spill_ms_per_mb" in chosen:
                        coef["spill_cache_mib"] = cache
                    best = (solved[0], coef)
    if best is None:  # nothing feasible (e.g. every model faster than its ops alone): plain ratio of sums
        target = known - node_ms * nodes
        scale = float(max(np.sum(target), 1e-9) / max(np.sum(columns["op_scale"]), 1e-9))
        best = (0.0, {"op_scale": scale})
    coef = best[1]
    return CalibrationFit(coef["op_scale"], coef.get("weight_ms_per_mb", 0.0),
                          coef.get("rest_ms", 0.0) if rest_ms is None else rest_ms, coef.get("node_ms", node_ms),
                          tuple(points), coef.get("stream_ms_per_mb", 0.0), coef.get("spill_ms_per_mb", 0.0),
                          coef.get("spill_cache_mib", 0.0))


def _solve(design: np.ndarray, target: np.ndarray, weight: np.ndarray) -> tuple[float, list[float]] | None:
    """(weighted squared residual, coefficients) of the least-squares fit, None when it is rank deficient or
    infeasible (first coefficient <= 0 or another < 0)."""
    if np.linalg.matrix_rank(design) < design.shape[1]:
        return None
    solution, *_ = np.linalg.lstsq(design * weight[:, None], target * weight, rcond=None)
    if solution[0] <= 0 or (solution[1:] < -1e-12).any():
        return None
    solution = np.concatenate([solution[:1], np.maximum(solution[1:], 0.0)])
    return float(np.sum(((design @ solution - target) * weight) ** 2)), [float(c) for c in solution]
