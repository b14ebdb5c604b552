"""`cstar calibrate`: export dir -> INT8 explicit Q/DQ model, parity and robustness checked against FP32.

Reads an export directory (model.onnx verified by sha256), builds a class-stratified calibration set
from the TRAIN split (optionally part PGD on the PyTorch reference), quantizes with ONNX Runtime in
the format `--target` runs fast (ort-cpu/openvino: U8S8 QDQ; tensorrt: symmetric S8S8 QDQ, then the
TensorRT preflight; see calibration.quantize), then measures INT8 against the FP32 ONNX model on a
stratified subset of the TEST split: agreement, logit difference, clean accuracy and robust accuracy
under the apgd suite (APGD-CE, APGD-T over 3 targets) crafted on the PyTorch reference (transfer, the
same sets replayed on FP32) and on the INT8 model's fake-quant twin (white-box on the INT8 graph itself,
calibration.fakequant); robust_acc is the per-example worst case over all four sets. INT8 is executed as its target executes it
(calibration.execution): the TensorRT format as Q/DQ arithmetic (ORT CPU, graph optimizations off,
`parity.executed_as: qdq-reference`), the U8S8 formats on ORT CPU's fused kernels (`ort-cpu`). Writes
DIR/model.int8.onnx, then DIR/manifest.json last; its `quantization` block names the format and
target, which `cstar build` checks against the backend. `--target executorch` instead quantizes the
PyTorch reference with PT2E (XNNPACKQuantizer) and writes DIR/model.pte (format xnnpack-pt2e-int8,
measured the same way on the ExecuTorch runtime; see calibration.executorch_int8). The export read and
checked: calibration.export_input; the INT8-vs-FP32 measurement: calibration.int8_metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration.execution import Execution, execution_for
from calibration.export_input import ExportSource, open_export, read_export
from calibration.export_input import check_onnx_input as check_onnx_input  # re-exported (was defined here)
from calibration.int8_metrics import Int8Check, Int8Measurement, measure_int8
from calibration.measure import EVAL_APGD_ITERS as EVAL_APGD_ITERS  # re-exported (the eval suite's size)
from calibration.measure import EVAL_APGD_TARGETS as EVAL_APGD_TARGETS
from calibration.quantize import DEFAULT_TARGET, METHODS, TARGETS
from calibration.trt_check import PreflightReport, preflight
from cstar import validate
from cstar.errors import CstarError, GateFailure
from cstar.manifest import (
    MANIFEST_NAME,
    atomic_target,
    file_entry,
    read_manifest,
    sha256_file,
    write_manifest,
)
from export.reference import REFERENCE_STAGES, find_reference

INT8_NAME = "model.int8.onnx"
EXECUTORCH_TARGET = "executorch"  # INT8 .pte via PT2E + XNNPACK (calibration.executorch_int8), not ONNX Q/DQ
TARGET_CHOICES = (*TARGETS, EXECUTORCH_TARGET)
EVAL_PGD_STEPS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar calibrate`."""
    parser.add_argument("--from", dest="from_dir", required=True, help="export directory (model.onnx + manifest)")
    parser.add_argument("--data", required=True, help="dataset the model was exported for (name or name:path)")
    parser.add_argument("--samples", type=int, required=True, help="calibration images from the TRAIN split")
    parser.add_argument("--method", choices=METHODS, default="minmax", help="activation range calibration")
    parser.add_argument("--target", choices=TARGET_CHOICES, default=DEFAULT_TARGET,
                        help="runtime the INT8 model is for: ort-cpu and openvino get U8S8 Q/DQ, tensorrt "
                             "symmetric S8S8 Q/DQ, executorch an XNNPACK PT2E INT8 model.pte "
                             f"(default {DEFAULT_TARGET})")
    parser.add_argument("--include-adversarial", dest="include_adversarial", type=float, default=0.0,
                        metavar="FRACTION", help="fraction of calibration images replaced by PGD examples (0..1)")
    parser.add_argument("--reference", default=None, metavar="CKPT_DIR",
                        help="train/compress directory of the PyTorch reference (default: found via the export "
                             "manifest's inputs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of sample selection and PGD random starts")
    parser.add_argument("--parity-samples", dest="parity_samples", type=int, default=512,
                        help="stratified TEST images for INT8-vs-FP32 parity and accuracy")
    parser.add_argument("--strict-trt", dest="strict_trt", action="store_true",
                        help="fail (instead of warn) when the TensorRT preflight finds a problem "
                             "(--target tensorrt)")
    parser.add_argument("--no-twin-attack", dest="twin_attack", action="store_false",
                        help="do not craft the apgd suite on the INT8 model's fake-quant twin (robust_acc then "
                             "counts only the examples crafted on the FP32 reference, which understates the attack)")
    parser.add_argument("--out", required=True, help="output directory (model.int8.onnx + manifest.json)")
    parser.add_argument("--force", action="store_true", help="replace an existing calibrate directory at --out")


