"""What `cstar profile` times: one micro-graph (`OpSpec`), a candidate layer with its channel grids
(`LayerSpec`) and how to time (`ProfileSettings`). Torch-free."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from cstar.errors import CstarError
from cstar.latency_table import DEFAULT_GRID_CAP, OPS, LayerGeometry, channel_grid


@dataclass(frozen=True)
class OpSpec:
    """One timed micro-graph: a Conv (or Flatten+Gemm) with its geometry; the batch dimension is dynamic."""

    kind: str  # "conv" or "gemm"
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    input_hw: tuple[int, int] = (1, 1)

    @property
    def input_chw(self) -> tuple[int, int, int]:
        return (self.cin, *self.input_hw)

    @property
    def output_hw(self) -> tuple[int, int]:
        """Spatial output size (ONNX Conv arithmetic)."""
        size = []
        for axis in range(2):
            padded = self.input_hw[axis] + self.padding[axis] + self.padding[axis + 2]
            span = self.dilation[axis] * (self.kernel[axis] - 1) + 1
            size.append((padded - span) // self.stride[axis] + 1)
        return size[0], size[1]


@dataclass(frozen=True)
class LayerSpec(LayerGeometry):
    """A candidate layer to profile (cstar.latency.candidate_geometry) with its channel grids."""

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any], cap: int, points: tuple[int, ...] | None) -> LayerSpec:
        cin, cout = int(geometry["in_channels"]), int(geometry["out_channels"])
        return cls(str(geometry["name"]), str(geometry["type"]), cin, cout, _ints(geometry["kernel"]),
                   _ints(geometry["stride"]), _ints(geometry["padding"]), _ints(geometry["dilation"]),
                   _ints(geometry["input_hw"]), _ints(geometry["output_hw"]),
                   tuple(channel_grid(cin, cap, points)), tuple(channel_grid(cout, cap, points)))

    @property
    def dense_weight_bytes(self) -> int:
        """float32 bytes of the dense layer's weight."""
        return 4 * self.in_channels * self.out_channels * self.kernel[0] * self.kernel[1]

    def op(self, op: str, rows: int, cols: int) -> OpSpec:
        """The micro-graph of `op` ("conv", "in_factor", "out_factor") at channel counts (rows, cols)."""
        if self.type == "linear":
            return OpSpec("gemm", rows, cols)
        if op == "conv":
            return OpSpec("conv", rows, cols, self.kernel, self.stride, self.padding, self.dilation, self.input_hw)
        return OpSpec("conv", rows, cols, input_hw=self.input_hw if op == "in_factor" else self.output_hw)

    def ops(self) -> Iterable[tuple[str, int, int, OpSpec]]:
        """Every (op, row, col, micro-graph) this layer needs."""
        for op in OPS:
            rows, cols = self.axes(op)
            for i in rows:
                for j in cols:
                    yield op, i, j, self.op(op, i, j)


def _ints(values: Iterable[Any]) -> Any:
    return tuple(int(v) for v in values)


@dataclass
class ProfileSettings:
    """How to time: backend, runtime threads, batch sizes, iterations and the channel grid."""

    backend: str = "ort-cpu"
    threads: int | None = 1
    batch_sizes: tuple[int, ...] = (1,)
    iters: int = 7
    warmup: int = 2
    grid_cap: int = DEFAULT_GRID_CAP
    ranks: tuple[int, ...] | None = None  # channel grid points (None: cstar.latency_table.GRID_POINTS)
    model_iters: int = 20  # timed calls of the whole dense model (and of each calibration model)
    seed: int = 0
    calibrate: bool = True  # fit the in-model price on reference models (deploy.profile.fit)

    def validate(self) -> None:
        """Reject user mistakes with a hint."""
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CstarError(f"--batch-sizes needs positive integers, got {self.batch_sizes}", "e.g. --batch-sizes 1,8")
        if self.iters < 1 or self.warmup < 0 or self.model_iters < 1:
            raise CstarError(f"--iters must be >= 1 and --warmup >= 0 (got {self.iters}, {self.warmup})",
                             "e.g. --iters 7 --warmup 2")
        if self.grid_cap < 2:
            raise CstarError(f"--grid-cap must be >= 2, got {self.grid_cap}", "e.g. --grid-cap 16")
        if self.threads is not None and self.threads < 1:
            raise CstarError(f"--threads must be >= 1, got {self.threads}", "pass a positive thread count")
        if self.ranks is not None and (not self.ranks or any(r < 1 for r in self.ranks)):
            raise CstarError(f"--ranks needs positive channel counts, got {self.ranks}", "e.g. --ranks 4,8,16,32,64")
