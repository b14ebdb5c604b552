"""PyTorch -> ONNX: one self-contained .onnx file, checked, shape-inferred, optionally simplified.

The current (dynamo, torch.export based) exporter is tried first; if it fails, the TorchScript
exporter is used and the choice is recorded (`ExportResult.exporter`). Batch is dynamic by default
(`torch.export.Dim("batch")`), or fixed with `static_batch`. The IR version is lowered to the
smallest one that carries the opset, so older runtimes (edge ONNX Runtime builds, TensorRT parsers)
accept the file.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cstar.errors import CstarError, MissingDependencyError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 17
DEFAULT_OPSET = 20
SIMPLIFIERS = ("onnxsim", "onnxslim", "none")
_EXAMPLE_BATCH = 2  # >= 2 so torch.export does not specialize the batch dimension to 1


@dataclass
class ExportResult:
    """What `export_onnx` wrote and how."""

    path: Path
    exporter: str  # "dynamo" or "torchscript"
    opset: int
    dynamic_batch: bool
    static_batch: int | None
    fallback_reason: str | None = None
    nodes: dict[str, int] = field(default_factory=dict)


def check_opset(opset: int) -> int:
    """Validate an opset request (>= 17: LayerNorm-era ops, what current runtimes expect)."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if not isinstance(opset, int) or opset < MIN_OPSET:
        raise CstarError(f"opset {opset} is too old (minimum {MIN_OPSET})", f"pass --opset between {MIN_OPSET} and {newest}")
    if opset > newest:
        raise CstarError(f"opset {opset} is newer than the installed onnx supports ({newest})",
                         f"pass --opset between {MIN_OPSET} and {newest}")
    return opset


def _batch_settings(dynamic_batch: bool, static_batch: int | None) -> tuple[bool, int]:
    if static_batch is not None:
        if int(static_batch) < 1:
            raise CstarError(f"static batch must be >= 1, got {static_batch}", "pass --static-batch N with N >= 1")
        return False, int(static_batch)
    return bool(dynamic_batch), _EXAMPLE_BATCH


def export_onnx(
    model: nn.Module,
    input_shape: tuple[int, ...] | list[int],
    path: str | Path,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    static_batch: int | None = None,
) -> ExportResult:
    """Export `model` (float32 NCHW input of `input_shape` = (C, H, W)) to a single .onnx file at `path`."""
    check_opset(opset)
    dynamic, batch = _batch_settings(dynamic_batch, static_batch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.rand(batch, *input_shape)
    exporter, reason = "dynamo", None
    try:
        _export_dynamo(model, example, path, opset, dynamic)
    except Exception as exc:  # noqa: BLE001 - any dynamo failure falls back to TorchScript
        exporter, reason = "torchscript", f"{type(exc).__name__}: {str(exc)[:300]}"
        path.unlink(missing_ok=True)
        _export_torchscript(model, example, path, opset, dynamic)
    nodes = finalize_onnx(path, opset)
    return ExportResult(path, exporter, opset, dynamic, None if dynamic else batch, reason, nodes)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    with _quiet():
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic_shapes, external_data=False, optimize=True,
        )
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    program.save(str(path), external_data=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None
    with _quiet():
        torch.onnx.export(
            model, (example,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True,
        )


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress chatter and warnings (errors still raise)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def ir_version_for_opset(opset: int) -> int:
    """The smallest IR version whose onnx release carries the ai.onnx `opset`."""
    import onnx

    candidates = [ir for _, ir, ai_onnx, *_ in onnx.helper.VERSION_TABLE if ai_onnx >= opset]
    return min(candidates) if candidates else onnx.IR_VERSION


def finalize_onnx(path: str | Path, opset: int | None = None) -> dict[str, int]:
    """Make `path` self-contained, lower its IR version, check it fully, shape-infer it; returns op counts."""
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for extra in Path(path).parent.glob(Path(path).name + ".data"):
        extra.unlink()  # a dynamo side file, now embedded
    graph_opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    model.ir_version = min(model.ir_version, ir_version_for_opset(int(graph_opset or DEFAULT_OPSET)))
    model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path), save_as_external_data=False)
    return op_counts(model)


def op_counts(model_or_path: Any) -> dict[str, int]:
    """{op_type: count} of the main graph (sorted by op type)."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, Path)) else model_or_path
    counts = Counter(node.op_type for node in model.graph.node)
    return dict(sorted(counts.items()))


def require_simplifier(simplifier: str) -> None:
    """Check the simplifier name and that its package imports (before any long work)."""
    if simplifier not in SIMPLIFIERS:
        raise CstarError(f"unknown simplifier '{simplifier}'", f"use one of: {', '.join(SIMPLIFIERS)}")
    if simplifier == "none":
        return
    try:
        __import__(simplifier)
    except ImportError as exc:
        raise MissingDependencyError(simplifier, purpose="simplifying the ONNX graph") from exc


def simplify(path_in: str | Path, path_out: str | Path, simplifier: str = "onnxslim") -> Path:
    """Simplify `path_in` into `path_out` with onnxsim, onnxslim or nothing ("none": a checked copy)."""
    import onnx

    require_simplifier(simplifier)
    model = onnx.load(str(path_in))
    original_ir = model.ir_version
    if simplifier == "onnxsim":
        import onnxsim

        with _quiet():
            model, ok = onnxsim.simplify(model)
        if not ok:
            raise RuntimeError("onnxsim could not validate the simplified model")
    elif simplifier == "onnxslim":
        import onnxslim

        with _quiet():
            model = onnxslim.slim(model)
    model.ir_version = min(model.ir_version, original_ir)
    onnx.save(model, str(path_out), save_as_external_data=False)
    finalize_onnx(path_out)
    return Path(path_out)
