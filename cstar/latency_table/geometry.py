"""What a table says about one layer: its geometry and grids (`LayerGeometry`), its measured entry
(`LayerEntry`), and a cost before calibration (`CostParts`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

MIB = float(1 << 20)


@dataclass(frozen=True)
class CostParts:
    """What a layer (or a model's layers) costs, in the table's terms, before calibration: the measured ms
    of its ops alone (micro-graphs), its weight MiB beyond the per-core cache, and the nodes it runs beyond
    the dense layers'. `LatencyTable.price` turns them into ms inside a model; the profile's calibration
    fits that price to whole models (cstar.latency_fit)."""

    alone_ms: float = 0.0
    beyond_mib: float = 0.0
    extra_nodes: int = 0
    weight_mib: float = 0.0  # all its float32 weights

    def __add__(self, other: CostParts) -> CostParts:
        return CostParts(self.alone_ms + other.alone_ms, self.beyond_mib + other.beyond_mib,
                         self.extra_nodes + other.extra_nodes, self.weight_mib + other.weight_mib)


@dataclass(frozen=True)
class LayerGeometry:
    """One candidate layer's geometry and channel grids: what `cstar profile` times (deploy.profile.LayerSpec)
    and what the table records for it (LayerEntry)."""

    name: str
    type: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    in_grid: tuple[int, ...] = ()
    out_grid: tuple[int, ...] = ()

    def axes(self, op: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The (row, column) channel grids of `op`."""
        if op == "conv":
            return self.in_grid, self.out_grid
        return (self.in_grid, self.in_grid) if op == "in_factor" else (self.out_grid, self.out_grid)

    def geometry_dict(self) -> dict[str, Any]:
        """The table's JSON fields of this layer (its name is the key)."""
        return {
            "type": self.type, "in_channels": self.in_channels, "out_channels": self.out_channels,
            "kernel": list(self.kernel), "stride": list(self.stride), "padding": list(self.padding),
            "dilation": list(self.dilation), "input_hw": list(self.input_hw), "output_hw": list(self.output_hw),
            "in_grid": list(self.in_grid), "out_grid": list(self.out_grid),
        }


@dataclass(frozen=True)
class LayerEntry(LayerGeometry):
    """One candidate layer of a table: geometry, channel grids and measured ms per batch and op."""

    ms: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # batch -> op -> 2-D array

    def weight_bytes(self, op: str, rows: float, cols: float) -> float:
        """float32 weight bytes of `op` at (rows, cols) channels (1x1 factors: rows * cols)."""
        taps = self.kernel[0] * self.kernel[1] if op == "conv" and self.type == "conv" else 1
        return 4.0 * rows * cols * taps

    def to_dict(self) -> dict[str, Any]:
        ms = {str(b): {op: np.round(v, 6).tolist() for op, v in ops.items()} for b, ops in self.ms.items()}
        return {**self.geometry_dict(), "ms": ms}
