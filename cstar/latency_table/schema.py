"""Reading a table's JSON safely: every missing, mistyped or non-finite field is one CstarError with the fix
(re-profile). `LatencyTable.from_dict` is built on these."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.latency_table.geometry import LayerEntry
from cstar.latency_table.grid import LAYER_TYPES, OPS

TABLE_KIND = "cstar-latency-table"
TABLE_SCHEMA_VERSION = 1
PROFILE_FIX = "re-run `cstar profile --model-from DIR --backend BACKEND --out TABLE` for this model"


def at_path(path: Path | None) -> str:
    return f" {path}" if path is not None else ""


def get_field(data: Any, key: str) -> Any:
    return data.get(key) if isinstance(data, dict) else None


def text_field(data: dict[str, Any], key: str, where: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value:
        raise CstarError(f"{where} lacks '{key}'", PROFILE_FIX)
    return value


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def batch_sizes_of(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(_positive_int(b) for b in value):
        raise CstarError(f"{where}: batch_sizes must be a non-empty list of positive integers, got {value!r}",
                         PROFILE_FIX)
    return tuple(int(b) for b in value)


def number(value: Any, where: str, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise CstarError(f"{where} is {value!r}: latencies must be finite and {'>= 0' if allow_zero else '> 0'}",
                         "the measurement failed or the file was edited; " + PROFILE_FIX)
    return float(value)


def per_batch(value: Any, batches: tuple[int, ...], where: str, allow_zero: bool = False) -> dict[int, float]:
    if not isinstance(value, dict):
        raise CstarError(f"{where} is missing", PROFILE_FIX)
    result = {}
    for batch in batches:
        if str(batch) not in value:
            raise CstarError(f"{where} has no entry for batch {batch}", PROFILE_FIX)
        result[batch] = number(value[str(batch)], f"{where}[{batch}]", allow_zero)
    return result


def optional_per_batch(data: dict[str, Any], key: str, batches: tuple[int, ...], where: str) -> dict[int, float]:
    """A per-batch coefficient older tables lack (then 0 at every batch)."""
    if data.get(key) is None:
        return {b: 0.0 for b in batches}
    return per_batch(data[key], batches, f"{where}: {key}", allow_zero=True)


def _grid(value: Any, full: Any, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or not value or not all(_positive_int(v) for v in value)
            or value != sorted(set(value)) or value[-1] != full):
        raise CstarError(f"{where} must be increasing positive channel counts ending at the full width {full!r}, "
                         f"got {value!r}", PROFILE_FIX)
    return tuple(int(v) for v in value)


def _pair(value: Any, length: int, where: str) -> tuple[int, ...]:
    if (not isinstance(value, list) or len(value) != length
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)):
        raise CstarError(f"{where} must be {length} non-negative integers, got {value!r}", PROFILE_FIX)
    return tuple(int(v) for v in value)


def layer_entry(name: str, body: Any, batches: tuple[int, ...], where: str) -> LayerEntry:
    here = f"{where}: layer '{name}'"
    if not isinstance(body, dict):
        raise CstarError(f"{here} is not an object", PROFILE_FIX)
    kind = body.get("type")
    if kind not in LAYER_TYPES:
        raise CstarError(f"{here} has type {kind!r} (expected one of {', '.join(LAYER_TYPES)})", PROFILE_FIX)
    cin, cout = body.get("in_channels"), body.get("out_channels")
    if not (_positive_int(cin) and _positive_int(cout)):
        raise CstarError(f"{here} needs positive in_channels/out_channels, got {cin!r}/{cout!r}", PROFILE_FIX)
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
        raise CstarError(f"{here} has no measurements ('ms')", PROFILE_FIX)
    for batch in batches:
        ops = measured.get(str(batch))
        if not isinstance(ops, dict):
            raise CstarError(f"{here} has no measurements for batch {batch}", PROFILE_FIX)
        entry.ms[batch] = {op: _values(ops.get(op), entry.axes(op), f"{here} {op} at batch {batch}") for op in OPS}
    return entry


def _values(value: Any, axes: tuple[Sequence[int], Sequence[int]], where: str) -> np.ndarray:
    shape = (len(axes[0]), len(axes[1]))
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = np.empty(0)
    if array.shape != shape:
        raise CstarError(f"{where} must be a {shape[0]}x{shape[1]} array of ms, got {value!r:.80}", PROFILE_FIX)
    if not np.isfinite(array).all() or (array <= 0).any():
        bad = array[~np.isfinite(array) | (array <= 0)][0]
        raise CstarError(f"{where} holds {bad!r}: latencies must be finite and > 0",
                         "the measurement failed or the file was edited; " + PROFILE_FIX)
    return array
