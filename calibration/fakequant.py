"""The fake-quant twin of an INT8 (QDQ) ONNX artifact: the same graph in PyTorch, attackable.

A transfer set crafted on the FP32 reference misses what quantization changes: the INT8 model's
decision boundary lies elsewhere, so replaying FP32-crafted examples on it understates what a
white-box attacker of the deployed model finds (transfer loss, read as robustness). The twin executes
the artifact's own graph, op by op, with its own scales and zero points:

- QuantizeLinear: q = clamp(round(x / scale) + zero_point, qmin, qmax), rounding half to even as
  ONNX does, with a straight-through gradient through the rounding (zero outside the clamp range:
  the clipped STE of quantization-aware training);
- DequantizeLinear: (q - zero_point) * scale, per tensor or per channel along `axis`;
- everything else in float, as the Q/DQ arithmetic TensorRT's explicit quantization computes.

Constant sub-graphs (the weights' DequantizeLinear) are folded once when the twin is built. Its logits
equal the artifact executed as Q/DQ arithmetic (`calibration.execution`'s qdq-reference) up to float
summation order; `twin_parity` measures that, and calibrate records it. Host side (torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from cstar.errors import CstarError

_QRANGE: dict[int, tuple[int, int]] = {int(onnx.TensorProto.UINT8): (0, 255), int(onnx.TensorProto.INT8): (-128, 127)}
_OpFn = Callable[[list[Any], dict[str, Any], "_Node"], Any]


@dataclass(frozen=True)
class _Node:
    """One ONNX node as the twin runs it."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    qrange: tuple[int, int] | None = None  # QuantizeLinear: the integer range of its zero point's type


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def _axis_view(t: torch.Tensor, like: torch.Tensor, axis: int) -> torch.Tensor:
    """A per-channel scale/zero point (1-D) shaped to broadcast along `axis` of `like`."""
    if t.dim() == 0 or t.numel() == 1:
        return t.reshape(())
    shape = [1] * like.dim()
    shape[axis % like.dim()] = t.numel()
    return t.reshape(shape)


