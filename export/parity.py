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
from cstar.errors import CstarError
from export.onnx_export import INPUT_NAME

PARITY_PGD_STEPS = 10


def ort_session(onnx_path: str | Path) -> Any:
    """A CPU onnxruntime session for `onnx_path` (clear error for unreadable files)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private exception types
        raise CstarError(f"onnxruntime cannot load {onnx_path}: {str(exc)[:300]}",
                         "re-export the model (cstar export)") from exc


def ort_logits(onnx_path: str | Path, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of `onnx_path` on float32 NCHW `x`, run in chunks of `batch_size` on the CPU provider."""
    session = ort_session(onnx_path)
    input_meta = session.get_inputs()[0]
    fixed = input_meta.shape[0] if isinstance(input_meta.shape[0], int) else None
    step = fixed or batch_size
    outputs = []
    for start in range(0, x.shape[0], step):
        chunk = np.ascontiguousarray(x[start : start + step], dtype=np.float32)
        count = chunk.shape[0]
        if fixed and count < fixed:  # static-batch graph: pad the last chunk
            chunk = np.concatenate([chunk, np.zeros((fixed - count, *chunk.shape[1:]), dtype=np.float32)])
        outputs.append(session.run(None, {input_meta.name or INPUT_NAME: chunk})[0][:count])
    return np.concatenate(outputs) if outputs else np.zeros((0,), dtype=np.float32)


def compare(reference_logits: np.ndarray, candidate_logits: np.ndarray) -> dict[str, Any]:
    """max |difference| and top-1 agreement of two logit arrays (same shape)."""
    reference = np.asarray(reference_logits, dtype=np.float64)
    candidate = np.asarray(candidate_logits, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise CstarError(f"logit shapes differ: {reference.shape} vs {candidate.shape}",
                         "the ONNX file does not match the model; re-export it")
    n = int(reference.shape[0])
    if n == 0:
        return {"max_abs_diff": 0.0, "agreement": 1.0, "n": 0}
    agree = float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1)))
    return {"max_abs_diff": float(np.abs(reference - candidate).max()), "agreement": agree, "n": n}


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
