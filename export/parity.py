"""Numerical parity of an ONNX file against its PyTorch model, on clean and PGD inputs.

Adversarial inputs sit right at decision boundaries, where a small numeric drift flips a label; a
clean-only check would miss it. The PGD inputs are crafted on the PyTorch model (white-box).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cstar.attacks import pgd, torch_predict_fn
from cstar.ort_cpu import batched_logits, compare_logits, cpu_session

PARITY_PGD_STEPS = 10


def ort_session(onnx_path: str | Path) -> Any:
    """A CPU onnxruntime session for `onnx_path` (cstar.ort_cpu; clear error for unreadable files)."""
    return cpu_session(onnx_path, fix="re-export the model (cstar export)")


def ort_logits(onnx_path: str | Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `onnx_path` on float32 NCHW `x`, run in chunks of `batch_size` on the CPU provider."""
    return batched_logits(ort_session(onnx_path), x, batch_size)


def compare(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> dict[str, Any]:
    """max |difference| and top-1 agreement of two logit arrays (same shape)."""
    return compare_logits(reference_logits, candidate_logits)


def _combine(clean: dict[str, Any], adversarial: dict[str, Any]) -> dict[str, Any]:
    n = clean["n"] + adversarial["n"]
    agreement = (clean["agreement"] * clean["n"] + adversarial["agreement"] * adversarial["n"]) / max(n, 1)
    return {
        "max_abs_diff": max(clean["max_abs_diff"], adversarial["max_abs_diff"]),
        "agreement": float(agreement),
        "n": n,
    }


def check_parity(
    model: nn.Module,
    onnx_path: str | Path,
    images: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    eps: float,
    norm: str = "linf",
    tol: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Compare `model` and `onnx_path` on `images` and on PGD-10 (eps, norm) versions of them.

    Returns {max_abs_diff, agreement, n, tolerance, passed, clean: {...}, adversarial: {...}}: the top
    level aggregates both sets (n counts every compared input, clean and adversarial).
    """
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    model = model.eval()
    reference = torch_predict_fn(model, batch_size)
    torch.manual_seed(seed)
    adversarial = _pgd_batched(model, x, y, eps, norm, batch_size)
    clean_stats = compare(reference(x.numpy()), ort_logits(onnx_path, x.numpy(), batch_size))
    adv_stats = compare(reference(adversarial.numpy()), ort_logits(onnx_path, adversarial.numpy(), batch_size))
    result = _combine(clean_stats, adv_stats)
    result.update({"tolerance": tol, "passed": bool(result["max_abs_diff"] <= tol), "clean": clean_stats,
                   "adversarial": {**adv_stats, "attack": {"name": "pgd", "eps": eps, "norm": norm,
                                                           "steps": PARITY_PGD_STEPS}}})
    return result


def _pgd_batched(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str,
                 batch_size: int) -> torch.Tensor:
    chunks = [
        pgd(model, x[start : start + batch_size], y[start : start + batch_size], eps, steps=PARITY_PGD_STEPS, norm=norm)
        for start in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(chunks) if chunks else x.clone()
