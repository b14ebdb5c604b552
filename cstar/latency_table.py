"""Latency tables measured on a target runtime (`cstar profile`), read by the allocator and the exporter.

Torch-free (numpy + json): the device side writes these tables and reads them back. A table prices,
for every candidate layer of one model (keyed by its module path, e.g. "layer1.0.conv1"), three ops
on a grid of channel counts, per batch size, in milliseconds net of the runtime's per-call overhead:

- "conv":       the layer's own op (kxk conv with its stride/padding/dilation, or the Gemm of a Linear)
                at (cin', cout') on (in_grid x out_grid): prices the dense, pruned and Tucker-core convs;
- "in_factor":  a 1x1 conv cin' -> r at the layer's input size on (in_grid x in_grid);
- "out_factor": a 1x1 conv r -> cout' at the layer's output size on (out_grid x out_grid).

Between grid points the cost is piecewise linear in each channel count (bilinear on the 2-D grid);
beyond the grid it is the nearest edge. Latency is not monotone in channel count (SIMD widths), so the
grid holds multiples of 8 and 16 plus small ranks (`channel_grid`). The deploy forms of a Tucker-2
layer (ranks (r_in, r_out)) are priced as sums of these ops (see DEPLOY_FORMS).

A micro-graph runs its one op again and again, so its weights stay in cache; inside a whole model an
op runs slower, and a layer's weights beyond the per-core cache (`cache_bytes`) stream from memory on
every call. `price` turns an op's (or a model's) `CostParts` into ms inside a model:
op_scale[batch] x its ms alone + weight_ms_per_mb[batch] x its MiB beyond the cache + stream_ms_per_mb[batch]
x all its weight MiB (inside a model whose weights exceed the per-core cache, none of them is still there
when its op runs again) + node_ms[batch] x its extra nodes. A whole model also pays `spill_ms(batch)`:
spill_ms_per_mb[batch] x its weight MiB beyond spill_cache_mib[batch], the shared cache the model's weights
stay in between calls (fitted: on a VM whose L3 other tenants also use, it is far below the L3's size; a
model above it reads its weights from memory, one below from L3). That term is not a sum over layers, so
`model_price` adds it to the summed parts and the allocator meets it as a second linear budget
(cstar.latency.latency_limits). `cstar profile` fits these coefficients on whole models (the dense one and
reference compressed ones, deploy.profile.fit / cstar.latency_fit; the fit is kept in
`calibration`); without that step they come from the dense model alone (no stream, no spill). What the table's
layers do not cover ("rest": activations, adds, pooling, the call itself) is `rest_ms[batch]` when the
profile measured it (ort-cpu: the call overhead plus every other node's kernel time inside the dense
model), else the measured model minus its calibrated dense layers. Kernel-timed tables (ort-cpu) also
charge `node_ms[batch]`, what one more small node costs in a call, for every conv a deploy form runs
beyond the dense layer's one: at batch 1 on a small model that dispatch cost decides whether
factorizing pays.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import cpu_model

TABLE_KIND = "cstar-latency-table"
TABLE_SCHEMA_VERSION = 1
DEPLOY_FORMS = ("dense", "three-conv", "merge-input", "merge-output")
FACTORIZED_FORMS = DEPLOY_FORMS[1:]
# One tie rule for every place that picks a deploy form (the latency model, the allocator's cost model,
# export): on an exact tie the unmerged three-conv form first, the fully merged dense conv last.
FORM_TIE_ORDER = ("three-conv", "merge-input", "merge-output", "dense")


def fastest_form(costs: dict[str, float]) -> str:
    """The cheapest deploy form of `costs` (form -> cost); exact ties follow FORM_TIE_ORDER."""
    return min(costs, key=lambda form: (costs[form], FORM_TIE_ORDER.index(form)))
# nodes a factorized form runs beyond the dense layer's one (a factorized Linear: two Gemms)
EXTRA_NODES: dict[str, int] = {"three-conv": 2, "merge-input": 1, "merge-output": 1, "linear": 1}
OPS = ("conv", "in_factor", "out_factor")
LAYER_TYPES = ("conv", "linear")
# Channel counts priced below a layer's full width: small ranks, then multiples of 8 and 16 spaced ~1.5x.
GRID_POINTS = (4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
DEFAULT_GRID_CAP = 16
MIB = float(1 << 20)
_PROFILE_FIX = "re-run `cstar profile --model-from DIR --backend BACKEND --out TABLE` for this model"


# ------------------------------------------------------------------------------------------ grids


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


# ------------------------------------------------------------------------------------------ machine


LatencyBatches = int | str | Sequence[int]  # --latency-batch: 1, "1,8" or [1, 8]


def latency_batches(value: LatencyBatches) -> tuple[int, ...]:
    """The batch sizes a latency budget must hold at, first = the headline one (reported, and the one whose
    latency picks each layer's deploy form). Accepts 1, "1,8" or [1, 8]; CstarError on anything else."""
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (int, np.integer)):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            items = [None]
    try:
        batches = tuple(int(item) for item in items)
        valid = bool(batches) and all(b >= 1 for b in batches) and all(
            not isinstance(item, (bool, float)) for item in items)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise CstarError(f"--latency-batch must be one batch size or a comma list of them (each >= 1), got {value!r}",
                         "pass e.g. --latency-batch 1, or --latency-batch 1,8 to meet the budget at both")
    return tuple(dict.fromkeys(batches))


