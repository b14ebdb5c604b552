"""INT8 for the ExecuTorch XNNPACK backend (`cstar calibrate --target executorch`; host side: torch + executorch).

PT2E with `XNNPACKQuantizer` (`get_symmetric_quantization_config(is_per_channel=True)`: int8 symmetric
per-channel weights, int8 per-tensor affine activations, float bias) on the export's checkpoint in its
deploy form, calibrated on the images `cstar calibrate` uses, then lowered, written and run with the FP32
path's steps (export.executorch: export_program, lower, write_pte, run_pte). The format is
`xnnpack-pt2e-int8`; only the executorch-xnnpack backend runs it. The program is measured on the
ExecuTorch runtime itself with calibrate's helpers (calibration.measure) against the FP32 ONNX model
and the PyTorch reference, and the calibrate manifest is written last.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from calibration import measure
from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, read_manifest
from export.executorch import (
    BACKEND,
    PTE_NAME,
    deploy_model,
    export_program,
    lower,
    require_executorch,
    run_pte,
    write_pte,
)

TARGET = "executorch"
FORMAT = "xnnpack-pt2e-int8"
DEFAULT_MAX_BATCH = 64
# activation observer per `cstar calibrate --method` (weights always per-channel min/max)
OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver", "percentile": "HistogramObserver"}


# ------------------------------------------------------------------------------------------ quantize (PT2E)


def quantization_config(method: str) -> tuple[Any, str]:
    """(XNNPACK quantization config, activation observer name) for a `cstar calibrate --method`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    if method not in OBSERVERS:
        raise CstarError(f"unknown calibration method '{method}'", f"use one of: {', '.join(OBSERVERS)}")
    config = get_symmetric_quantization_config(is_per_channel=True)
    observer = OBSERVERS[method]
    if observer == "MinMaxObserver":
        from torchao.quantization.pt2e import MinMaxObserver

        observer_ctr = MinMaxObserver.with_args(eps=2**-12)
        spec = replace(config.input_activation, observer_or_fake_quant_ctr=observer_ctr)
        config = replace(config, input_activation=spec, output_activation=spec)
    return config, observer


def quantize(model: Any, images: np.ndarray, input_shape: Sequence[int], low: int, high: int,
             method: str = "minmax") -> tuple[Any, str]:
    """PT2E INT8 (XNNPACKQuantizer) of a deploy-form model calibrated on `images`: (program, observer)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    require_executorch(f"INT8 for the {BACKEND} backend")
    if images.shape[0] == 0:
        raise CstarError("no calibration images", "pass --samples N with N >= 1")
    config, observer = quantization_config(method)
    graph = export_program(model.eval(), input_shape, low, high).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
    with torch.no_grad():
        for start in range(0, images.shape[0], high):
            chunk = np.ascontiguousarray(images[start : start + high], dtype=np.float32)
            if chunk.shape[0] < low:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - chunk.shape[0], axis=0)])
            prepared(torch.from_numpy(chunk))
    converted = convert_pt2e(prepared)
    return export_program(converted, input_shape, low, high), observer


def quantization_block(observer: str) -> dict[str, Any]:
    """The manifest's `quantization` block of an xnnpack-pt2e-int8 program."""
    return {
        "format": FORMAT,
        "target": TARGET,
        "quant_format": "pt2e",
        "quantizer": "XNNPACKQuantizer get_symmetric_quantization_config(is_per_channel=True)",
        "activations": {"type": "int8", "symmetric": False, "granularity": "per-tensor",
                        "observer": observer},
        "weights": {"type": "int8", "symmetric": True, "granularity": "per-channel", "bits": 8,
                    "range": [-127, 127]},
        "reduce_range": False,
        "per_channel": True,
        "bias": "float",
    }


# ------------------------------------------------------------------------------------------ calibrate (INT8)


@dataclass
class CalibrationJob:
    """What `cstar calibrate --target executorch` prepared before quantizing (see calibration.calibrate)."""

    from_dir: Path
    out: Path
    export: dict[str, Any]
    fp32_path: Path
    spec: Any
    eps: float
    norm: str
    reference_dir: Path
    calib: Any
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_indices: np.ndarray
    method: str
    seed: int
    include_adversarial: float
    warnings: list[str]
    max_batch: int = DEFAULT_MAX_BATCH
    pgd_steps: int = 20


