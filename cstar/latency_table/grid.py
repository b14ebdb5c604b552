"""The channel grid a latency table prices each layer on, and the bilinear interpolation between its points."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

OPS = ("conv", "in_factor", "out_factor")
LAYER_TYPES = ("conv", "linear")
# Channel counts priced below a layer's full width: small ranks, then multiples of 8 and 16 spaced ~1.5x.
GRID_POINTS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_GRID_CAP = 16


def channel_grid(full: int, cap: int = DEFAULT_GRID_CAP, points: tuple[int, ...] | None = None) -> list[int]:
    """Channel counts to price for a dimension of width `full`: `points` below it, plus `full` itself.

    At most `cap` values: evenly spaced (by index) ones are kept, always the smallest and `full`.
    """
    if full < 1:
        raise ValueError(f"channel width must be >= 1, got {full}")
    grid = sorted({p for p in (points or GRID_POINTS) if 0 < p < full} | {full})
    if len(grid) > max(cap, 2):
        keep = np.unique(np.round(np.linspace(0, len(grid) - 1, max(cap, 2))).astype(int))
        grid = [grid[int(i)] for i in keep]
    return grid


def _axis(grid: Sequence[int], x: float) -> tuple[int, int, float]:
    """(lower index, upper index, weight of the upper) of `x` on `grid`; clamped to the edges."""
    if x <= grid[0]:
        return 0, 0, 0.0
    if x >= grid[-1]:
        return len(grid) - 1, len(grid) - 1, 0.0
    upper = bisect.bisect_left(grid, x)
    if grid[upper] == x:
        return upper, upper, 0.0
    lower = upper - 1
    return lower, upper, (x - grid[lower]) / (grid[upper] - grid[lower])


def interpolate(rows: Sequence[int], cols: Sequence[int], values: np.ndarray, row: float, col: float) -> float:
    """Piecewise-linear (bilinear) value of `values[rows x cols]` at (row, col); nearest edge outside."""
    i0, i1, wi = _axis(rows, row)
    j0, j1, wj = _axis(cols, col)
    top = (1 - wj) * values[i0, j0] + wj * values[i0, j1]
    bottom = (1 - wj) * values[i1, j0] + wj * values[i1, j1]
    return float((1 - wi) * top + wi * bottom)
