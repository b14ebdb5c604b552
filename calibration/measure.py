"""How calibrate (ONNX and ExecuTorch targets alike) measures an INT8 model: sessions, logits, parity,
accuracy and the transfer sets' per-example worst case.

One module below both `calibration.calibrate` and `calibration.executorch_int8`, so neither imports
the other's private helpers (where the PyTorch reference is: export.reference). Torch-free except
`torch_logits` (imports torch when called).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from calibration.execution import ORT_CPU, Execution, open_session, run_logits
from cstar.ort_cpu import accuracy as ort_accuracy
from cstar.ort_cpu import compare_logits

EVAL_APGD_ITERS = 100  # the apgd suite's transfer check (APGD-CE + APGD-T over 3 targets)
EVAL_APGD_TARGETS = 3


def session(path: Path, execution: Execution | str = ORT_CPU) -> Any:
    """ONNX Runtime CPU session of `path` executed as `execution` (calibration.execution, the one source)."""
    return open_session(path, execution)


def run_logits_of(session: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 logits of `images` through an ONNX Runtime `session` (calibration.execution.run_logits)."""
    return run_logits(session, images, batch_size)


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """max |a - b|, top-1 agreement and n (cstar.ort_cpu.compare_logits)."""
    return compare_logits(b, a)


def torch_logits(model: Any, x: np.ndarray) -> np.ndarray:
    """float32 logits of `x` through a PyTorch `model` without autograd (the reference's transfer check)."""
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(x)).float().numpy()


def worst_case(run: Any, sets: dict[str, np.ndarray], labels: np.ndarray) -> float:
    """Share of examples every transfer set leaves correctly classified by `run` (logits of a batch)."""
    correct = np.ones(labels.shape[0], dtype=bool)
    for adv in sets.values():
        correct &= np.asarray(run(adv)).argmax(axis=1) == labels
    return float(correct.mean()) if labels.size else 0.0


def transfer_block(eps: float, norm: str, seed: int) -> dict[str, Any]:
    """metrics.attack of calibrate: the apgd suite crafted on the PyTorch reference, replayed on FP32 and INT8."""
    return {"suite": "apgd", "transfer": True, "crafted_on": "pytorch-reference", "eps": eps, "norm": norm,
            "seed": seed, "attacks": [{"name": "apgd-ce", "n_iter": EVAL_APGD_ITERS},
                                      {"name": "apgd-t", "n_iter": EVAL_APGD_ITERS, "n_targets": EVAL_APGD_TARGETS}],
            "worst_case": "per example over every set"}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (cstar.ort_cpu.accuracy)."""
    return ort_accuracy(logits, labels)
