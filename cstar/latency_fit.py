"""Calibrate a latency table on whole models: fit how its ops cost INSIDE a model (torch-free, numpy).

A micro-graph runs one op again and again: its weights and input stay hot in cache and nothing runs
between its calls. Inside a whole model every op is a little slower (measured on ONNX Runtime CPU,
ResNet-18 at CIFAR shapes: 1.1-1.25x for small factorized convs, more where weights exceed the per-core
cache), and the table's first calibration, on the dense model alone, cannot tell a per-op slowdown
from weight streaming. `cstar profile` therefore also times a few reference models built from the
same architecture (uniform Tucker-2 and uniform pruning at grid widths, deploy forms by the table) and
fits, per batch size, the two numbers of `LatencyTable.price`:

    call_ms = rest + op_scale * alone_ms + weight_ms_per_mb * beyond_mib + node_ms * extra_nodes

over the dense and reference models, minimising the squared RELATIVE error (a small model counts as
much as the dense one) with both coefficients >= 0 (and op_scale > 0). `rest` (the call overhead and
the nodes the table does not price) stays as measured when the profile measured it (ort-cpu kernel
timing); otherwise it is fitted as a third coefficient. `node_ms` stays as measured.
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

    def predict(self, parts: CostParts) -> float:
        return (self.rest_ms + self.op_scale * parts.alone_ms + self.weight_ms_per_mb * parts.beyond_mib
                + self.node_ms * parts.extra_nodes)

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
        return {"op_scale": self.op_scale, "weight_ms_per_mb": self.weight_ms_per_mb, "rest_ms": self.rest_ms,
                "node_ms": self.node_ms, "max_abs_error": worst, "models": models}


def fit_price(points: list[CalibrationPoint], node_ms: float, rest_ms: float | None) -> CalibrationFit:
    """Least relative-squared-error fit of op_scale and weight_ms_per_mb (and rest when `rest_ms` is None),
    all >= 0, op_scale > 0: every subset of the free coefficients is solved and the best feasible kept."""
    if not points:
        raise ValueError("fit_price needs at least one timed model")
    measured = np.array([p.measured_ms for p in points], dtype=np.float64)
    columns = {"op_scale": np.array([p.parts.alone_ms for p in points]),
               "weight_ms_per_mb": np.array([p.parts.beyond_mib for p in points])}
    if rest_ms is None:
        columns["rest_ms"] = np.ones(len(points))
    target = measured - node_ms * np.array([p.parts.extra_nodes for p in points], dtype=np.float64)
    if rest_ms is not None:
        target = target - rest_ms
    weight = 1.0 / measured
    best: tuple[float, dict[str, float]] | None = None
    optional = [name for name in columns if name != "op_scale"]
    for size in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, size):
            names = ["op_scale", *chosen]
            design = np.stack([columns[n] for n in names], axis=1)
            if np.linalg.matrix_rank(design) < len(names):
                continue
            solution, *_ = np.linalg.lstsq(design * weight[:, None], target * weight, rcond=None)
            if solution[0] <= 0 or (solution[1:] < 0).any():
                continue
            residual = float(np.sum(((design @ solution - target) * weight) ** 2))
            if best is None or residual < best[0] - 1e-15:
                best = (residual, dict(zip(names, (float(c) for c in solution), strict=True)))
    if best is None:  # nothing feasible (e.g. every model faster than its ops alone): plain ratio of sums
        scale = float(max(np.sum(target), 1e-9) / max(np.sum(columns["op_scale"]), 1e-9))
        best = (0.0, {"op_scale": scale})
    coef = best[1]
    return CalibrationFit(coef["op_scale"], coef.get("weight_ms_per_mb", 0.0),
                          coef.get("rest_ms", 0.0) if rest_ms is None else rest_ms, node_ms, tuple(points))
