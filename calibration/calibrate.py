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
measured the same way on the ExecuTorch runtime; see calibration.executorch_int8).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from calibration import measure
from calibration.execution import execution_for
from calibration.measure import EVAL_APGD_ITERS, EVAL_APGD_TARGETS, transfer_block
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
    verify_file,
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


def _check_data(data: str, spec: Any) -> Any:
    """The DatasetSpec to load: the export's, with the --data path when one is given; names must match."""
    from dataclasses import replace

    from cstar.data import parse_dataset_arg

    name, path = parse_dataset_arg(data)
    if name != spec.name:
        raise CstarError(
            f"--data {data} names dataset '{name}', but the model was exported for '{spec.name}'",
            f"pass --data {spec.data_arg}",
        )
    return spec if path is None else replace(spec, path=path)


def check_onnx_input(model_path: Path, shape: tuple[int, ...], from_dir: Path) -> None:
    """Refuse an ONNX model whose input is not (N, *shape), the input its manifest records (before any work)."""
    import onnx

    try:
        graph = onnx.load(str(model_path), load_external_data=False).graph
    except Exception as exc:  # noqa: BLE001 - a broken protobuf is one clear message
        raise CstarError(f"{model_path} is not a readable ONNX model ({exc})", "re-run cstar export") from exc
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in inputs[0].type.tensor_type.shape.dim] if len(inputs) == 1 else []
    fixed = dims[1:]
    if len(inputs) != 1 or len(dims) != len(shape) + 1 or any(
            d is not None and d != want for d, want in zip(fixed, shape, strict=True)):
        got = f"{len(inputs)} inputs" if len(inputs) != 1 else \
            "input (" + ", ".join("N" if d is None else str(d) for d in dims) + ")"
        raise CstarError(f"{model_path} takes {got}, but {from_dir}/{MANIFEST_NAME} records (N, "
                         f"{', '.join(str(d) for d in shape)})", "re-run cstar export (the model and its manifest disagree)")




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
    from calibration.calib_set import build_calibration_set, craft_apgd
    from calibration.fakequant import craft_on_twin
    from calibration.quantize import quantize_for_target, target_format
    from cstar.data import DatasetSpec
    from cstar.outdir import OutputDir, dataset_path
    from export.reference import load_reference

    from_dir, out = Path(from_dir), Path(out_dir)
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
    export = read_manifest(from_dir, ("export",))
    for key in ("onnx", "dataset"):
        if key not in export:
            raise CstarError(f"{from_dir}/{MANIFEST_NAME} lacks '{key}'", "re-run cstar export")
    claim = OutputDir(out, "calibrate", (from_dir, reference, dataset_path(data)), force=force)
    onnx_block = export["onnx"]
    fp32_path = verify_file(from_dir, onnx_block["file"], onnx_block["sha256"])
    spec = _check_data(data, DatasetSpec.from_dict(export["dataset"]))
    check_onnx_input(fp32_path, tuple(spec.input_shape), from_dir)
    eps = float(export.get("eps", spec.default_eps))
    norm = str(export.get("norm", "linf"))
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

    calib = build_calibration_set(spec, samples, include_adversarial, reference_dir, seed, eps=eps, norm=norm)
    eval_images, eval_labels, eval_indices = _eval_set(spec, parity_samples, seed)
    if target == EXECUTORCH_TARGET:
        from calibration.executorch_int8 import CalibrationJob, calibrate_executorch

        assert reference_dir is not None  # refused above
        with claim as work:  # staged sibling, renamed into place once the .pte and manifest are written
            calibrate_executorch(CalibrationJob(
                from_dir, work, export, fp32_path, spec, eps, norm, reference_dir, calib, eval_images, eval_labels,
                eval_indices, method, seed, include_adversarial, warnings, pgd_steps=EVAL_PGD_STEPS), verbose)
        return read_manifest(out, ("calibrate",))

    final_dir, out = out, claim.open()  # write into the staged sibling; renamed into place at the end
    tmp = atomic_target(out / INT8_NAME)
    final = out / INT8_NAME
    placed = False
    try:
        quant = quantize_for_target(fp32_path, tmp, calib.images, target=target, method=method,
                                    per_channel=per_channel)
        trt_report = _trt_preflight(tmp, strict_trt, verbose, warnings) if target == "tensorrt" else None

        execution = execution_for(target)  # the TensorRT format as Q/DQ arithmetic, not ORT CPU's S8S8 kernels
        fp32_session, int8_session = measure.session(fp32_path), measure.session(tmp, execution)
        fp32_logits = measure.run_logits_of(fp32_session, eval_images)
        int8_logits = measure.run_logits_of(int8_session, eval_images)
        parity = measure.parity(int8_logits, fp32_logits)
        metrics: dict[str, Any] = {
            "clean_acc": measure.accuracy(int8_logits, eval_labels),
            "robust_acc": None,
            "fp32_clean_acc": measure.accuracy(fp32_logits, eval_labels),
            "fp32_robust_acc": None,
            "n": int(eval_labels.shape[0]),
            "executed_as": execution.executed_as,
        }
        parity_torch: dict[str, Any] | None = None
        if reference_dir is not None:
            import torch

            model, _ = load_reference(reference_dir, spec)
            with torch.no_grad():
                torch_logits = model(torch.from_numpy(eval_images)).float().numpy()
            parity_torch = measure.parity(int8_logits, torch_logits)
            sets = craft_apgd(model, eval_images, eval_labels, eps, norm, seed, EVAL_APGD_ITERS, EVAL_APGD_TARGETS)
            int8_run = functools.partial(measure.run_logits_of, int8_session)
            fp32_run = functools.partial(measure.run_logits_of, fp32_session)
            metrics["fp32_robust_acc"] = measure.worst_case(fp32_run, sets, eval_labels)
            metrics["reference_robust_acc"] = measure.worst_case(functools.partial(measure.torch_logits, model), sets,
                                                                 eval_labels)
            metrics["attack"] = transfer_block(eps, norm, seed)
            if twin_attack:  # white-box on the INT8 graph itself, beside the reference's transfer sets
                twin_sets, twin_check = craft_on_twin(tmp, eval_images, eval_labels, eps, norm, seed,
                                                        EVAL_APGD_ITERS, EVAL_APGD_TARGETS)
                metrics["robust_acc_reference_crafted"] = measure.worst_case(int8_run, sets, eval_labels)
                metrics["robust_acc_twin_crafted"] = measure.worst_case(int8_run, twin_sets, eval_labels)
                metrics["twin_parity"] = twin_check.to_dict()
                metrics["attack"]["crafted_on"] = ["pytorch-reference", "fake-quant-twin"]
                sets = {**sets, **{f"{name}_fq": adv for name, adv in twin_sets.items()}}
            metrics["robust_acc"] = measure.worst_case(int8_run, sets, eval_labels)
        del fp32_session, int8_session

        os.replace(tmp, final)
        placed = True
        body: dict[str, Any] = {
            "inputs": [file_entry(fp32_path), file_entry(from_dir / MANIFEST_NAME)]
            + ([file_entry(reference_dir / MANIFEST_NAME)] if reference_dir is not None else []),
            "dataset": export["dataset"],
            "model": export.get("model"),
            "eps": eps,
            "norm": norm,
            "metrics": metrics,
        }
        for key in ("params", "flops", "compression", "ranks", "classes", "input"):
            if key in export:
                body[key] = export[key]
        body["parity"] = {**parity, "against": "fp32-onnx", **execution.describe()}
        if parity_torch is not None:
            body["parity_torch"] = {**parity_torch, "against": "pytorch-reference",
                                   "executed_as": execution.executed_as}
        body["onnx"] = {
            "file": INT8_NAME,
            "sha256": sha256_file(final),
            "opset": quant["opset"],
            "input_name": quant["input_name"],
            "output_name": quant["output_name"],
            "dynamic_batch": quant["dynamic_batch"],
            "quant_format": "QDQ",
        }
        body["precision"] = "int8"
        body["quantization"] = quant["quantization"]
        body["calibration"] = {
            "samples": int(len(calib)),
            "method": method,
            "split": calib.split,
            "indices": [int(i) for i in calib.indices],
            "adversarial_fraction": float(include_adversarial),
            "n_adversarial": int(calib.n_adversarial),
            "adversarial_attack": calib.attack,
            "seed": seed,
            "per_channel": per_channel,
            "symmetric": quant["symmetric"],
            "activation_type": quant["activation_type"],
            "weight_type": quant["weight_type"],
            "quantize_bias": quant["quantize_bias"],
            "eval_indices": [int(i) for i in eval_indices],
        }
        if trt_report is not None:
            body["trt_preflight"] = {"ok": trt_report.ok, "problems": trt_report.problems,
                                     "warnings": trt_report.warnings}
        body["warnings"] = warnings
        write_manifest(out, "calibrate", body)
    except BaseException:
        _remove_quietly(tmp)
        if placed:
            _remove_quietly(final)
        claim.discard()
        raise
    claim.publish()
    return read_manifest(final_dir, ("calibrate",))
