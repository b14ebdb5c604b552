"""What a build may be: the precision a source gives, the INT8 format each backend runs correctly and fast,
the batch range and the counts. Every rule here refuses before any file is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME
from deploy.backends.registry import calibrate_target

PRECISIONS = ("fp32", "fp16", "int8")
EXECUTORCH_BACKEND, XNNPACK_FORMAT, PTE_NAME = "executorch-xnnpack", "xnnpack-pt2e-int8", "model.pte"
_PTE_ONLY_EXECUTORCH = ("cannot run it: it is an ExecuTorch program (model.pte, PT2E INT8 for XNNPACK) that only "
                        "executorch-xnnpack runs")
_EXECUTORCH_NEEDS_PTE = "runs ExecuTorch programs (.pte) quantized with PT2E for XNNPACK, not ONNX Q/DQ models"
_TRT_ONLY_SYMMETRIC = "needs symmetric int8 Q/DQ (int8 activations, every zero point 0): TensorRT takes nothing else"
_ORT_CPU_S8S8_SLOW = ("would run it far slower than U8S8, on small models slower than FP32: ONNX Runtime's fast "
                      "x86 INT8 kernels are U8S8 (1 thread, batch 1: ResNet-18 S8S8 8.4 ms, U8S8 3.5 ms, FP32 "
                      "14.1 ms; small-resnet S8S8 0.33 ms, FP32 0.24 ms)")


def resolve_precision(backend: str, source_stage: str, source_precision: str, requested: str | None) -> str:
    precision = requested or source_precision
    if precision not in PRECISIONS:
        raise CstarError(f"precision {precision!r} is not valid", f"use one of: {', '.join(PRECISIONS)}")
    if precision == source_precision:
        return precision
    if precision == "int8":
        raise CstarError(
            f"--precision int8 needs an INT8 (Q/DQ) model, but the {source_stage} directory holds {source_precision}",
            "run `cstar calibrate` and build from its directory",
        )
    if precision == "fp16" and source_precision == "fp32" and backend in ("tensorrt", "ort-trt"):
        return precision
    if precision == "fp16":
        raise CstarError(
            f"--precision fp16 is only available for tensorrt and ort-trt (asked for {backend})",
            "use --backend tensorrt or --backend ort-trt, or leave --precision out",
        )
    raise CstarError(
        f"--precision {precision} does not match the {source_stage} model ({source_precision})",
        f"build from an export directory for fp32, or leave --precision out (uses {source_precision})",
    )


def int8_format(manifest: dict[str, Any]) -> str | None:
    """The INT8 Q/DQ format of a calibrate manifest ('u8s8-qdq', 's8s8-qdq', ...); None when unrecorded."""
    quant = manifest.get("quantization")
    if isinstance(quant, dict) and quant.get("format"):
        return str(quant["format"])
    calib = manifest.get("calibration")
    if isinstance(calib, dict) and "activation_type" in calib and "symmetric" in calib:
        from calibration.quantize import format_name

        return format_name(str(calib["activation_type"]), bool(calib["symmetric"]))
    return None


def _format_problem(fmt: str, backend: str) -> str | None:
    """Why backend `backend` must not get an INT8 model in format `fmt` (None: fine)."""
    if (fmt == XNNPACK_FORMAT) != (backend == EXECUTORCH_BACKEND):
        return _PTE_ONLY_EXECUTORCH if fmt == XNNPACK_FORMAT else _EXECUTORCH_NEEDS_PTE
    if backend in ("tensorrt", "ort-trt") and fmt != "s8s8-qdq":
        return _TRT_ONLY_SYMMETRIC
    if backend == "ort-cpu" and fmt.startswith("s8s8"):
        return _ORT_CPU_S8S8_SLOW
    return None


def check_int8_format(manifest: dict[str, Any], source_dir: Path, backend: str) -> None:
    """Refuse an INT8 source whose format `backend` runs wrongly or slowly, naming both and the fix."""
    fmt = int8_format(manifest)
    if fmt is None:
        return
    problem = _format_problem(fmt, backend)
    if problem is None:
        return
    quant = manifest.get("quantization")
    target = quant.get("target") if isinstance(quant, dict) else None
    made_for = f"calibrated for --target {target}" if target else "no calibration target recorded"
    export_dir = next((str(Path(str(e["path"])).parent) for e in manifest.get("inputs", [])
                       if isinstance(e, dict) and Path(str(e.get("path", ""))).name == MANIFEST_NAME), "EXPORT_DIR")
    wanted = calibrate_target(backend)
    raise CstarError(
        f"the INT8 model in {source_dir} is {fmt} ({made_for}), but backend '{backend}' {problem}",
        f"run `cstar calibrate --from {export_dir} --target {wanted} ...` and build from its directory, "
        f"or build this directory for a backend that runs {fmt}"
        + (" (ort-cpu, openvino-cpu)" if fmt.startswith("u8s8") else f" ({EXECUTORCH_BACKEND})"
           if fmt == XNNPACK_FORMAT else " (tensorrt, ort-trt, openvino-cpu)"),
    )


def batch_range(batch_sizes: tuple[int, ...], opt_batch: int | None) -> tuple[int, int, int]:
    if len(batch_sizes) == 3:
        low, opt, high = (int(b) for b in batch_sizes)
    elif len(batch_sizes) == 2:
        low, high = (int(b) for b in batch_sizes)
        opt = int(opt_batch) if opt_batch is not None else max(low, min(8, high))
    else:
        raise CstarError(f"batch_sizes {batch_sizes} must be (min, max) or (min, opt, max)", "pass two or three sizes")
    if not 1 <= low <= opt <= high:
        raise CstarError(
            f"batch range min {low} <= opt {opt} <= max {high} does not hold",
            "pass 1 <= --min-batch <= --opt-batch <= --max-batch",
        )
    return low, opt, high



def check_counts(threads: int | None, workspace_mb: int) -> None:
    """Counts that must be positive, refused before any work (never written into build.json)."""
    if threads is not None and threads < 1:
        raise CstarError(f"--threads must be >= 1, got {threads}",
                         "pass a positive thread count, or leave --threads out (the runtime's default)")
    if workspace_mb < 1:
        raise CstarError(f"--workspace must be >= 1 MiB, got {workspace_mb}", "pass e.g. --workspace 1024")