def _quantize(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else torch.zeros(())
    axis = int(attrs.get("axis", 1))
    qmin, qmax = node.qrange or (0, 255)
    q = round_ste(x / _axis_view(scale, x, axis)) + _axis_view(zero, x, axis)
    return torch.clamp(q, qmin, qmax)


def _dequantize(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    q, scale = args[0].float(), args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else torch.zeros(())
    axis = int(attrs.get("axis", 1))
    return (q - _axis_view(zero.float(), q, axis)) * _axis_view(scale, q, axis)


def _pads(attrs: dict[str, Any], spatial: int) -> tuple[list[int], list[int]]:
    pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return pads[:spatial], pads[spatial:]


def _check_auto_pad(attrs: dict[str, Any], op: str) -> None:
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad)
    if auto_pad not in ("NOTSET", "VALID"):
        raise CstarError(f"the fake-quant twin does not support {op} with auto_pad={auto_pad}",
                         "export with explicit pads (cstar export does)")


def _padded(x: torch.Tensor, attrs: dict[str, Any], value: float = 0.0) -> tuple[torch.Tensor, list[int]]:
    """Apply asymmetric pads explicitly; return the input and the symmetric padding left for the op."""
    begin, end = _pads(attrs, x.dim() - 2)
    if begin == end:
        return x, begin
    flat: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        flat += [b, e]
    return F.pad(x, flat, value=value), [0] * len(begin)


def _conv(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    _check_auto_pad(attrs, "Conv")
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if x.dim() != 4:
        raise CstarError(f"the fake-quant twin runs 2-D convolutions, this one has a {x.dim()}-D input",
                         "calibrate a model built of Conv2d/Linear layers")
    x, padding = _padded(x, attrs)
    return F.conv2d(x, weight, bias, stride=list(attrs.get("strides", [1, 1])), padding=padding,
                    dilation=list(attrs.get("dilations", [1, 1])), groups=int(attrs.get("group", 1)))


def _gemm(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    a, b = args[0], args[1]
    a = a.t() if attrs.get("transA", 0) else a
    b = b.t() if attrs.get("transB", 0) else b
    out = float(attrs.get("alpha", 1.0)) * (a @ b)
    if len(args) > 2 and args[2] is not None:
        out = out + float(attrs.get("beta", 1.0)) * args[2]
    return out


def _axes(args: list[Any], attrs: dict[str, Any]) -> list[int] | None:
    if len(args) > 1 and args[1] is not None:
        return [int(a) for a in args[1].reshape(-1).tolist()]
    return [int(a) for a in attrs["axes"]] if "axes" in attrs else None


def _reduce_mean(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    axes = _axes(args, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if axes is None or not axes:
        return args[0].mean() if not keep else args[0].mean(dim=tuple(range(args[0].dim())), keepdim=True)
    return args[0].mean(dim=axes, keepdim=keep)


def _pool(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    _check_auto_pad(attrs, node.op)
    kernel = list(attrs["kernel_shape"])
    strides = list(attrs.get("strides", [1] * len(kernel)))
    ceil = bool(attrs.get("ceil_mode", 0))
    if node.op == "MaxPool":
        x, padding = _padded(args[0], attrs, value=float("-inf"))
        return F.max_pool2d(x, kernel, strides, padding, list(attrs.get("dilations", [1, 1])), ceil_mode=ceil)
    x, padding = _padded(args[0], attrs)
    return F.avg_pool2d(x, kernel, strides, padding, ceil_mode=ceil,
                        count_include_pad=bool(attrs.get("count_include_pad", 0)))


def _reshape(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    x, shape = args[0], [int(s) for s in args[1].reshape(-1).tolist()]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


def _clip(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    low = args[1] if len(args) > 1 and args[1] is not None else attrs.get("min")
    high = args[2] if len(args) > 2 and args[2] is not None else attrs.get("max")
    low = float(low) if low is not None else None
    high = float(high) if high is not None else None
    return torch.clamp(args[0], low, high)


def _unsqueeze(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    x = args[0]
    for axis in sorted(_axes(args, attrs) or []):
        x = x.unsqueeze(axis if axis >= 0 else axis + x.dim() + 1)
    return x


def _squeeze(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    axes = _axes(args, attrs)
    return args[0].squeeze() if axes is None else args[0].squeeze(tuple(axes))


def _batch_norm(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    x, scale, bias, mean, var = args[:5]
    return F.batch_norm(x, mean, var, scale, bias, training=False, eps=float(attrs.get("epsilon", 1e-5)))


def _fake_quant(args: list[Any], attrs: dict[str, Any], node: _Node) -> torch.Tensor:
    """A QuantizeLinear -> DequantizeLinear pair with one per-tensor scale: torch's fused fake-quant kernel
    (the same rounding and clamp, the clipped straight-through gradient, one pass instead of six)."""
    x, scale = args[0], args[1]
    zero = args[2] if len(args) > 2 and args[2] is not None else torch.zeros(())
    qmin, qmax = node.qrange or (0, 255)
    return torch.fake_quantize_per_tensor_affine(x, scale.reshape(()).float(), zero.reshape(()).to(torch.int32),
                                                 qmin, qmax)


OPS: dict[str, _OpFn] = {
    "FakeQuant": _fake_quant,
    "QuantizeLinear": _quantize,
    "DequantizeLinear": _dequantize,
    "Conv": _conv,
    "Gemm": _gemm,
    "MatMul": lambda a, _, __: torch.matmul(a[0], a[1]),
    "Add": lambda a, _, __: a[0] + a[1],
    "Sub": lambda a, _, __: a[0] - a[1],
    "Mul": lambda a, _, __: a[0] * a[1],
    "Div": lambda a, _, __: a[0] / a[1],
    "Relu": lambda a, _, __: F.relu(a[0]),
    "LeakyRelu": lambda a, at, __: F.leaky_relu(a[0], float(at.get("alpha", 0.01))),
    "Sigmoid": lambda a, _, __: torch.sigmoid(a[0]),
    "Tanh": lambda a, _, __: torch.tanh(a[0]),
    "HardSigmoid": lambda a, at, __: torch.clamp(float(at.get("alpha", 0.2)) * a[0] + float(at.get("beta", 0.5)), 0, 1),
    "HardSwish": lambda a, _, __: F.hardswish(a[0]),
    "Clip": _clip,
    "ReduceMean": _reduce_mean,
    "GlobalAveragePool": lambda a, _, __: a[0].mean(dim=tuple(range(2, a[0].dim())), keepdim=True),
    "MaxPool": _pool,
    "AveragePool": _pool,
    "Flatten": lambda a, at, __: a[0].reshape(int(np.prod(a[0].shape[: int(at.get("axis", 1))])), -1),
    "Reshape": _reshape,
    "Transpose": lambda a, at, __: a[0].permute(*[int(p) for p in at["perm"]]),
    "Concat": lambda a, at, __: torch.cat(a, dim=int(at["axis"])),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Identity": lambda a, _, __: a[0],
    "BatchNormalization": _batch_norm,
}


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Float arrays as float32, integer arrays as float32 (Q values) unless they are int64 (shapes, axes)."""
    if array.dtype == np.int64:
        return torch.from_numpy(np.array(array))
    return torch.from_numpy(np.array(array, dtype=np.float32))


class FakeQuantTwin(nn.Module):
    """An INT8 QDQ ONNX graph executed in PyTorch with straight-through rounding (see module docstring)."""

    def __init__(self, model: onnx.ModelProto, source: str = "<memory>") -> None:
        super().__init__()
        self.source = source
        graph = model.graph
        self._constants: dict[str, torch.Tensor] = {}
        dtypes: dict[str, int] = {}
        for init in graph.initializer:
            self._constants[init.name] = _tensor(numpy_helper.to_array(init))
            dtypes[init.name] = init.data_type
        names = set(self._constants)
        self.input_name = next(i.name for i in graph.input if i.name not in names)
        self.output_name = graph.output[0].name
        self._nodes: list[_Node] = []
        for proto in graph.node:
            node = self._node(proto, dtypes)
            if node.op == "Constant":
                self._constants[node.outputs[0]] = _tensor(numpy_helper.to_array(proto.attribute[0].t))
                dtypes[node.outputs[0]] = proto.attribute[0].t.data_type
            elif all(name in self._constants or not name for name in node.inputs):
                self._constants.update(zip(node.outputs, self._run_node(node, self._constants), strict=False))
            else:
                self._nodes.append(node)
        self._nodes = _fuse_qdq_pairs(self._nodes, self._constants, self.output_name)
        self._buffer_of: dict[str, str] = {}  # constant name -> buffer attribute (buffers follow .to(device))
        for index, (name, constant) in enumerate(self._constants.items()):
            self.register_buffer(f"c{index}", constant, persistent=False)
            self._buffer_of[name] = f"c{index}"
        del self._constants
        self.eval()

    @staticmethod
    def _node(proto: onnx.NodeProto, dtypes: dict[str, int]) -> _Node:
        op = proto.op_type
        if proto.domain not in ("", "ai.onnx") or (op not in OPS and op != "Constant"):
            raise CstarError(f"the fake-quant twin cannot run ONNX op '{proto.domain or 'ai.onnx'}.{op}'",
                             f"calibrate a model whose graph uses only: {', '.join(sorted(OPS))}")
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in proto.attribute}
        qrange = None
        if op == "QuantizeLinear":
            zero_type = dtypes.get(proto.input[2]) if len(proto.input) > 2 else onnx.TensorProto.UINT8
            if zero_type not in _QRANGE:
                raise CstarError(f"QuantizeLinear {proto.name!r} has a zero point of ONNX type {zero_type}",
                                 "calibrate to int8/uint8 (cstar calibrate does)")
            qrange = _QRANGE[zero_type]
        return _Node(op, tuple(proto.input), tuple(proto.output), attrs, qrange)

    def _run_node(self, node: _Node, values: dict[str, Any]) -> list[Any]:
        args = [values[name] if name else None for name in node.inputs]
        out = OPS[node.op](args, node.attrs, node)
        return list(out) if isinstance(out, (tuple, list)) and node.op != "Concat" else [out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values: dict[str, Any] = {name: getattr(self, attr) for name, attr in self._buffer_of.items()}
        values[self.input_name] = x
        for node in self._nodes:
            values.update(zip(node.outputs, self._run_node(node, values), strict=False))
        return values[self.output_name]


def _fuse_qdq_pairs(nodes: list[_Node], constants: dict[str, torch.Tensor], output: str) -> list[_Node]:
    """Fuse each per-tensor QuantizeLinear whose every consumer is a DequantizeLinear with the same scale
    and zero point into one FakeQuant node (its consumers read the fused output through Identity)."""
    consumers: dict[str, list[_Node]] = {}
    for node in nodes:
        for name in node.inputs:
            consumers.setdefault(name, []).append(node)
    fused: dict[str, str] = {}  # dequantized output -> quantized (now fake-quantized) name
    out: list[_Node] = []
    for node in nodes:
        users = consumers.get(node.outputs[0], [])
        scale = constants.get(node.inputs[1]) if node.op == "QuantizeLinear" else None
        if (scale is not None and scale.numel() == 1 and users and node.outputs[0] != output
                and all(u.op == "DequantizeLinear" and u.inputs[1:] == node.inputs[1:] for u in users)):
            out.append(_Node("FakeQuant", node.inputs, node.outputs, node.attrs, node.qrange))
            fused.update({u.outputs[0]: node.outputs[0] for u in users})
        elif node.op == "DequantizeLinear" and node.outputs[0] in fused:
            out.append(_Node("Identity", (fused[node.outputs[0]],), node.outputs, {}))
        else:
            out.append(node)
    return out


def fake_quant_twin(path: str | Path) -> FakeQuantTwin:
    """The fake-quant twin of the QDQ ONNX file at `path` (a clear error for an op it cannot run)."""
    return FakeQuantTwin(onnx.load(str(path)), str(path))


@dataclass(frozen=True)
class TwinParity:
    """How closely the twin's logits follow the artifact executed as Q/DQ arithmetic."""

    max_abs_diff: float
    agreement: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"max_abs_diff": self.max_abs_diff, "agreement": self.agreement, "n": self.n,
                "against": "int8-onnx executed as qdq-reference"}


def twin_logits(twin: nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The twin's logits on float32 NCHW `images`, batched, without gradients."""
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            out.append(twin(torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size]))).numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def twin_parity(twin: nn.Module, int8_path: str | Path, images: np.ndarray) -> TwinParity:
    """Compare the twin with the INT8 file run on ONNX Runtime as Q/DQ arithmetic (graph optimizations off)."""
    from calibration.execution import QDQ_REFERENCE, open_session, run_logits

    reference = run_logits(open_session(Path(int8_path), QDQ_REFERENCE), images)
    mine = twin_logits(twin, images)
    return TwinParity(float(np.max(np.abs(mine - reference))) if mine.size else 0.0,
                      float(np.mean(mine.argmax(1) == reference.argmax(1))) if mine.size else 1.0,
                      int(images.shape[0]))


def craft_on_twin(int8_path: str | Path, images: np.ndarray, labels: np.ndarray, eps: float, norm: str,
                  seed: int, n_iter: int, n_targets: int) -> tuple[dict[str, np.ndarray], TwinParity]:
    """The apgd suite's examples crafted on the twin of `int8_path` (white-box on the INT8 graph), and the
    twin's parity with the file executed as Q/DQ arithmetic on the same clean images."""
    from calibration.calib_set import craft_apgd

    twin = fake_quant_twin(int8_path)
    parity = twin_parity(twin, int8_path, images)
    sets = craft_apgd(twin, images, labels, eps, norm, seed, n_iter, n_targets)
    return sets, parity
