"""`cstar build`: an export or calibrate directory -> a ready-to-run backend directory.

ONNX Runtime and OpenVINO backends get a copy of the ONNX model plus `build.json` (provider or device,
provider/compile and session options, batch range, versions); TensorRT gets `model.engine` built for
this GPU; executorch-xnnpack gets `model.pte` (FP32 lowered from the export's checkpoint, INT8 copied
from a `cstar calibrate --target executorch` directory). Either way the build opens the result once
and runs a smoke inference, so a broken artifact fails here and not on the device. An INT8 source
must be in the format the backend runs correctly and fast (the calibrate manifest's
`quantization.format`): U8S8 is refused for TensorRT (it takes symmetric int8 only), S8S8 for ort-cpu
(ONNX Runtime's x86 kernels run it 2.4x slower than U8S8), Q/DQ ONNX for executorch-xnnpack and
xnnpack-pt2e-int8 (a .pte) for every other backend.
`manifest.json` (stage `build`) is written last; on any error no file is left behind.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import (
    MANIFEST_NAME,
    atomic_path,
    atomic_write_json,
    file_entry,
    library_versions,
    read_manifest,
    sha256_file,
    write_manifest,
)
from deploy.backends.base import BUILD_INFO_NAME
from deploy.backends.registry import (
    OPENVINO_DEVICES,
    ORT_PROVIDERS,
    backend_names,
    calibrate_target,
    create_runner,
    require_backend,
    runner_class,
)

ENGINE_NAME = "model.engine"
TRT_CACHE_DIR = "trt_cache"
PRECISIONS = ("fp32", "fp16", "int8")
COPY_THROUGH = (
    "dataset", "model", "eps", "norm", "metrics", "params", "flops", "compression", "ranks", "parity",
    "input", "classes", "onnx", "calibration", "quantization",
)
VERSION_PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "cuda-bindings",
                    "openvino", "executorch")
EXECUTORCH_BACKEND, XNNPACK_FORMAT, PTE_NAME = "executorch-xnnpack", "xnnpack-pt2e-int8", "model.pte"
_PTE_ONLY_EXECUTORCH = ("cannot run it: it is an ExecuTorch program (model.pte, PT2E INT8 for XNNPACK) that only "
                        "executorch-xnnpack runs")
_EXECUTORCH_NEEDS_PTE = "runs ExecuTorch programs (.pte) quantized with PT2E for XNNPACK, not ONNX Q/DQ models"
_TRT_ONLY_SYMMETRIC = "needs symmetric int8 Q/DQ (int8 activations, every zero point 0): TensorRT takes nothing else"
_ORT_CPU_S8S8_SLOW = ("would run it far slower than U8S8, on small models slower than FP32: ONNX Runtime's fast "
                      "x86 INT8 kernels are U8S8 (1 thread, batch 1: ResNet-18 S8S8 8.4 ms, U8S8 3.5 ms, FP32 "
                      "14.1 ms; small-resnet S8S8 0.33 ms, FP32 0.24 ms)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `cstar build`."""
    parser.add_argument("--from", dest="from_dir", required=True, help="export or calibrate directory")
    parser.add_argument("--backend", default="ort-cpu", choices=backend_names(), help="runtime (default ort-cpu)")
    parser.add_argument("--out", required=True, help="output directory (the build artifact)")
    parser.add_argument("--min-batch", type=int, default=1, help="smallest batch the artifact accepts (default 1)")
    parser.add_argument("--opt-batch", type=int, default=None, help="batch TensorRT tunes for (default 8)")
    parser.add_argument("--max-batch", type=int, default=64, help="largest batch the artifact accepts (default 64)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="default: the source's (int8 for calibrate, fp32 for export); fp16 for tensorrt/ort-trt")
    parser.add_argument("--threads", type=int, default=None,
                        help="ONNX Runtime intra-op / OpenVINO inference threads (default: runtime's)")
    parser.add_argument("--timing-cache", default=None, help="TensorRT timing cache file (read and updated)")
    parser.add_argument("--workspace", dest="workspace_mb", type=int, default=1024, help="TensorRT workspace MiB")
    parser.add_argument("--force", action="store_true", help="replace an existing build directory at --out")


def main(args: argparse.Namespace) -> int:
    """Entry point of `cstar build`."""
    manifest = run_build(
        args.from_dir, args.backend, args.out,
        batch_sizes=(args.min_batch, args.max_batch), precision=args.precision, threads=args.threads,
        workspace_mb=args.workspace_mb, opt_batch=args.opt_batch, timing_cache=args.timing_cache, force=args.force,
    )
    build = manifest["build"]
    batch = build["batch"]
    print(
        f"built {manifest['artifact']['file']} for {manifest['backend']} ({manifest['precision']}, "
        f"batch {batch['min']}..{batch['max']}) in {args.out}"
    )
    return 0


def _resolve_precision(backend: str, source_stage: str, source_precision: str, requested: str | None) -> str:
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


def _batch_range(batch_sizes: tuple[int, ...], opt_batch: int | None) -> tuple[int, int, int]:
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


def _copy_atomic(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _smoke(runner_name: str, model_path: Path, options: dict[str, Any], chw: tuple[int, int, int],
           high: int, n_classes: int) -> dict[str, Any]:
    """Open the built artifact once and run zeros at the smallest and largest batch."""
    runner = create_runner(runner_name, model_path, **options)
    with runner:
        lo, hi = runner.batch_range()
        sizes = sorted({lo, hi if hi is not None else high})
        widths = set()
        for size in sizes:
            out = runner.infer(np.zeros((size, *chw), dtype=np.float32))
            if out.shape[0] != size or not np.isfinite(out).all():
                raise CstarError(
                    f"smoke inference on {model_path.name} returned shape {out.shape} / non-finite logits",
                    "check the source artifact (re-run export/calibrate)",
                )
            widths.add(out.shape[1])
        spec = runner.input_spec
        description = runner.describe()
    if n_classes and widths != {n_classes}:
        raise CstarError(
            f"{model_path.name} outputs {sorted(widths)} logits, but the manifest lists {n_classes} classes",
            "re-export the model from the right checkpoint",
        )
    return {
        "batch_sizes": sizes,
        "num_classes": widths.pop(),
        "input": {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype},
        "effective_batch": [lo, hi],
        "runner": description,
    }


def run_build(
    from_dir: str | Path,
    backend: str,
    out_dir: str | Path,
    batch_sizes: tuple[int, ...] = (1, 64),
    precision: str | None = None,
    threads: int | None = None,
    workspace_mb: int = 1024,
    opt_batch: int | None = None,
    timing_cache: str | Path | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Build `backend`'s artifact from an export/calibrate directory into `out_dir`; returns the manifest.

    `out_dir` follows cstar.outdir's rule (`force` replaces an existing build directory).
    """
    from cstar.outdir import OutputDir
    from deploy.artifact import load_artifact

    if backend not in backend_names():
        raise CstarError(f"unknown backend '{backend}'", f"use one of: {', '.join(backend_names())}")
    source_dir, out = Path(from_dir), Path(out_dir)
    _check_counts(threads, workspace_mb)
    claim = OutputDir(out, "build", (source_dir, timing_cache), force=force)
    source = load_artifact(source_dir)
    if source.stage == "build":
        raise CstarError(
            f"{source_dir} is already a build directory (for {source.backend})",
            "pass the export or calibrate directory it was built from",
        )
    chosen = _resolve_precision(backend, source.stage, source.precision, precision)
    if chosen == "int8":
        check_int8_format(source.manifest, source_dir, backend)
    low, opt, high = _batch_range(tuple(batch_sizes), opt_batch)
    require_backend(backend)  # MissingDependencyError before any file is written
    if backend == "tensorrt":
        from deploy.backends.tensorrt import _import_trt, require_fp16_converter

        _import_trt()
        if chosen == "fp16":  # a strongly typed network takes FP16 from a converted ONNX
            require_fp16_converter()
    final_dir, out = out, claim.open()  # write into the staged sibling; renamed into place at the end
    written: list[Path] = []
    try:
        if backend == "tensorrt":
            build_info, runner_options, model_name = _build_tensorrt(
                source.model_path, out, chosen, low, opt, high, timing_cache, workspace_mb, written
            )
        elif backend == EXECUTORCH_BACKEND:
            build_info, runner_options, model_name = _build_executorch(
                source, source_dir, out, chosen, low, opt, high, threads, written
            )
        elif backend in OPENVINO_DEVICES:
            build_info, runner_options, model_name = _build_openvino(
                source.model_path, out, backend, chosen, low, opt, high, threads, written
            )
        else:
            build_info, runner_options, model_name = _build_ort(
                source.model_path, out, backend, chosen, low, opt, high, threads, workspace_mb, timing_cache,
                written,
            )
        smoke = _smoke(backend, out / model_name, _resolved(runner_options, out, build_info),
                       source.input_shape, high, len(source.classes))
        lo, hi = smoke["effective_batch"]
        build_info["batch"] = {"min": lo, "opt": min(max(opt, lo), hi if hi is not None else opt),
                               "max": hi if hi is not None else high}
        build_info["input"] = smoke["input"]
        if backend in OPENVINO_DEVICES:
            build_info["execution_precisions"] = smoke["runner"].get("execution_precisions", {})
        if "node_providers" in smoke["runner"]:  # ort-cuda/ort-trt: where each node really ran
            build_info["node_providers"] = smoke["runner"]["node_providers"]
            build_info["fallback_nodes"] = smoke["runner"].get("fallback_nodes", [])
        build_info["versions"] = library_versions(VERSION_PACKAGES)
        atomic_write_json(out / BUILD_INFO_NAME, build_info)
        written.append(out / BUILD_INFO_NAME)

        body: dict[str, Any] = {
            "inputs": [file_entry(source.model_path), file_entry(source_dir / MANIFEST_NAME)],
            "artifact": {"file": model_name, "sha256": sha256_file(out / model_name)},
            "backend": backend,
            "precision": chosen,
            "build": build_info,
            "build_file": {"file": BUILD_INFO_NAME, "sha256": sha256_file(out / BUILD_INFO_NAME)},
            "smoke": {k: smoke[k] for k in ("batch_sizes", "num_classes")},
            "source": {"path": str(source_dir.resolve()), "stage": source.stage, "precision": source.precision,
                       "sha256": source.sha256},
        }
        for key in COPY_THROUGH:
            if key in source.manifest:
                body[key] = source.manifest[key]
        body["versions"] = {**source.manifest.get("versions", {}), **library_versions(VERSION_PACKAGES)}
        write_manifest(out, "build", body)
    except BaseException:
        _cleanup(out, written)
        claim.discard()
        raise
    claim.publish()
    return read_manifest(final_dir)


def _check_counts(threads: int | None, workspace_mb: int) -> None:
    """Counts that must be positive, refused before any work (never written into build.json)."""
    if threads is not None and threads < 1:
        raise CstarError(f"--threads must be >= 1, got {threads}",
                         "pass a positive thread count, or leave --threads out (the runtime's default)")
    if workspace_mb < 1:
        raise CstarError(f"--workspace must be >= 1 MiB, got {workspace_mb}", "pass e.g. --workspace 1024")


def _resolved(runner_options: dict[str, Any], out: Path, build_info: dict[str, Any]) -> dict[str, Any]:
    from deploy.artifact import runner_options_from_build

    return runner_options_from_build({**build_info, "runner_options": runner_options}, out)


def _cleanup(out: Path, written: list[Path]) -> None:
    for path in written:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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


def _build_ort(
    model: Path, out: Path, backend: str, precision: str, low: int, opt: int, high: int,
    threads: int | None, workspace_mb: int, timing_cache: str | Path | None, written: list[Path],
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Copy the ONNX model; returns (build_info, runner options, model file name)."""
    name = model.name
    dst = out / name
    written.append(dst)
    _copy_atomic(model, dst)
    session_options = {"intra_op_threads": threads, "inter_op_threads": None, "graph_optimization_level": "all"}
    options: dict[str, Any] = {"graph_optimization_level": "all", "min_batch": low, "opt_batch": opt, "max_batch": high}
    if threads is not None:
        options["intra_op_threads"] = int(threads)
    provider_options: dict[str, Any] = {}
    if backend == "ort-trt":
        cache = out / TRT_CACHE_DIR
        if not cache.exists():
            written.append(cache)
        options["trt_engine_cache_path"] = TRT_CACHE_DIR  # relative: resolved against the build directory
        provider_options.update({"trt_engine_cache_enable": True, "trt_engine_cache_path": TRT_CACHE_DIR})
        if timing_cache is not None:
            options["trt_timing_cache_path"] = str(ort_trt_timing_cache_dir(timing_cache))
            provider_options.update({"trt_timing_cache_enable": True,
                                     "trt_timing_cache_path": options["trt_timing_cache_path"]})
        if precision == "fp16":
            options["trt_fp16_enable"] = True
            provider_options["trt_fp16_enable"] = True
        if precision == "int8":  # explicit Q/DQ: the TensorRT EP refuses INT8 layers unless int8 is enabled
            options["trt_int8_enable"] = True
            provider_options["trt_int8_enable"] = True
        options["workspace_mb"] = int(workspace_mb)
        provider_options["trt_max_workspace_size"] = int(workspace_mb) << 20
    build_info: dict[str, Any] = {
        "backend": backend,
        "executes_as": ort_execution_precision(backend, precision),
        "provider": ORT_PROVIDERS[backend],
        "provider_options": provider_options,
        "session_options": session_options,
        "precision": precision,
        "model_file": name,
        "batch": {"min": low, "opt": opt, "max": high},
        "runner_options": options,
    }
    return build_info, options, name


def _build_openvino(
    model: Path, out: Path, backend: str, precision: str, low: int, opt: int, high: int,
    threads: int | None, written: list[Path],
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Copy the ONNX model (OpenVINO reads it directly); returns (build_info, runner options, file name).

    The ONNX file, not an IR, so the one sha256 in the manifest covers everything the device loads.
    """
    name = model.name
    dst = out / name
    written.append(dst)
    _copy_atomic(model, dst)
    options: dict[str, Any] = {"min_batch": low, "opt_batch": opt, "max_batch": high,
                               "inference_precision": "f32", "performance_hint": "LATENCY"}
    if threads is not None:
        options["intra_op_threads"] = int(threads)
    runner = runner_class(backend)(dst, **options)
    device = OPENVINO_DEVICES[backend]
    build_info: dict[str, Any] = {
        "backend": backend,
        "provider": f"openvino:{device}",
        "device": device,
        "provider_options": runner.compile_config(),  # type: ignore[attr-defined]
        "session_options": {"intra_op_threads": threads},
        "precision": precision,
        "model_file": name,
        "batch": {"min": low, "opt": opt, "max": high},
        "runner_options": options,
    }
    return build_info, options, name


def _build_executorch(
    source: Any, source_dir: Path, out: Path, precision: str, low: int, opt: int, high: int,
    threads: int | None, written: list[Path],
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """model.pte: FP32 lowered from the export's checkpoint (needs torch), INT8 copied from a calibrate dir.

    The program's batch dimension is dynamic in [min, max] (bounds stored in the .pte); an INT8 program
    keeps the range calibrate exported, so a wider --max-batch is refused rather than silently cut.
    """
    dst = out / PTE_NAME
    written.append(dst)
    if precision == "int8":
        lowering = dict(source.manifest.get("executorch") or {})
        bounds = lowering.get("batch") or {}
        pte_low, pte_high = int(bounds.get("min", 1)), int(bounds.get("max", high))
        if low < pte_low or high > pte_high:
            raise CstarError(
                f"the INT8 program in {source_dir} takes batches {pte_low}..{pte_high}, not {low}..{high}",
                f"pass --min-batch/--max-batch within {pte_low}..{pte_high}",
            )
        _copy_atomic(source.model_path, dst)
        lowering["lowered_from"] = {"path": str(source_dir.resolve()), "stage": "calibrate"}
    else:
        from calibration.executorch_lower import build_fp32

        lowering = build_fp32(source_dir, source.manifest, source.model_path, dst, source.input_shape, low, high)
    options: dict[str, Any] = {"min_batch": low, "opt_batch": opt, "max_batch": high}
    if threads is not None:
        options["intra_op_threads"] = int(threads)
    build_info: dict[str, Any] = {
        "backend": EXECUTORCH_BACKEND,
        "provider": "executorch:XnnpackBackend",
        "provider_options": {},
        "session_options": {"intra_op_threads": threads,
                            "threadpool": "ExecuTorch's process-wide pool (XNNPACK runs on it)"},
        "precision": precision,
        "model_file": PTE_NAME,
        "batch": {"min": low, "opt": opt, "max": high},
        "runner_options": options,
        "lowering": lowering,
    }
    return build_info, options, PTE_NAME


def _build_tensorrt(
    model: Path, out: Path, precision: str, low: int, opt: int, high: int,
    timing_cache: str | Path | None, workspace_mb: int, written: list[Path],
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Build model.engine; returns (build_info, runner options, engine file name)."""
    from deploy.backends.tensorrt import build_engine

    engine = out / ENGINE_NAME
    written.append(engine)
    info = build_engine(model, engine, low, opt, high, precision,
                        timing_cache_path=timing_cache, workspace_mb=workspace_mb)
    build_info: dict[str, Any] = {
        "backend": "tensorrt",
        "provider": "tensorrt",
        "provider_options": {},
        "session_options": {},
        "model_file": ENGINE_NAME,
        "source_model": model.name,
        **info,
        "runner_options": {},
    }
    return build_info, {}, ENGINE_NAME