def _metrics(job: CalibrationJob, pte: Path,
             model: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics, parity vs FP32 ONNX, parity vs PyTorch) of the INT8 program on the TEST subset."""
    import torch

    from calibration.calib_set import craft_apgd

    fp32 = measure.session(job.fp32_path)
    int8_logits, fp32_logits = run_pte(pte, job.eval_images), measure.run_logits_of(fp32, job.eval_images)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(job.eval_images)).float().numpy()
    sets = craft_apgd(model, job.eval_images, job.eval_labels, job.eps, job.norm, job.seed,
                      measure.EVAL_APGD_ITERS, measure.EVAL_APGD_TARGETS)
    labels = job.eval_labels
    metrics = {
        "clean_acc": measure.accuracy(int8_logits, labels),
        "robust_acc": measure.worst_case(functools.partial(run_pte, pte), sets, labels),
        "fp32_clean_acc": measure.accuracy(fp32_logits, labels),
        "fp32_robust_acc": measure.worst_case(functools.partial(measure.run_logits_of, fp32), sets, labels),
        "reference_robust_acc": measure.worst_case(functools.partial(measure.torch_logits, model), sets,
                                                   labels),
        "n": int(labels.shape[0]),
        "executed_as": BACKEND,  # measured on the ExecuTorch runtime itself
        "attack": measure.transfer_block(job.eps, job.norm, job.seed),
    }
    parity = {**measure.parity(int8_logits, fp32_logits), "against": "fp32-onnx", "runtime": BACKEND,
              "executed_as": BACKEND}
    parity_torch = {**measure.parity(int8_logits, torch_logits), "against": "pytorch-reference"}
    return metrics, parity, parity_torch


def calibrate_executorch(job: CalibrationJob, verbose: bool = True) -> dict[str, Any]:
    """INT8 `.pte` (xnnpack-pt2e-int8) of the export's checkpoint into job.out; returns the manifest."""
    from cstar.manifest import file_entry, sha256_file, write_manifest
    from export.reference import load_reference

    require_executorch(f"`cstar calibrate --target {TARGET}`")
    model, _ = load_reference(job.reference_dir, job.spec)
    shape = tuple(int(d) for d in job.spec.input_shape)
    exported, observer = quantize(deploy_model(model, job.export), job.calib.images, shape, 1, job.max_batch,
                                  job.method)
    lowered = lower(exported, 1, job.max_batch)
    job.warnings.extend(lowered.warnings)
    for line in lowered.warnings:
        if verbose:
            print(f"warning: {line}", file=sys.stderr)
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / MANIFEST_NAME).unlink(missing_ok=True)  # unfinished until the new manifest lands
    final = job.out / PTE_NAME
    try:
        write_pte(lowered, final)
        metrics, parity, parity_torch = _metrics(job, final, model)
        body: dict[str, Any] = {
            "inputs": [file_entry(job.fp32_path), file_entry(job.from_dir / MANIFEST_NAME),
                       file_entry(job.reference_dir / MANIFEST_NAME)],
            "dataset": job.export["dataset"],
            "model": job.export.get("model"),
            "eps": job.eps,
            "norm": job.norm,
            "metrics": metrics,
        }
        for key in ("params", "flops", "compression", "ranks", "classes", "input", "deploy_forms"):
            if key in job.export:
                body[key] = job.export[key]
        body["parity"] = parity
        body["parity_torch"] = parity_torch
        body["artifact"] = {"file": PTE_NAME, "sha256": sha256_file(final), "format": "pte",
                            "backend": BACKEND}
        body["executorch"] = lowered.record()
        body["precision"] = "int8"
        body["quantization"] = quantization_block(observer)
        body["calibration"] = _calibration_record(job, observer)
        body["warnings"] = job.warnings
        write_manifest(job.out, "calibrate", body)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return read_manifest(job.out, ("calibrate",))


def _calibration_record(job: CalibrationJob, observer: str) -> dict[str, Any]:
    """The manifest's `calibration` block: which images calibrated the program, and how."""
    return {
        **job.calib.record(job.method, job.include_adversarial, job.seed, observer=observer),
        "per_channel": True,
        "symmetric": False,
        "activation_type": "int8",
        "weight_type": "int8",
        "quantize_bias": False,
        "eval_indices": [int(i) for i in job.eval_indices],
    }
