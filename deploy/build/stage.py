"""`cstar build` and `run_build`: check the request, build with the backend family's builder into the staged
directory, smoke-test, record build.json and the manifest (written last), publish; on any error no file
is left behind."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import (
    MANIFEST_NAME,
    atomic_write_json,
    file_entry,
    library_versions,
    read_manifest,
    sha256_file,
    write_manifest,
)
from deploy.backends.base import BUILD_INFO_NAME
from deploy.backends.registry import OPENVINO_DEVICES, backend_names, require_backend
from deploy.build.builders import BuildRequest, builder_for
from deploy.build.policy import PRECISIONS, batch_range, check_counts, check_int8_format, resolve_precision
from deploy.build.smoke import smoke_test

COPY_THROUGH = (
    "dataset", "model", "eps", "norm", "metrics", "params", "flops", "compression", "ranks", "parity",
    "input", "classes", "onnx", "calibration", "quantization",
)
VERSION_PACKAGES = ("numpy", "onnx", "onnxruntime", "onnxruntime-gpu", "tensorrt", "cuda-python", "cuda-bindings",
                    "openvino", "executorch")


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
    check_counts(threads, workspace_mb)
    claim = OutputDir(out, "build", (source_dir, timing_cache), force=force)
    source = load_artifact(source_dir)
    if source.stage == "build":
        raise CstarError(
            f"{source_dir} is already a build directory (for {source.backend})",
            "pass the export or calibrate directory it was built from",
        )
    chosen = resolve_precision(backend, source.stage, source.precision, precision)
    if chosen == "int8":
        check_int8_format(source.manifest, source_dir, backend)
    low, opt, high = batch_range(tuple(batch_sizes), opt_batch)
    _require_runtime(backend, chosen)  # MissingDependencyError before any file is written
    final_dir = out
    req = BuildRequest(source.model_path, claim.open(), backend, chosen, low, opt, high, threads, workspace_mb,
                       timing_cache, source=source, source_dir=source_dir)  # the staged sibling, renamed at the end
    try:
        _build_into(req)
    except BaseException:
        _cleanup(req.out, req.written)
        claim.discard()
        raise
    claim.publish()
    return read_manifest(final_dir)


def _require_runtime(backend: str, precision: str) -> None:
    """The backend's runtime (and TensorRT's FP16 converter) importable, else a MissingDependencyError."""
    require_backend(backend)
    if backend == "tensorrt":
        from deploy.backends.tensorrt import import_trt, require_fp16_converter

        import_trt()
        if precision == "fp16":  # a strongly typed network takes FP16 from a converted ONNX
            require_fp16_converter()


def _build_into(req: BuildRequest) -> None:
    """Build, smoke-test, then write build.json and the manifest into the staged directory `req.out`."""
    source, out = req.source, req.out
    build_info, runner_options, model_name = builder_for(req.backend)(req)
    smoke = smoke_test(req.backend, out / model_name, _resolved(runner_options, out, build_info),
                       source.input_shape, req.high, len(source.classes))
    _record_smoke(build_info, smoke, req)
    build_info["versions"] = library_versions(VERSION_PACKAGES)
    atomic_write_json(out / BUILD_INFO_NAME, build_info)
    req.written.append(out / BUILD_INFO_NAME)
    source_dir = Path(req.source_dir or source.model_path.parent)
    body: dict[str, Any] = {
        "inputs": [file_entry(source.model_path), file_entry(source_dir / MANIFEST_NAME)],
        "artifact": {"file": model_name, "sha256": sha256_file(out / model_name)},
        "backend": req.backend,
        "precision": req.precision,
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


def _record_smoke(build_info: dict[str, Any], smoke: dict[str, Any], req: BuildRequest) -> None:
    """What the smoke inference found: the batch range the runtime really takes, the input, where nodes ran."""
    lo, hi = smoke["effective_batch"]
    build_info["batch"] = {"min": lo, "opt": min(max(req.opt, lo), hi if hi is not None else req.opt),
                           "max": hi if hi is not None else req.high}
    build_info["input"] = smoke["input"]
    if req.backend in OPENVINO_DEVICES:
        build_info["execution_precisions"] = smoke["runner"].get("execution_precisions", {})
    if "node_providers" in smoke["runner"]:  # ort-cuda/ort-trt: where each node really ran
        build_info["node_providers"] = smoke["runner"]["node_providers"]
        build_info["fallback_nodes"] = smoke["runner"].get("fallback_nodes", [])


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