def main(args: argparse.Namespace) -> int:
    """CLI entry point."""
    manifest = run_calibrate(
        args.from_dir, args.out, force=args.force, data=args.data, samples=args.samples, method=args.method,
        include_adversarial=args.include_adversarial, reference=args.reference, seed=args.seed,
        parity_samples=args.parity_samples, strict_trt=args.strict_trt, target=args.target,
        twin_attack=args.twin_attack,
    )
    metrics, parity = manifest["metrics"], manifest["parity"]
    robust = metrics.get("robust_acc")
    crafted = " + fake-quant twin" if "robust_acc_twin_crafted" in metrics else ""
    robust_text = (f", robust {robust:.4f} (fp32 {metrics['fp32_robust_acc']:.4f}; APGD-CE + APGD-T crafted on "
                   f"the reference{crafted})" if robust is not None else "")
    quant = manifest["quantization"]
    written = (manifest.get("onnx") or manifest.get("artifact") or {}).get("file", INT8_NAME)
    print(f"wrote {Path(args.out) / written} ({quant['format']} for {quant['target']}): clean {metrics['clean_acc']:.4f} "
          f"(fp32 {metrics['fp32_clean_acc']:.4f}){robust_text}; agreement {parity['agreement']:.4f}, "
          f"max |dlogit| {parity['max_abs_diff']:.4g} on {parity['n']} test images "
          f"(executed as {parity.get('executed_as', 'ort-cpu')})")
    return 0


# ------------------------------------------------------------------------------------------ helpers


