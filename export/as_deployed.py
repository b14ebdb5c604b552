"""ONNX of a model as `cstar export` deploys it, for timing: deploy forms applied, BatchNorm folded,
dynamic batch, simplified with onnxslim when that works (else the raw export, a valid graph to time).

Used by `cstar profile` (the dense model and its reference compressions) where only the graph's
speed matters; `cstar export` itself adds parity checks and a manifest (export.exporter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def export_as_deployed(model: Any, input_shape: tuple[int, ...], directory: Path, name: str,
                       forms: dict[str, str] | None = None) -> Path:
    """Export `model` in its deploy form (`forms`: layer -> deploy form) to DIRECTORY/NAME.onnx."""
    from export.deploy_form import to_deploy
    from export.onnx_export import export_onnx, simplify

    raw = export_onnx(to_deploy(model, forms), input_shape, directory / f"{name}_raw.onnx").path
    try:
        return simplify(raw, directory / f"{name}.onnx", "onnxslim")
    except Exception:  # noqa: BLE001 - the unsimplified graph is a valid fallback for timing
        return raw
