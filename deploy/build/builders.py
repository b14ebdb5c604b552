"""One builder per backend family (ONNX Runtime, OpenVINO, ExecuTorch, TensorRT), registered in `BUILDERS`
beside the backend registry: each writes its artifact into the staged build directory and returns
(build_info, runner options, artifact file name)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import atomic_path
from deploy.backends.registry import OPENVINO_DEVICES, ORT_PROVIDERS, runner_class
from deploy.build.policy import EXECUTORCH_BACKEND, PTE_NAME

ENGINE_NAME = "model.engine"
TRT_CACHE_DIR = "trt_cache"


@dataclass
class BuildRequest:
    """What a builder builds: the source model, where to, for which backend and precision, the batch range
    and the runtime counts. `written` collects every path it creates (removed again on any error)."""

    model: Path
    out: Path
    backend: str
    precision: str
    low: int
    opt: int
    high: int
    threads: int | None = None
    workspace_mb: int = 1024
    timing_cache: str | Path | None = None
    written: list[Path] = field(default_factory=list)
    source: Any = None  # the loaded source artifact (deploy.artifact.load_artifact); ExecuTorch reads it
    source_dir: Path | None = None

    def batch(self) -> dict[str, int]:
        return {"min": self.low, "opt": self.opt, "max": self.high}


Builder = Callable[[BuildRequest], tuple[dict[str, Any], dict[str, Any], str]]


def copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _copy_model(req: BuildRequest) -> Path:
    """Copy the ONNX model into the build (ONNX Runtime and OpenVINO read it directly)."""
    dst = req.out / req.model.name
    req.written.append(dst)
    copy_atomic(req.model, dst)
    return dst


def ort_trt_timing_cache_dir(timing_cache: str | Path) -> Path:
    """The folder ORT's TensorRT EP keeps its timing cache in, from `--timing-cache`.

    `--timing-cache` names a FILE for the native tensorrt backend; ORT's `trt_timing_cache_path` is a
    folder (ORT names the file inside it). An existing folder is used as is, otherwise the file's folder.
    """
    path = Path(timing_cache).resolve()
    return path if path.is_dir() else path.parent


def ort_execution_precision(backend: str, precision: str) -> str:
    """What the execution provider really computes in: the CUDA EP runs Q/DQ INT8 as fake-quantized FP32."""
    if backend == "ort-cuda" and precision == "int8":
        return "fp32 (Q/DQ fake-quantized: the CUDA EP has no INT8 conv kernels; use ort-trt or tensorrt)"
    return precision



def build_ort(req: BuildRequest) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Copy the ONNX model; returns (build_info, runner options, model file name)."""
    name = _copy_model(req).name
    threads = req.threads
    session_options = {"intra_op_threads": threads, "inter_op_threads": None, "graph_optimization_level": "all"}
    options: dict[str, Any] = {"graph_optimization_level": "all", "min_batch": req.low, "opt_batch": req.opt,
                               "max_batch": req.high}
    if threads is not None:
        options["intra_op_threads"] = int(threads)
    provider_options = _ort_trt_options(req, options) if req.backend == "ort-trt" else {}
    build_info: dict[str, Any] = {
        "backend": req.backend,
        "executes_as": ort_execution_precision(req.backend, req.precision),
        "provider": ORT_PROVIDERS[req.backend],
        "provider_options": provider_options,
        "session_options": session_options,
        "precision": req.precision,
        "model_file": name,
        "batch": req.batch(),
        "runner_options": options,
    }
    return build_info, options, name


def _ort_trt_options(req: BuildRequest, options: dict[str, Any]) -> dict[str, Any]:
    """ORT's TensorRT EP: engine and timing caches, FP16/INT8 flags and workspace (into `options` too)."""
    provider_options: dict[str, Any] = {}
    cache = req.out / TRT_CACHE_DIR
    if not cache.exists():
        req.written.append(cache)
    options["trt_engine_cache_path"] = TRT_CACHE_DIR  # relative: resolved against the build directory
    provider_options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": TRT_CACHE_DIR})
    if req.timing_cache is not None:
        options["trt_timing_cache_path"] = str(ort_trt_timing_cache_dir(req.timing_cache))
        provider_options.update({"trt_timing_cache_enable": True,
                                 "trt_timing_cache_path": options["trt_timing_cache_path"]})
    if req.precision == "fp16":
        options["trt_fp16_enable"] = True
        provider_options["trt_fp16_enable"] = True
    if req.precision == "int8":  # explicit Q/DQ: the TensorRT EP refuses INT8 layers unless int8 is enabled
        options["trt_int8_enable"] = True
        provider_options["trt_int8_enable"] = True
    options["workspace_mb"] = int(req.workspace_mb)
    provider_options["trt_max_workspace_size"] = int(req.workspace_mb) << 20
    return provider_options


