"""TensorRT preflight on CPU with onnx only: will TensorRT's ONNX parser take this (quantized) graph?

TensorRT does explicit quantization only: symmetric INT8 QuantizeLinear/DequantizeLinear pairs
(zero point 0, int8, constant positive scales, opset >= 13 for per-channel). It refuses the
operator-oriented formats (QLinearConv, ConvInteger, DynamicQuantizeLinear...), double tensors and
ops outside its ONNX operator set. Each problem says what, which node, and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

MIN_QDQ_OPSET = 13

# onnx-tensorrt's supported operators (TensorRT 10), the part a CNN classifier can meet and then some.
TRT_SUPPORTED_OPS = frozenset({
    "Abs", "Acos", "Acosh", "Add", "And", "ArgMax", "ArgMin", "Asin", "Asinh", "Atan", "Atanh",
    "AveragePool", "BatchNormalization", "Cast", "CastLike", "Ceil", "Celu", "Clip", "Concat", "Constant",
    "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Cosh", "CumSum", "DepthToSpace", "DequantizeLinear",
    "Div", "Dropout", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor",
    "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalLpPool",
    "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "GroupNormalization", "HardSigmoid",
    "HardSwish", "Identity", "If", "InstanceNormalization", "IsInf", "IsNaN", "LayerNormalization",
    "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "LpNormalization", "LRN", "LSTM",
    "MatMul", "Max", "MaxPool", "Mean", "Min", "Mish", "Mod", "Mul", "Neg", "NonMaxSuppression", "NonZero",
    "Not", "OneHot", "Or", "Pad", "Pow", "PRelu", "QuantizeLinear", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare",
    "Relu", "Reshape", "Resize", "RNN", "RoiAlign", "Round", "ScatterElements", "ScatterND", "Selu", "Shape",
    "Shrink", "Sigmoid", "Sign", "Sin", "Sinh", "Size", "Slice", "Softmax", "Softplus", "Softsign",
    "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tan", "Tanh", "ThresholdedRelu", "Tile",
    "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor", "GRU",
})

# Operator-oriented (QOperator / integer) quantization: TensorRT takes explicit Q/DQ only.
OPERATOR_ORIENTED_OPS = frozenset({
    "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger",
    "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
    "QLinearLeakyRelu", "QLinearSigmoid", "QLinearSoftmax", "QGemm", "QAttention", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "DynamicQuantizeLSTM",
})

_REQUANTIZE_FIX = ("re-run cstar calibrate (static QDQ, ActivationSymmetric=True, WeightSymmetric=True, "
                   "int8 activations and weights)")
_DTYPE_NAME = {v: k.lower() for k, v in TensorProto.DataType.items()}


@dataclass
class PreflightReport:
    """Result of `preflight`: ok is False when any problem (something TensorRT would refuse) was found."""

    ok: bool
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return f"{node.op_type} node '{node.name or f'#{index}'}'"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs by tensor name (values only for tensor-valued constants)."""
    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def _const_dtypes(graph: onnx.GraphProto) -> dict[str, int]:
    dtypes = {init.name: int(init.data_type) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    dtypes[node.output[0]] = int(attr.t.data_type)
    return dtypes


def _check_qdq(node: onnx.NodeProto, label: str, consts: dict[str, np.ndarray], dtypes: dict[str, int],
               problems: list[str], warnings: list[str], stats: dict[str, Any]) -> None:
    """Zero point (present, constant, int8, all 0) and scale (constant, positive) of one Q/DQ node."""
    scale_name = node.input[1] if len(node.input) > 1 else ""
    zp_name = node.input[2] if len(node.input) > 2 else ""
    if scale_name not in consts:
        problems.append(f"{label}: scale '{scale_name}' is not a constant; fix: TensorRT needs constant Q/DQ "
                        f"scales (initializers) - {_REQUANTIZE_FIX}")
    else:
        scale = consts[scale_name]
        if scale.size > 1:
            stats["per_channel_nodes"] = stats.get("per_channel_nodes", 0) + 1
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            problems.append(f"{label}: scale '{scale_name}' has non-positive or non-finite values; "
                            f"fix: {_REQUANTIZE_FIX} on a calibration set without NaN/constant tensors")
    if node.op_type == "DequantizeLinear" and node.input[0] in dtypes:
        qtype = dtypes[node.input[0]]
        if qtype == TensorProto.INT32:
            problems.append(f"{label}: dequantizes an int32 tensor '{node.input[0]}' (a quantized bias); "
                            "fix: TensorRT takes int8 Q/DQ only - quantize with extra_options "
                            "QuantizeBias=False so biases stay float")
            return
    if not zp_name:
        warnings.append(f"{label}: no zero point input, so ONNX makes its type uint8; fix: give an int8 zero "
                        "point of 0 (TensorRT's explicit quantization is int8 symmetric)")
        return
    if zp_name not in consts:
        problems.append(f"{label}: zero point '{zp_name}' is not a constant; fix: TensorRT needs a constant int8 "
                        f"zero point of 0 - {_REQUANTIZE_FIX}")
        return
    zero_point = consts[zp_name]
    dtype = dtypes.get(zp_name, TensorProto.UNDEFINED)
    if dtype == TensorProto.UINT8:
        problems.append(f"{label}: zero point '{zp_name}' is uint8 (asymmetric uint8 activations); fix: TensorRT "
                        f"takes int8 symmetric Q/DQ only - {_REQUANTIZE_FIX}")
    elif dtype == TensorProto.INT32:
        problems.append(f"{label}: zero point '{zp_name}' is int32 (an int32 Q/DQ, e.g. a quantized bias); "
                        "fix: quantize with extra_options QuantizeBias=False so biases stay float")
    elif dtype in (TensorProto.INT16, TensorProto.UINT16):
        problems.append(f"{label}: zero point '{zp_name}' is {_DTYPE_NAME.get(dtype, dtype)} (16-bit Q/DQ); "
                        f"fix: TensorRT takes int8 (or fp8/int4) Q/DQ - {_REQUANTIZE_FIX}")
    elif dtype not in (TensorProto.INT8, TensorProto.UNDEFINED):
        warnings.append(f"{label}: zero point '{zp_name}' is {_DTYPE_NAME.get(dtype, dtype)}; TensorRT support "
                        "depends on the version and GPU (fp8 needs Hopper/Ada, int4 weight-only)")
    if zero_point.size and np.any(zero_point.astype(np.float64) != 0):
        nonzero = zero_point[zero_point != 0].ravel()
        problems.append(f"{label}: non-zero zero point ({int(np.count_nonzero(zero_point))} of {zero_point.size} "
                        f"values, e.g. {nonzero[0].item()}) in '{zp_name}'; fix: TensorRT supports symmetric "
                        f"quantization only (zero point 0) - {_REQUANTIZE_FIX}")


def preflight(onnx_path: str | Path | onnx.ModelProto) -> PreflightReport:
    """Check an ONNX model against what TensorRT's parser and explicit INT8 quantization accept."""
    model = onnx_path if isinstance(onnx_path, onnx.ModelProto) else onnx.load(str(onnx_path))
    graph = model.graph
    problems: list[str] = []
    warnings: list[str] = []
    opsets = {o.domain or "ai.onnx": int(o.version) for o in model.opset_import}
    opset = opsets.get("ai.onnx", 0)
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    n_qdq = counts.get("QuantizeLinear", 0) + counts.get("DequantizeLinear", 0)
    stats: dict[str, Any] = {"opset": opset, "nodes": len(graph.node), "op_counts": dict(sorted(counts.items())),
                             "qdq_nodes": n_qdq, "per_channel_nodes": 0}

    if opset < MIN_QDQ_OPSET:
        what = "Q/DQ (per-channel needs axis, added in opset 13)" if n_qdq else "TensorRT's explicit quantization"
        problems.append(f"model: opset {opset} is below {MIN_QDQ_OPSET}, too old for {what}; fix: export with "
                        f"opset >= {MIN_QDQ_OPSET} (cstar export --opset 17 or newer)")

    consts = _constants(graph)
    dtypes = _const_dtypes(graph)
    for index, node in enumerate(graph.node):
        label = _node_label(node, index)
        domain = node.domain or "ai.onnx"
        if node.op_type in OPERATOR_ORIENTED_OPS:
            problems.append(f"{label}: {node.op_type} is operator-oriented (QOperator/dynamic) quantization, which "
                            "TensorRT refuses; fix: quantize statically in QDQ format (QuantFormat.QDQ) - "
                            "cstar calibrate does")
            continue
        if domain != "ai.onnx":
            problems.append(f"{label}: op from domain '{domain}' (a runtime-specific contrib op) is not in "
                            "TensorRT's ONNX operator set; fix: use standard ONNX ops only (e.g. no "
                            "UseQDQContribOps, no ORT-optimized model saved as the artifact)")
            continue
        if node.op_type not in TRT_SUPPORTED_OPS:
            problems.append(f"{label}: op {node.op_type} is not supported by TensorRT's ONNX parser; fix: replace "
                            "it in the model or export with a graph simplifier that removes it")
            continue
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_qdq(node, label, consts, dtypes, problems, warnings, stats)
        if node.op_type == "Cast":
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to == TensorProto.DOUBLE:
                problems.append(f"{label}: casts to double; fix: TensorRT has no float64 - keep the graph float32")

    for kind, values in (("input", graph.input), ("output", graph.output), ("value", graph.value_info)):
        for value in values:
            elem = value.type.tensor_type.elem_type
            if elem == TensorProto.DOUBLE:
                problems.append(f"{kind} '{value.name}': float64 tensor; fix: TensorRT has no double - export in "
                                "float32")
            elif kind != "value" and elem == TensorProto.UINT8:
                warnings.append(f"{kind} '{value.name}': uint8 graph {kind}; TensorRT takes it only as a network "
                                "input to cast; cstar models take float32 pixels in [0, 1]")
    for init in graph.initializer:
        if init.data_type == TensorProto.DOUBLE:
            problems.append(f"initializer '{init.name}': float64 weights; fix: TensorRT has no double - cast the "
                            "model to float32 before export")

    if n_qdq == 0:
        warnings.append("model: no QuantizeLinear/DequantizeLinear nodes - TensorRT will build an FP32/FP16 "
                        "engine, not INT8 (run cstar calibrate for INT8)")
    stats["opsets"] = opsets
    return PreflightReport(ok=not problems, problems=problems, warnings=warnings, stats=stats)