def current_cpu_model() -> str:
    """CPU model name of this host (the same reading `deploy.report.cpu_model` records)."""
    return cpu_model()


# ------------------------------------------------------------------------------------------ table


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


@dataclass
class LatencyTable:
    """A `cstar profile` latency table: measured per-layer costs on one runtime, one machine, one thread count."""

    backend: str
    runtime: dict[str, str]
    machine: dict[str, Any]
    threads: int | None
    batch_sizes: tuple[int, ...]
    model: dict[str, Any]
    overhead_ms: dict[int, float]
    dense_model_ms: dict[int, float]
    layers: dict[str, LayerEntry]
    settings: dict[str, Any] = field(default_factory=dict)
    cache_bytes: int = 0
    weight_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per MiB beyond the cache
    op_scale: dict[int, float] = field(default_factory=dict)  # batch -> factor on every measured op (1: none)
    measured_rest_ms: dict[int, float] | None = None  # batch -> what the layers do not cover, when measured
    # batch -> what one more node costs inside a model beyond its kernel (dispatch, intermediate tensor):
    # kernel-timed tables (ort-cpu) charge it for every conv a deploy form adds over the dense layer
    node_ms: dict[int, float] = field(default_factory=dict)
    stream_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per MiB of every weight
    spill_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per model MiB beyond spill_cache_mib
    spill_cache_mib: dict[int, float] = field(default_factory=dict)  # batch -> the shared cache a model's weights stay in
    calibration: dict[str, Any] | None = None  # the whole-model fit of op_scale etc. (cstar.latency_fit)
    path: Path | None = None

    # -------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read and validate a table file; every problem is one CstarError with a fix."""
        source = Path(path)
        if not source.is_file():
            raise CstarError(f"latency table {source} does not exist",
                             "profile the model first: cstar profile --model-from DIR --backend ort-cpu --out TABLE")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CstarError(f"latency table {source} is not readable JSON ({exc})", _PROFILE_FIX) from exc
        table = cls.from_dict(data, str(source))
        table.path = source
        return table

    @classmethod
    def from_dict(cls, data: Any, where: str = "latency table") -> LatencyTable:
        """Validate a parsed table (kind, schema, batches, finite positive numbers, non-empty layers)."""
        if not isinstance(data, dict) or data.get("kind") != TABLE_KIND:
            raise CstarError(f"{where} is not a cstar latency table (kind {_get(data, 'kind')!r})",
                             f"pass a file written by `cstar profile` ({_PROFILE_FIX})")
        if data.get("schema_version") != TABLE_SCHEMA_VERSION:
            raise CstarError(f"{where} has schema_version {data.get('schema_version')!r}, this cstar reads "
                             f"{TABLE_SCHEMA_VERSION}", f"profile again with this cstar version ({_PROFILE_FIX})")
        batches = _batch_sizes(data.get("batch_sizes"), where)
        layers_data = data.get("layers")
        if not isinstance(layers_data, dict) or not layers_data:
            raise CstarError(f"{where} has no layers", f"the model had no candidate layers or the file is cut; "
                             f"{_PROFILE_FIX}")
        threads = data.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise CstarError(f"{where}: threads must be a positive integer or null, got {threads!r}", _PROFILE_FIX)
        return cls(
            backend=_text(data, "backend", where),
            runtime={str(k): str(v) for k, v in (data.get("runtime") or {}).items()},
            machine=dict(data.get("machine") or {}),
            threads=threads,
            batch_sizes=batches,
            model=dict(data.get("model") or {}),
            overhead_ms=_per_batch(data.get("overhead_ms"), batches, f"{where}: overhead_ms", allow_zero=True),
            dense_model_ms=_per_batch(data.get("dense_model_ms"), batches, f"{where}: dense_model_ms"),
            layers={str(name): _layer(str(name), body, batches, where) for name, body in layers_data.items()},
            settings=dict(data.get("settings") or {}),
            cache_bytes=int(_number(data.get("cache_bytes", 0), f"{where}: cache_bytes", allow_zero=True)),
            weight_ms_per_mb=_per_batch(data.get("weight_ms_per_mb", {str(b): 0.0 for b in batches}), batches,
                                        f"{where}: weight_ms_per_mb", allow_zero=True),
            op_scale=_per_batch(data.get("op_scale", {str(b): 1.0 for b in batches}), batches, f"{where}: op_scale"),
            measured_rest_ms=(None if data.get("rest_ms") is None else
                              _per_batch(data["rest_ms"], batches, f"{where}: rest_ms", allow_zero=True)),
            node_ms=_per_batch(data.get("node_ms", {str(b): 0.0 for b in batches}), batches, f"{where}: node_ms",
                               allow_zero=True),
            stream_ms_per_mb=_optional_per_batch(data, "stream_ms_per_mb", batches, where),
            spill_ms_per_mb=_optional_per_batch(data, "spill_ms_per_mb", batches, where),
            spill_cache_mib=_optional_per_batch(data, "spill_cache_mib", batches, where),
            calibration=dict(data["calibration"]) if isinstance(data.get("calibration"), dict) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON body (`cstar profile` adds a per-batch summary for people)."""
        return {
            "kind": TABLE_KIND, "schema_version": TABLE_SCHEMA_VERSION, "backend": self.backend,
            "runtime": dict(self.runtime), "machine": dict(self.machine), "threads": self.threads,
            "batch_sizes": list(self.batch_sizes), "model": dict(self.model), "settings": dict(self.settings),
            "overhead_ms": {str(b): v for b, v in self.overhead_ms.items()},
            "dense_model_ms": {str(b): v for b, v in self.dense_model_ms.items()},
            "cache_bytes": self.cache_bytes,
            "weight_ms_per_mb": {str(b): v for b, v in self.weight_ms_per_mb.items()},
            "op_scale": {str(b): v for b, v in self.op_scale.items()},
            "rest_ms": None if self.measured_rest_ms is None else {str(b): v for b, v in self.measured_rest_ms.items()},
            "node_ms": {str(b): v for b, v in self.node_ms.items()},
            "stream_ms_per_mb": {str(b): v for b, v in self.stream_ms_per_mb.items()},
            "spill_ms_per_mb": {str(b): v for b, v in self.spill_ms_per_mb.items()},
            "spill_cache_mib": {str(b): v for b, v in self.spill_cache_mib.items()},
            "calibration": self.calibration,
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
        }

    # -------------------------------------------------------------- lookups
    def layer_names(self) -> list[str]:
        """The priced layers, in model order."""
        return list(self.layers)

    def layer(self, name: str) -> LayerEntry:
        """The entry of layer `name`; CstarError when the table does not have it."""
        try:
            return self.layers[name]
        except KeyError:
            raise self.missing_error([name]) from None

    def missing_error(self, names: list[str]) -> CstarError:
        """The error for layers this table does not price."""
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        model = self.model.get("name", "?")
        return CstarError(f"the latency table{_at(self.path)} has no layer {shown} (it was profiled on model "
                          f"'{model}' with {len(self.layers)} layers)",
                          "profile the model you compress: " + _PROFILE_FIX)

    def require_layers(self, names: list[str]) -> None:
        """CstarError naming every layer of `names` the table lacks."""
        missing = [name for name in names if name not in self.layers]
        if missing:
            raise self.missing_error(missing)

    def check_batch(self, batch: int) -> int:
        """`batch` when the table has it; CstarError listing the profiled ones otherwise."""
        if batch not in self.batch_sizes:
            have = ",".join(str(b) for b in self.batch_sizes)
            raise CstarError(f"the latency table{_at(self.path)} has no batch size {batch} (it has {have})",
                             f"pass --latency-batch with one of {have}, or profile with --batch-sizes {have},{batch}")
        return batch

    def op_parts(self, layer: str, op: str, rows: float, cols: float, batch: int) -> CostParts:
        """One op of `layer` at channel counts (rows, cols): its interpolated ms alone and its weights beyond
        the cache."""
        entry = self.layer(layer)
        grid_rows, grid_cols = entry.axes(op)
        measured = interpolate(grid_rows, grid_cols, entry.ms[self.check_batch(batch)][op], rows, cols)
        weight = entry.weight_bytes(op, rows, cols)
        return CostParts(measured, max(0.0, weight - self.cache_bytes) / MIB, 0, weight / MIB)

    def price(self, parts: CostParts, batch: int) -> float:
        """ms inside a model: op_scale x the ops alone + weight streaming + the extra nodes' dispatch (a sum over
        ops: no spill, see model_price)."""
        return (self.op_scale.get(batch, 1.0) * parts.alone_ms + self.weight_ms_per_mb.get(batch, 0.0) * parts.beyond_mib
                + self.stream_ms_per_mb.get(batch, 0.0) * parts.weight_mib
                + self.node_ms.get(batch, 0.0) * parts.extra_nodes)

    def spill_ms(self, weight_mib: float, batch: int) -> float:
        """What a whole model whose priced layers hold `weight_mib` MiB of weights pays for those beyond the shared
        cache they stay in between calls (0 without a fitted spill)."""
        rate = self.spill_ms_per_mb.get(batch, 0.0)
        return rate * max(0.0, weight_mib - self.spill_cache_mib.get(batch, 0.0)) if rate > 0 else 0.0

    def model_price(self, parts: CostParts, batch: int) -> float:
        """ms of a whole model's summed layer `parts` inside the model (the rest not included): price + spill."""
        return self.price(parts, batch) + self.spill_ms(parts.weight_mib, batch)

    def op_ms(self, layer: str, op: str, rows: float, cols: float, batch: int) -> float:
        """ms of one op of `layer` at channel counts (rows, cols): interpolated, plus its weight streaming."""
        return self.price(self.op_parts(layer, op, rows, cols, batch), batch)

    def streaming_ms(self, weight_bytes: float, batch: int) -> float:
        """Extra ms inside a model for weights beyond the per-core cache (0 without a calibrated rate)."""
        rate = self.weight_ms_per_mb.get(batch, 0.0)
        return rate * max(0.0, weight_bytes - self.cache_bytes) / MIB if rate > 0 else 0.0

    def conv_ms(self, layer: str, cin: int, cout: int, batch: int) -> float:
        """The layer's own op (kxk conv / Gemm) with `cin` -> `cout` channels."""
        return self.op_ms(layer, "conv", cin, cout, batch)

    def form_parts(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                   cin: int | None = None, cout: int | None = None) -> CostParts:
        """The cost parts of `layer` run as deploy `form` (see form_ms)."""
        entry = self.layer(layer)
        cin = entry.in_channels if cin is None else cin
        cout = entry.out_channels if cout is None else cout
        if form not in DEPLOY_FORMS:
            raise CstarError(f"unknown deploy form '{form}'", f"use one of: {', '.join(DEPLOY_FORMS)}")
        if form == "dense":
            return self.op_parts(layer, "conv", cin, cout, batch)
        if ranks is None:
            raise CstarError(f"deploy form '{form}' of layer '{layer}' needs ranks (r_in, r_out)",
                             "pass the Tucker-2 ranks, or form 'dense'")
        r_in, r_out = ranks
        extra = CostParts(0.0, 0.0, EXTRA_NODES["linear" if entry.type == "linear" else form])
        if entry.type == "linear" or form == "three-conv":
            core = (CostParts() if entry.type == "linear" else self.op_parts(layer, "conv", r_in, r_out, batch))
            return (self.op_parts(layer, "in_factor", cin, r_in, batch) + core
                    + self.op_parts(layer, "out_factor", r_out, cout, batch) + extra)
        if form == "merge-input":
            return (self.op_parts(layer, "conv", cin, r_out, batch)
                    + self.op_parts(layer, "out_factor", r_out, cout, batch) + extra)
        return (self.op_parts(layer, "in_factor", cin, r_in, batch) + self.op_parts(layer, "conv", r_in, cout, batch)
                + extra)

    def form_ms(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                cin: int | None = None, cout: int | None = None) -> float:
        """ms of `layer` run as deploy `form` with Tucker-2 ranks (r_in, r_out); cin/cout default to full width.

        dense: kxk cin->cout; three-conv: 1x1 cin->r_in, kxk r_in->r_out, 1x1 r_out->cout;
        merge-input: kxk cin->r_out, 1x1 r_out->cout; merge-output: 1x1 cin->r_in, kxk r_in->cout.
        A Linear layer has two forms: dense (one Gemm) and factorized (any other name: cin->r, r->cout).
        """
        return self.price(self.form_parts(layer, form, ranks, batch, cin, cout), batch)

    def fastest_form(self, layer: str, ranks: tuple[int, int], batch: int, cin: int | None = None,
                     cout: int | None = None, forms: tuple[str, ...] = FACTORIZED_FORMS) -> tuple[str, float]:
        """(form, ms) of the fastest of `forms` (ties: FORM_TIE_ORDER, the rule export uses)."""
        costs = {form: self.form_ms(layer, form, ranks, batch, cin, cout) for form in forms}
        form = fastest_form(costs)
        return form, costs[form]

    def dense_ms(self, layer: str, batch: int) -> float:
        """The layer at its profiled (full) width."""
        entry = self.layer(layer)
        return self.conv_ms(layer, entry.in_channels, entry.out_channels, batch)

    def model_ms(self, batch: int) -> float:
        """The measured whole dense model (one runtime call)."""
        return self.dense_model_ms[self.check_batch(batch)]

    def dense_reference_ms(self, batch: int) -> float:
        """The dense model's latency a latency ratio divides: as measured in the calibration's interleaved rounds
        (the median of many short rounds, beside the models it was fitted on) when the table is calibrated, else
        the profile's one measurement. Measured, not predicted: the additive price of a large dense model is off
        by several percent (its big convs run faster inside the model than alone), and a budget of predicted
        dense / R would carry that error into every speedup."""
        fit = ((self.calibration or {}).get("by_batch") or {}).get(str(self.check_batch(batch))) or {}
        for row in fit.get("models") or []:
            if row.get("model") == "dense" and isinstance(row.get("measured_ms"), (int, float)) \
                    and math.isfinite(row["measured_ms"]) and row["measured_ms"] > 0:
                return float(row["measured_ms"])
        return self.model_ms(batch)

    def rest_ms(self, batch: int) -> float:
        """What the layers do not cover: measured (ort-cpu), else the whole dense model minus the sum of its
        dense layers (may then be < 0)."""
        if self.measured_rest_ms is not None:
            return self.measured_rest_ms[self.check_batch(batch)]
        return self.model_ms(batch) - sum(self.dense_ms(name, batch) for name in self.layers)

    def predicted_dense_ms(self, batch: int) -> float:
        """The dense model as the table predicts it (rest + dense layers + spill); model_ms is what was measured."""
        parts = CostParts()
        for name, entry in self.layers.items():
            parts = parts + self.op_parts(name, "conv", entry.in_channels, entry.out_channels, batch)
        return self.rest_ms(batch) + self.model_price(parts, batch)

    # -------------------------------------------------------------- provenance
    def check_matches(self, backend: str, threads: int | None = None, cpu: str | None = None) -> list[str]:
        """Warnings when this table was measured on another backend, CPU or thread count than the one in use.

        `threads` None: not checked; `cpu` None: this host's CPU.
        """
        warnings: list[str] = []
        where = f"latency table{_at(self.path)}"
        if backend != self.backend:
            warnings.append(f"{where} was measured on backend '{self.backend}', not '{backend}': its latencies "
                            f"do not transfer; profile with --backend {backend}")
        if threads is not None and threads != self.threads:
            warnings.append(f"{where} was measured with {self.threads or 'the runtime default'} thread(s), "
                            f"not {threads}; profile with --threads {threads}")
        here = cpu if cpu is not None else current_cpu_model()
        there = str(self.machine.get("cpu_model", ""))
        if there and here != there:
            warnings.append(f"{where} was measured on CPU '{there}', this is '{here}': fine when that is the "
                            "deploy target, otherwise profile on the target")
        return warnings

    def describe(self) -> dict[str, Any]:
        """Provenance for manifests: path, backend, runtime, machine, threads."""
        from cstar.manifest import sha256_file

        info: dict[str, Any] = {"backend": self.backend, "runtime": dict(self.runtime), "machine": dict(self.machine),
                                "threads": self.threads, "model": self.model.get("name")}
        if self.path is not None:
            info.update(path=str(self.path.resolve()), sha256=sha256_file(self.path))
        return info