def build_openvino(req: BuildRequest) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Copy the ONNX model (OpenVINO reads it directly); returns (build_info, runner options, file name).

    The ONNX file, not an IR, so the one sha256 in the manifest covers everything the device loads.
    """
    dst = _copy_model(req)
    options: dict[str, Any] = {"min_batch": req.low, "opt_batch": req.opt, "max_batch": req.high,
                               "inference_precision": "f32", "performance_hint": "LATENCY"}
    if req.threads is not None:
        options["intra_op_threads"] = int(req.threads)
    runner = runner_class(req.backend)(dst, **options)
    device = OPENVINO_DEVICES[req.backend]
    build_info: dict[str, Any] = {
        "backend": req.backend,
        "provider": f"openvino:{device}",
        "device": device,
        "provider_options": runner.compile_config(),  # type: ignore[attr-defined]
        "session_options": {"intra_op_threads": req.threads},
        "precision": req.precision,
        "model_file": dst.name,
        "batch": req.batch(),
        "runner_options": options,
    }
    return build_info, options, dst.name


def build_executorch(req: BuildRequest) -> tuple[dict[str, Any], dict[str, Any], str]:
    """model.pte: FP32 lowered from the export's checkpoint (needs torch), INT8 copied from a calibrate dir.

    The program's batch dimension is dynamic in [min, max] (bounds stored in the .pte); an INT8 program
    keeps the range calibrate exported, so a wider --max-batch is refused rather than silently cut.
    """
    source, source_dir = req.source, Path(req.source_dir or req.model.parent)
    dst = req.out / PTE_NAME
    req.written.append(dst)
    if req.precision == "int8":
        lowering = dict(source.manifest.get("executorch") or {})
        bounds = lowering.get("batch") or {}
        pte_low, pte_high = int(bounds.get("min", 1)), int(bounds.get("max", req.high))
        if req.low < pte_low or req.high > pte_high:
            raise CstarError(
                f"the INT8 program in {source_dir} takes batches {pte_low}..{pte_high}, not {req.low}..{req.high}",
                f"pass --min-batch/--max-batch within {pte_low}..{pte_high}",
            )
        copy_atomic(source.model_path, dst)
        lowering["lowered_from"] = {"path": str(source_dir.resolve()), "stage": "calibrate"}
    else:
        from export.executorch import build_fp32

        lowering = build_fp32(source_dir, source.manifest, source.model_path, dst, source.input_shape, req.low,
                              req.high)
    options: dict[str, Any] = {"min_batch": req.low, "opt_batch": req.opt, "max_batch": req.high}
    if req.threads is not None:
        options["intra_op_threads"] = int(req.threads)
    build_info: dict[str, Any] = {
        "backend": EXECUTORCH_BACKEND,
        "provider": "executorch:XnnpackBackend",
        "provider_options": {},
        "session_options": {"intra_op_threads": req.threads,
                            "threadpool": "ExecuTorch's process-wide pool (XNNPACK runs on it)"},
        "precision": req.precision,
        "model_file": PTE_NAME,
        "batch": req.batch(),
        "runner_options": options,
        "lowering": lowering,
    }
    return build_info, options, PTE_NAME


def build_tensorrt(req: BuildRequest) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Build model.engine; returns (build_info, runner options, engine file name)."""
    from deploy.backends.tensorrt import build_engine

    engine = req.out / ENGINE_NAME
    req.written.append(engine)
    info = build_engine(req.model, engine, req.low, req.opt, req.high, req.precision,
                        timing_cache_path=req.timing_cache, workspace_mb=req.workspace_mb)
    build_info: dict[str, Any] = {
        "backend": "tensorrt",
        "provider": "tensorrt",
        "provider_options": {},
        "session_options": {},
        "model_file": ENGINE_NAME,
        "source_model": req.model.name,
        **info,
        "runner_options": {},
    }
    return build_info, {}, ENGINE_NAME


# The builders by backend family; `builder_for` maps a registry backend name onto its family.
BUILDERS: dict[str, Builder] = {
    "ort": build_ort,
    "openvino": build_openvino,
    "executorch": build_executorch,
    "tensorrt": build_tensorrt,
}


def backend_family(backend: str) -> str:
    """The builder family of a registry backend name."""
    if backend == "tensorrt":
        return "tensorrt"
    if backend == EXECUTORCH_BACKEND:
        return "executorch"
    return "openvino" if backend in OPENVINO_DEVICES else "ort"


def builder_for(backend: str) -> Builder:
    return BUILDERS[backend_family(backend)]