def _eval_set(spec: Any, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified TEST subset: (images, labels, indices)."""
    from cstar.data import load_dataset_from_spec, stratified_indices, to_tensors

    if n <= 0:
        raise CstarError(f"--parity-samples must be positive, got {n}", "pass --parity-samples 512")
    bundle = load_dataset_from_spec(spec)
    indices = stratified_indices(bundle.labels("test"), n, seed)
    images, labels = to_tensors(bundle.test, indices)
    return images.numpy().astype(np.float32), labels.numpy().astype(np.int64), indices


def _trt_preflight(model: Path, strict: bool, verbose: bool, warnings: list[str]) -> PreflightReport:
    """TensorRT preflight of the S8S8 model: a GateFailure under --strict-trt, else a recorded warning."""
    report = preflight(model)
    if not report.ok:
        text = "; ".join(report.problems)
        if strict:
            raise GateFailure(f"TensorRT preflight failed for the INT8 model: {text}",
                              "fix the problems listed, or drop --strict-trt to keep an ORT-only artifact")
        warnings.append(f"TensorRT preflight failed (artifact still runs on ONNX Runtime): {text}")
        print(f"warning: TensorRT preflight failed: {text}", file=sys.stderr)
    if verbose:
        for line in report.warnings:
            print(f"warning: trt preflight: {line}", file=sys.stderr)
    return report


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


# -------------------------------------------------------------------------------------------- stage


@dataclass(frozen=True)
class _Job:
    """Everything the INT8 step needs, gathered and checked before any output is written."""

    source: ExportSource
    reference_dir: Path | None
    warnings: list[str]
    calib: Any  # calibration.calib_set.CalibrationSet
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_indices: np.ndarray
    method: str
    target: str
    seed: int
    include_adversarial: float
    per_channel: bool
    strict_trt: bool
    twin_attack: bool
    verbose: bool


def run_calibrate(
    from_dir: str | Path,
    out_dir: str | Path,
    data: str,
    samples: int,
    method: str = "minmax",
    include_adversarial: float = 0.0,
    reference: str | Path | None = None,
    seed: int = 0,
    parity_samples: int = 512,
    strict_trt: bool = False,
    per_channel: bool = True,
    verbose: bool = True,
    target: str = DEFAULT_TARGET,
    force: bool = False,
    twin_attack: bool = True,
) -> dict[str, Any]:
    """Quantize an export directory to INT8 (QDQ, the format `target` runs fast) into `out_dir`.

    Returns the manifest written. `out_dir` follows cstar.outdir's rule (`force` replaces an existing
    calibrate directory). `twin_attack` also crafts the apgd suite on the INT8 model's fake-quant twin
    (calibration.fakequant) and counts it in `metrics.robust_acc` (the default: a transfer set crafted
    on FP32 alone understates what an attacker of the INT8 model finds).
    """
    from calibration.calib_set import build_calibration_set
    from cstar.outdir import OutputDir, dataset_path

    from_dir, out = Path(from_dir), Path(out_dir)
    _check_options(method, target, strict_trt, samples, include_adversarial)
    export = read_export(from_dir)
    claim = OutputDir(out, "calibrate", (from_dir, reference, dataset_path(data)), force=force)
    source = open_export(from_dir, export, data)
    reference_dir, warnings = _resolve_reference(reference, export, include_adversarial, target)
    calib = build_calibration_set(source.spec, samples, include_adversarial, reference_dir, seed, eps=source.eps,
                                  norm=source.norm)
    job = _Job(source, reference_dir, warnings, calib, *_eval_set(source.spec, parity_samples, seed), method=method,
               target=target, seed=seed, include_adversarial=include_adversarial, per_channel=per_channel,
               strict_trt=strict_trt, twin_attack=twin_attack, verbose=verbose)
    if target == EXECUTORCH_TARGET:
        return _calibrate_executorch(job, claim, out)
    return _calibrate_onnx(job, claim, out)


def _check_options(method: str, target: str, strict_trt: bool, samples: int, include_adversarial: float) -> None:
    """The option checks, before any work (the first bad option is the one reported)."""
    from calibration.quantize import target_format

    if method not in METHODS:
        raise CstarError(f"unknown calibration method '{method}'", f"use one of: {', '.join(METHODS)}")
    if target != EXECUTORCH_TARGET:
        target_format(target)  # unknown target: clear error before any work
    else:
        from export.executorch import require_executorch

        require_executorch("`cstar calibrate --target executorch`")  # before any work
    if strict_trt and target != "tensorrt":
        raise CstarError(f"--strict-trt checks the TensorRT format, but --target is {target}",
                         "add --target tensorrt, or drop --strict-trt")
    if samples <= 0:
        raise CstarError(f"--samples must be positive, got {samples}", "pass --samples 512 (or the train size)")
    validate.fraction("--include-adversarial", include_adversarial,
                      "pass the adversarial share of the calibration set in [0, 1], e.g. 0.5 (0: clean only)")


def _resolve_reference(reference: str | Path | None, export: dict[str, Any], include_adversarial: float,
                       target: str) -> tuple[Path | None, list[str]]:
    """(PyTorch reference directory or None, warnings): `--reference`, else found via the export's inputs."""
    warnings: list[str] = []
    reference_dir: Path | None
    if reference is not None:
        reference_dir = Path(reference)
        read_manifest(reference_dir, REFERENCE_STAGES)
    else:
        reference_dir, why = find_reference(export)
        if reference_dir is None:
            if include_adversarial > 0 or target == EXECUTORCH_TARGET:
                needs = "--target executorch quantizes" if target == EXECUTORCH_TARGET else "--include-adversarial needs"
                raise CstarError(f"{needs} the PyTorch reference, but {why}",
                                 "pass --reference DIR (the train/compress directory exported)")
            warnings.append(f"no PyTorch reference ({why}): robust accuracy not measured; pass --reference DIR")
    return reference_dir, warnings


def _calibrate_executorch(job: _Job, claim: Any, out: Path) -> dict[str, Any]:
    """`--target executorch`: PT2E INT8 model.pte (calibration.executorch_int8), staged and published by `claim`."""
    from calibration.executorch_int8 import CalibrationJob, calibrate_executorch

    src = job.source
    assert job.reference_dir is not None  # refused by _resolve_reference
    with claim as work:  # staged sibling, renamed into place once the .pte and manifest are written
        calibrate_executorch(CalibrationJob(
            src.from_dir, work, src.export, src.fp32_path, src.spec, src.eps, src.norm, job.reference_dir, job.calib,
            job.eval_images, job.eval_labels, job.eval_indices, job.method, job.seed, job.include_adversarial,
            job.warnings, pgd_steps=EVAL_PGD_STEPS), job.verbose)
    return read_manifest(out, ("calibrate",))


