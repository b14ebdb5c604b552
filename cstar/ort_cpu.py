"""ONNX Runtime CPU for measurement, torch-free and at the bottom layer: one session set-up, one batched
logits loop, one logit comparison, one accuracy, used by export's parity, calibrate's INT8 checks and
their tests. (The deployed runtimes' own runners live in deploy/backends.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError


def cpu_session_options(optimize: bool = True, threads: int | None = None) -> Any:
    """onnxruntime.SessionOptions: errors-only logging, all graph optimizations or none, optional threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    return options


def cpu_session(path: str | Path, optimize: bool = True, threads: int | None = None,
                fix: str = "re-run the stage that wrote the model") -> Any:
    """An ONNX Runtime CPU session of `path`: errors-only logging, all graph optimizations (or none, so
    Q/DQ ops run as written), an optional intra-op thread count; one clear error if it cannot load."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), cpu_session_options(optimize, threads),
                                    providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several private exception types
        raise CstarError(f"onnxruntime cannot load {path}: {str(exc)[:300]}", fix) from exc


def batched_logits(session: Any, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 logits of NCHW `x` through `session` in chunks; a static-batch graph gets its last chunk padded."""
    meta = session.get_inputs()[0]
    fixed = meta.shape[0] if isinstance(meta.shape[0], int) else None
    step = fixed or batch_size
    outputs = []
    for start in range(0, x.shape[0], step):
        chunk = np.ascontiguousarray(x[start : start + step], dtype=np.float32)
        count = chunk.shape[0]
        if fixed and count < fixed:
            chunk = np.concatenate([chunk, np.zeros((fixed - count, *chunk.shape[1:]), dtype=np.float32)])
        outputs.append(session.run(None, {meta.name: chunk})[0][:count])
    return np.concatenate(outputs).astype(np.float32) if outputs else np.zeros((0,), dtype=np.float32)


def compare_logits(reference: np.ndarray, candidate: np.ndarray) -> dict[str, Any]:
    """max |difference| and top-1 agreement of two logit arrays of one shape (n = rows)."""
    reference = np.asarray(reference, dtype=np.float64)
    candidate = np.asarray(candidate, dtype=np.float64)
    if reference.shape != candidate.shape:
        raise CstarError(f"logit shapes differ: {reference.shape} vs {candidate.shape}",
                         "the model file does not match its source; re-run the stage that wrote it")
    n = int(reference.shape[0])
    if n == 0:
        return {"max_abs_diff": 0.0, "agreement": 1.0, "n": 0}
    return {"max_abs_diff": float(np.abs(reference - candidate).max()),
            "agreement": float(np.mean(reference.argmax(axis=1) == candidate.argmax(axis=1))), "n": n}


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (0 for no examples)."""
    return float(np.mean(np.asarray(logits).argmax(axis=1) == labels)) if len(labels) else 0.0
