"""calibration.execution: each INT8 format is measured as its target executes it (Q/DQ arithmetic for TensorRT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from calibration.execution import (
    EXECUTIONS,
    ORT_CPU,
    QDQ_REFERENCE,
    TARGET_EXECUTION,
    execution_for,
    open_session,
    open_target_session,
    run_logits,
    session_options,
)
from calibration.quantize import TARGETS
from cstar.errors import CstarError

CHANNELS = 32
OUT_SCALE = 4200.0  # output quantization step: fine enough to show a saturated int16 pair sum


def saturating_qdq_model(path: Path) -> np.ndarray:
    """A 1x1 S8S8 Q/DQ conv whose u8 x s8 pair sums exceed int16 (full 8-bit weights): returns the int8 weights.

    Fused S8S8 kernels on a CPU without VNNI (vpmaddubsw) saturate on it; the Q/DQ arithmetic does not.
    """
    weights = np.full((4, CHANNELS, 1, 1), 127, dtype=np.int8)
    weights[1] = -127
    weights[2, ::2] = -127
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp"),
             numpy_helper.from_array(weights, "wq"),
             numpy_helper.from_array(np.ones(4, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(4, np.int8), "wzp"),
             numpy_helper.from_array(np.array(OUT_SCALE, np.float32), "os")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"]),
             helper.make_node("QuantizeLinear", ["c", "os", "zp"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "os", "zp"], ["cd"]),
             helper.make_node("Flatten", ["cd"], ["y"])]
    graph = helper.make_graph(nodes, "saturating", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                  ["n", CHANNELS, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return weights


def qdq_arithmetic(x: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The model's Q/DQ semantics in numpy (float64): quantize, exact conv of the integers, requantize."""
    xq = np.clip(np.round(x[:, :, 0, 0].astype(np.float64)), -128, 127)
    acc = xq @ weights[:, :, 0, 0].astype(np.float64).T
    return np.clip(np.round(acc / OUT_SCALE), -128, 127) * OUT_SCALE


def test_targets_map_to_their_execution() -> None:
    assert TARGET_EXECUTION == {"ort-cpu": ORT_CPU, "openvino": ORT_CPU, "tensorrt": QDQ_REFERENCE}
    assert set(TARGET_EXECUTION) == set(TARGETS)  # every ONNX calibrate target is measured some defined way
    assert execution_for("tensorrt").describe() == {"runtime": "ort-cpu", "executed_as": "qdq-reference",
                                                    "graph_optimization": "disabled"}
    assert execution_for("ort-cpu").describe()["graph_optimization"] == "all"
    with pytest.raises(CstarError, match="'tflite'") as info:
        execution_for("tflite")
    assert "tensorrt" in (info.value.hint or "")
    with pytest.raises(CstarError, match="unknown INT8 execution") as info:
        open_session("model.onnx", "vnni")
    assert QDQ_REFERENCE in (info.value.hint or "")


def test_qdq_reference_runs_the_qdq_ops_as_written(tmp_path: Path) -> None:
    """Graph optimizations off: the session keeps Q, DQ and a float Conv (no fused QLinearConv)."""
    path = tmp_path / "sat.onnx"
    saturating_qdq_model(path)
    options = session_options(EXECUTIONS[QDQ_REFERENCE], threads=1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert options.intra_op_num_threads == 1
    options.optimized_model_filepath = str(tmp_path / "as-run.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "as-run.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("DequantizeLinear") == 3 and "Conv" in ops
    assert not {"QLinearConv", "ConvInteger"} & set(ops)
    fused = session_options(EXECUTIONS[ORT_CPU])
    assert fused.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_qdq_reference_equals_the_qdq_arithmetic_on_any_cpu(tmp_path: Path,
                                                            record_property: pytest.RecordProperty) -> None:
    """Exact on every x86 CPU, where ORT's fused S8S8 kernels saturate without VNNI (not gated: CPU-decided)."""
    path = tmp_path / "sat.onnx"
    weights = saturating_qdq_model(path)
    x = np.random.default_rng(0).uniform(-130, 130, (16, CHANNELS, 1, 1)).astype(np.float32)
    expected = qdq_arithmetic(x, weights)
    assert np.abs(expected).max() > 32767  # sums beyond int16: the case a saturating kernel gets wrong
    got = run_logits(open_target_session(path, "tensorrt", threads=1), x, batch_size=5)
    assert got.shape == (16, 4) and np.array_equal(got, expected.astype(np.float32))
    kernels = run_logits(open_session(path, ORT_CPU, threads=1), x)  # ORT CPU's fused kernels: this CPU's number
    assert kernels.shape == got.shape and np.isfinite(kernels).all()
    record_property("ort_cpu_kernel_max_abs_error", float(np.abs(kernels - expected).max()))