def _calibrate_onnx(job: _Job, claim: Any, final_dir: Path) -> dict[str, Any]:
    """ONNX Q/DQ targets: quantize, preflight, measure, write the manifest last; nothing left on failure."""
    from calibration.quantize import quantize_for_target

    out = claim.open()  # write into the staged sibling; renamed into place at the end
    tmp = atomic_target(out / INT8_NAME)
    final = out / INT8_NAME
    placed = False
    try:
        quant = quantize_for_target(job.source.fp32_path, tmp, job.calib.images, target=job.target,
                                    method=job.method, per_channel=job.per_channel)
        trt_report = _trt_preflight(tmp, job.strict_trt, job.verbose, job.warnings) if job.target == "tensorrt" else None
        execution = execution_for(job.target)  # the TensorRT format as Q/DQ arithmetic, not ORT CPU's S8S8 kernels
        result = measure_int8(Int8Check(job.source.fp32_path, tmp, execution, job.eval_images, job.eval_labels,
                                        job.source.eps, job.source.norm, job.seed, job.twin_attack),
                              job.reference_dir, job.source.spec)
        os.replace(tmp, final)
        placed = True
        write_manifest(out, "calibrate", _manifest_body(job, result, execution, quant, final, trt_report))
    except BaseException:
        _remove_quietly(tmp)
        if placed:
            _remove_quietly(final)
        claim.discard()
        raise
    claim.publish()
    return read_manifest(final_dir, ("calibrate",))


def _manifest_body(job: _Job, result: Int8Measurement, execution: Execution, quant: dict[str, Any], final: Path,
                   trt_report: PreflightReport | None) -> dict[str, Any]:
    """The calibrate manifest's body (key order as written)."""
    src, reference_dir = job.source, job.reference_dir
    body: dict[str, Any] = {
        "inputs": [file_entry(src.fp32_path), file_entry(src.from_dir / MANIFEST_NAME)]
        + ([file_entry(reference_dir / MANIFEST_NAME)] if reference_dir is not None else []),
        "dataset": src.export["dataset"],
        "model": src.export.get("model"),
        "eps": src.eps,
        "norm": src.norm,
        "metrics": result.metrics,
    }
    for key in ("params", "flops", "compression", "ranks", "classes", "input"):
        if key in src.export:
            body[key] = src.export[key]
    body["parity"] = {**result.parity, "against": "fp32-onnx", **execution.describe()}
    if result.parity_torch is not None:
        body["parity_torch"] = {**result.parity_torch, "against": "pytorch-reference",
                                "executed_as": execution.executed_as}
    body["onnx"] = _onnx_block(quant, final)
    body["precision"] = "int8"
    body["quantization"] = quant["quantization"]
    body["calibration"] = _calibration_block(job, quant)
    if trt_report is not None:
        body["trt_preflight"] = {"ok": trt_report.ok, "problems": trt_report.problems,
                                 "warnings": trt_report.warnings}
    body["warnings"] = job.warnings
    return body


def _onnx_block(quant: dict[str, Any], final: Path) -> dict[str, Any]:
    """manifest.onnx: the INT8 file, its sha256 and I/O (from calibration.quantize)."""
    return {
        "file": INT8_NAME,
        "sha256": sha256_file(final),
        "opset": quant["opset"],
        "input_name": quant["input_name"],
        "output_name": quant["output_name"],
        "dynamic_batch": quant["dynamic_batch"],
        "quant_format": "QDQ",
    }


def _calibration_block(job: _Job, quant: dict[str, Any]) -> dict[str, Any]:
    """manifest.calibration: the calibration set, method and quantizer settings, and the eval indices."""
    return {
        **job.calib.record(job.method, job.include_adversarial, job.seed),
        "per_channel": job.per_channel,
        "symmetric": quant["symmetric"],
        "activation_type": quant["activation_type"],
        "weight_type": quant["weight_type"],
        "quantize_bias": quant["quantize_bias"],
        "eval_indices": [int(i) for i in job.eval_indices],
    }
