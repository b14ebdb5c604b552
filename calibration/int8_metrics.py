"""How `cstar calibrate` measures an ONNX Q/DQ INT8 model against FP32 (split out of calibration.calibrate).

On a stratified TEST subset: agreement and logit difference (parity), clean accuracy, and, when the
PyTorch reference is known, robust accuracy under the apgd suite crafted on the reference (transfer, the
same sets replayed on FP32) and on the INT8 model's fake-quant twin (calibration.fakequant); robust_acc
is the per-example worst case over every set. INT8 is executed as its target executes it
(calibration.execution). Torch-free at import: torch and the reference are loaded only when measured.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from calibration import measure
from calibration.execution import Execution
from calibration.measure import EVAL_APGD_ITERS, EVAL_APGD_TARGETS, transfer_block


@dataclass(frozen=True)
class Int8Check:
    """What `measure_int8` compares: the FP32 and INT8 models, how INT8 runs, the TEST subset and the attack."""

    fp32_path: Path
    int8_path: Path
    execution: Execution
    images: np.ndarray
    labels: np.ndarray
    eps: float
    norm: str
    seed: int
    twin_attack: bool = True


@dataclass
class Int8Measurement:
    """The manifest's `metrics`, `parity` (INT8 vs FP32 ONNX) and `parity_torch` (vs the reference, if any)."""

    metrics: dict[str, Any]
    parity: dict[str, Any]
    parity_torch: dict[str, Any] | None = None


def measure_int8(check: Int8Check, reference_dir: Path | None, spec: Any) -> Int8Measurement:
    """Parity and clean accuracy of INT8 vs FP32; robust accuracy too when `reference_dir` is given."""
    fp32_session, int8_session = measure.session(check.fp32_path), measure.session(check.int8_path, check.execution)
    fp32_logits = measure.run_logits_of(fp32_session, check.images)
    int8_logits = measure.run_logits_of(int8_session, check.images)
    result = Int8Measurement(
        metrics={
            "clean_acc": measure.accuracy(int8_logits, check.labels),
            "robust_acc": None,
            "fp32_clean_acc": measure.accuracy(fp32_logits, check.labels),
            "fp32_robust_acc": None,
            "n": int(check.labels.shape[0]),
            "executed_as": check.execution.executed_as,
        },
        parity=measure.parity(int8_logits, fp32_logits),
    )
    if reference_dir is not None:
        result.parity_torch = _robust_metrics(check, reference_dir, spec, fp32_session, int8_session, int8_logits,
                                              result.metrics)
    return result


def _robust_metrics(check: Int8Check, reference_dir: Path, spec: Any, fp32_session: Any, int8_session: Any,
                    int8_logits: np.ndarray, metrics: dict[str, Any]) -> dict[str, Any]:
    """Fill `metrics`' robust accuracies (transfer from the reference, plus the twin's white-box sets); parity_torch."""
    import torch

    from calibration.calib_set import craft_apgd
    from export.reference import load_reference

    images, labels = check.images, check.labels
    model, _ = load_reference(reference_dir, spec)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(images)).float().numpy()
    parity_torch = measure.parity(int8_logits, torch_logits)
    sets = craft_apgd(model, images, labels, check.eps, check.norm, check.seed, EVAL_APGD_ITERS, EVAL_APGD_TARGETS)
    int8_run = functools.partial(measure.run_logits_of, int8_session)
    fp32_run = functools.partial(measure.run_logits_of, fp32_session)
    metrics["fp32_robust_acc"] = measure.worst_case(fp32_run, sets, labels)
    metrics["reference_robust_acc"] = measure.worst_case(functools.partial(measure.torch_logits, model), sets, labels)
    metrics["attack"] = transfer_block(check.eps, check.norm, check.seed)
    if check.twin_attack:  # white-box on the INT8 graph itself, beside the reference's transfer sets
        sets = _add_twin_sets(check, int8_run, sets, metrics)
    metrics["robust_acc"] = measure.worst_case(int8_run, sets, labels)
    return parity_torch


def _add_twin_sets(check: Int8Check, int8_run: Any, sets: dict[str, np.ndarray],
                   metrics: dict[str, Any]) -> dict[str, np.ndarray]:
    """Craft the apgd suite on the INT8 model's fake-quant twin; record both halves; every set, `_fq` suffixed."""
    from calibration.fakequant import craft_on_twin

    twin_sets, twin_check = craft_on_twin(check.int8_path, check.images, check.labels, check.eps, check.norm,
                                          check.seed, EVAL_APGD_ITERS, EVAL_APGD_TARGETS)
    metrics["robust_acc_reference_crafted"] = measure.worst_case(int8_run, sets, check.labels)
    metrics["robust_acc_twin_crafted"] = measure.worst_case(int8_run, twin_sets, check.labels)
    metrics["twin_parity"] = twin_check.to_dict()
    metrics["attack"]["crafted_on"] = ["pytorch-reference", "fake-quant-twin"]
    return {**sets, **{f"{name}_fq": adv for name, adv in twin_sets.items()}}
