"""How an INT8 artifact is executed when calibrate (and its tests) measure parity, agreement and accuracy.

An INT8 number must describe the artifact as its target runs it, not the kernels of the CPU that
happens to measure it:

- `qdq-reference` (the TensorRT format, symmetric S8S8 Q/DQ): ONNX Runtime CPU with every graph
  optimization off, so QuantizeLinear/DequantizeLinear run as separate ops and the convolutions in
  float on the dequantized values: the Q/DQ arithmetic TensorRT's explicit quantization computes.
  ORT's fused S8S8 integer kernels are not used: without VNNI (AVX2-only CPUs) they feed int8 pairs
  to vpmaddubsw, whose int16 sum saturates with full 8-bit weights (measured on an AVX2 AMD EPYC:
  agreement 0.933 where the Q/DQ arithmetic gives 0.996), a property of that CPU, not of the file.
- `ort-cpu` (the U8S8 formats for ort-cpu/openvino): ONNX Runtime CPU with its full optimizations,
  the fused U8S8 kernels the artifact is deployed on. Their weights are 7-bit (reduce_range), so the
  int16 pair sums cannot saturate on any x86 CPU and the integer result is the same everywhere.

Torch-free: only numpy and onnxruntime.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.ort_cpu import batched_logits, cpu_session, cpu_session_options

QDQ_REFERENCE = "qdq-reference"
ORT_CPU = "ort-cpu"


@dataclass(frozen=True)
class Execution:
    """One way of executing an (INT8) ONNX model on ONNX Runtime CPU for measurement."""

    executed_as: str  # QDQ_REFERENCE or ORT_CPU
    graph_optimization: str  # "disabled" (Q/DQ ops run as written) or "all" (fused integer kernels)
    why: str

    def describe(self) -> dict[str, Any]:
        """The keys a manifest's parity block records about how the numbers were measured."""
        return {"runtime": "ort-cpu", "executed_as": self.executed_as,
                "graph_optimization": self.graph_optimization}


EXECUTIONS: dict[str, Execution] = {
    QDQ_REFERENCE: Execution(QDQ_REFERENCE, "disabled",
                             "Q/DQ arithmetic as TensorRT computes it (ORT CPU, graph optimizations off)"),
    ORT_CPU: Execution(ORT_CPU, "all", "ONNX Runtime CPU's fused INT8 kernels, the deployed runtime"),
}
# calibrate --target -> how that target's INT8 format is executed to measure it
TARGET_EXECUTION: dict[str, str] = {
    "ort-cpu": ORT_CPU,
    "openvino": ORT_CPU,  # U8S8 with 7-bit weights: ORT CPU's integer result equals OpenVINO's u8 convolutions
    "tensorrt": QDQ_REFERENCE,
}


def execution_for(target: str) -> Execution:
    """The Execution that computes `target`'s INT8 format as the target does (clear error if unknown)."""
    if target not in TARGET_EXECUTION:
        raise CstarError(f"no INT8 measurement is defined for target '{target}'",
                         f"use one of: {', '.join(TARGET_EXECUTION)}")
    return EXECUTIONS[TARGET_EXECUTION[target]]


def session_options(execution: Execution, threads: int | None = None) -> Any:
    """onnxruntime.SessionOptions for `execution` (errors-only logging, optional intra-op thread count)."""
    return cpu_session_options(execution.graph_optimization != "disabled", threads)


def open_session(path: str | Path, execution: Execution | str = ORT_CPU, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session that executes `path` as `execution` says (a name or an Execution)."""
    if isinstance(execution, str):
        if execution not in EXECUTIONS:
            raise CstarError(f"unknown INT8 execution '{execution}'", f"use one of: {', '.join(EXECUTIONS)}")
        execution = EXECUTIONS[execution]
    return cpu_session(path, optimize=execution.graph_optimization != "disabled", threads=threads)


def open_target_session(path: str | Path, target: str, threads: int | None = None) -> Any:
    """The session that computes `target`'s INT8 format as `target` does (see TARGET_EXECUTION)."""
    return open_session(path, execution_for(target), threads)


def run_logits(session: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """float32 logits of `images` (NCHW) through `session`, in batches of `batch_size`."""
    return batched_logits(session, images, batch_size)