# ------------------------------------------------------------------------------------------ validation


def _at(path: Path | None) -> str:
    return f" {path}" if path is not None else ""


def _get(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def _text(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise CstarError(f"{where} lacks '{key}'", _PROFILE_FIX)
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _batch_sizes(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_positive_int(b) for b in value):
        raise CstarError(f"{where}: batch_sizes must be a non-empty list of positive integers, got {value!r}",
                         _PROFILE_FIX)
    return tuple(int(b) for b in value)


def _number(value: Any, where: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise CstarError(f"{where} is {value!r}: latencies must be finite and {'>= 0' if allow_zero else '> 0'}",
                         "the measurement failed or the file was edited; " + _PROFILE_FIX)
    return float(value)


def _per_batch(value: Any, batches: tuple[int, ...], where: str, allow_zero: bool = False) -> dict[int, float]:
    if not isinstance(value, dict):
        raise CstarError(f"{where} is missing", _PROFILE_FIX)
    result = {}
    for batch in batches:
        if str(batch) not in value:
            raise CstarError(f"{where} has no entry for batch {batch}", _PROFILE_FIX)
        result[batch] = _number(value[str(batch)], f"{where}[{batch}]", allow_zero)
    return result


def _optional_per_batch(data: dict[str, Any], key: str, batches: tuple[int, ...], where: str) -> dict[int, float]:
    """A per-batch coefficient older tables lack (then 0 at every batch)."""
    if data.get(key) is None:
        return {b: 0.0 for b in batches}
    return _per_batch(data[key], batches, f"{where}: {key}", allow_zero=True)


def _grid(value: Any, full: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value or not all(_positive_int(v) for v in value)
            or value != sorted(set(value)) or value[-1] != full):
        raise CstarError(f"{where} must be increasing positive channel counts ending at the full width {full!r}, "
                         f"got {value!r}", _PROFILE_FIX)
    return tuple(int(v) for v in value)


def _pair(value: Any, length: int, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) != length
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise CstarError(f"{where} must be {length} non-negative integers, got {value!r}", _PROFILE_FIX)
    return tuple(int(v) for v in value)


def _layer(name: str, body: Any, batches: tuple[int, ...], where: str) -> LayerEntry:
    here = f"{where}: layer '{name}'"
    if not isinstance(body, dict):
        raise CstarError(f"{here} is not an object", _PROFILE_FIX)
    kind = body.get("type")
    if kind not in LAYER_TYPES:
        raise CstarError(f"{here} has type {kind!r} (expected one of {', '.join(LAYER_TYPES)})", _PROFILE_FIX)
    cin, cout = body.get("in_channels"), body.get("out_channels")
    if not (_positive_int(cin) and _positive_int(cout)):
        raise CstarError(f"{here} needs positive in_channels/out_channels, got {cin!r}/{cout!r}", _PROFILE_FIX)
    in_grid = _grid(body.get("in_grid"), cin, f"{here} in_grid")
    out_grid = _grid(body.get("out_grid"), cout, f"{here} out_grid")
    entry = LayerEntry(
        name, str(kind), int(cin), int(cout), _pair(body.get("kernel"), 2, f"{here} kernel"),  # type: ignore[arg-type]
        _pair(body.get("stride"), 2, f"{here} stride"), _pair(body.get("padding"), 4, f"{here} padding"),  # type: ignore[arg-type]
        _pair(body.get("dilation"), 2, f"{here} dilation"), _pair(body.get("input_hw"), 2, f"{here} input_hw"),  # type: ignore[arg-type]
        _pair(body.get("output_hw"), 2, f"{here} output_hw"), in_grid, out_grid, {},  # type: ignore[arg-type]
    )
    measured = body.get("ms")
    if not isinstance(measured, dict):
        raise CstarError(f"{here} has no measurements ('ms')", _PROFILE_FIX)
    for batch in batches:
        ops = measured.get(str(batch))
        if not isinstance(ops, dict):
            raise CstarError(f"{here} has no measurements for batch {batch}", _PROFILE_FIX)
        entry.ms[batch] = {op: _values(ops.get(op), entry.axes(op), f"{here} {op} at batch {batch}") for op in OPS}
    return entry


def _values(value: Any, axes: tuple[Sequence[int], Sequence[int]], where: str) -> np.ndarray:
    shape = (len(axes[0]), len(axes[1]))
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != shape:
        raise CstarError(f"{where} must be a {shape[0]}x{shape[1]} array of ms, got {value!r:.80}", _PROFILE_FIX)
    if not np.isfinite(array).all() or (array <= 0).any():
        bad = array[~np.isfinite(array) | (array <= 0)][0]
        raise CstarError(f"{where} holds {bad!r}: latencies must be finite and > 0",
                         "the measurement failed or the file was edited; " + _PROFILE_FIX)
    return array
