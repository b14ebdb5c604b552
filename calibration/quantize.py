"""INT8 static quantization with ONNX Runtime into explicit Q/DQ, in the format the target runtime runs fast.

Two formats, both QDQ with int8 per-channel symmetric weights and float biases:

- `s8s8-qdq`: int8 activations, symmetric (every zero point 0). The only form TensorRT takes (explicit
  quantization); ONNX Runtime CPU runs it 2-3x slower than U8S8, on small models slower than FP32.
- `u8s8-qdq`: uint8 activations, asymmetric (zero point per tensor). ONNX Runtime's x86 QLinearConv
  fast path (U8S8, VNNI/AVX2); OpenVINO's ONNX frontend also turns it into real u8 convolutions.

Measured here with `cstar bench --threads 1` (p50 ms; AMD EPYC with AVX512-VNNI, shared machine;
random-weight CIFAR-shape models exported by `cstar export`, ORT 1.32, OpenVINO 2026.4, f32 hint):

    model               format   ort-cpu b1   ort-cpu b64   openvino-cpu b1   openvino-cpu b64
    ResNet-18           fp32       14.1         626            12.0              596
                        s8s8        8.4         492             4.9              181
                        u8s8        3.5         176             3.3              166
    small-resnet w16    fp32       0.24        15.5            0.31             16.5
                        s8s8       0.33        20.5            0.30              7.0
                        u8s8       0.14         9.8            0.16              5.7

OpenVINO runs both formats as real INT8 (its low-precision transformations execute u8 convolutions
for either; `execution_precisions` in build.json shows it); u8s8 was 5-45% faster there, so the
openvino target gets u8s8. Quantizing the bias to int32 made no measurable difference on either
runtime, so biases stay float everywhere (TensorRT needs that).

U8S8 is made with `reduce_range` (7-bit weights). x86 CPUs without VNNI (AVX2, AVX-512 before
Cascade Lake) multiply u8 x s8 pairs with an int16 intermediate sum (vpmaddubsw) that saturates
with full 8-bit weights, as ONNX Runtime's quantization docs warn. Measured with OpenVINO under
`ONEDNN_MAX_CPU_ISA=AVX2` on 8 small digits models: full-range U8S8 logits were off by 0.18-1.57 x
the logit spread (agreement 0.10-0.93), reduce_range matched the VNNI result. An artifact is built
on one machine and deployed on another, so the format must be right on every x86 CPU; the cost is
one bit of weight precision (logit error up to ~2x larger, still well inside the parity bounds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cstar.errors import CstarError
from cstar.manifest import atomic_target, sha256_file

METHODS = ("minmax", "entropy", "percentile")


@dataclass(frozen=True)
class Int8Format:
    """One INT8 Q/DQ layout: activation type/symmetry (weights are always int8 symmetric)."""

    name: str
    activation_type: str
    activation_symmetric: bool
    weight_type: str = "int8"
    weight_symmetric: bool = True
    reduce_range: bool = False  # 7-bit weights: no int16 saturation in U8S8 kernels without VNNI

    def describe(self, per_channel: bool) -> dict[str, Any]:
        """The manifest's `quantization` block (without the target)."""
        return {
            "format": self.name,
            "quant_format": "QDQ",
            "activations": {"type": self.activation_type, "symmetric": self.activation_symmetric,
                            "granularity": "per-tensor"},
            "weights": {"type": self.weight_type, "symmetric": self.weight_symmetric,
                        "granularity": "per-channel" if per_channel else "per-tensor",
                        "bits": 7 if self.reduce_range else 8},
            "reduce_range": self.reduce_range,
            "per_channel": per_channel,
            "bias": "float",
        }


FORMATS: dict[str, Int8Format] = {
    "u8s8-qdq": Int8Format("u8s8-qdq", "uint8", False, reduce_range=True),
    "s8s8-qdq": Int8Format("s8s8-qdq", "int8", True),
}
# calibrate --target -> the format that runtime runs fast and correctly (numbers in the module docstring)
TARGET_FORMATS: dict[str, str] = {
    "ort-cpu": "u8s8-qdq",
    "openvino": "u8s8-qdq",
    "tensorrt": "s8s8-qdq",
}
TARGETS = tuple(TARGET_FORMATS)
DEFAULT_TARGET = "ort-cpu"


def format_name(activation_type: str, symmetric: bool) -> str:
    """Name of the Q/DQ layout with these activations (non-standard combinations get a suffix)."""
    base = "u8s8-qdq" if activation_type == "uint8" else "s8s8-qdq"
    standard = FORMATS[base].activation_symmetric
    if symmetric == standard:
        return base
    return f"{base}-{'symmetric' if symmetric else 'asymmetric'}"


def target_format(target: str) -> Int8Format:
    """The INT8 format calibrate writes for `target`, with a clear error for unknown targets."""
    if target not in TARGET_FORMATS:
        raise CstarError(f"unknown calibration target '{target}'", f"use one of: {', '.join(TARGETS)}")
    return FORMATS[TARGET_FORMATS[target]]


def _calibration_method(method: str) -> Any:
    from onnxruntime.quantization import CalibrationMethod

    table = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }
    if method not in table:
        raise CstarError(f"unknown calibration method '{method}'", f"use one of: {', '.join(METHODS)}")
    return table[method]


def _input_info(model: onnx.ModelProto) -> tuple[str, int | None, bool]:
    """(name, fixed batch size or None, dynamic batch?) of the model's single real input."""
    initializers = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise CstarError(
            f"expected an ONNX model with one input, found {len(inputs)}: {[i.name for i in inputs]}",
            "export the model with cstar export (one image input, one logits output)",
        )
    dims = inputs[0].type.tensor_type.shape.dim
    if not dims:
        return inputs[0].name, None, True
    first = dims[0]
    if first.HasField("dim_value"):
        return inputs[0].name, int(first.dim_value), False
    return inputs[0].name, None, True


def _make_reader(input_name: str, images: np.ndarray, batch_size: int) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        """Feeds the calibration images in batches of `batch_size` (the last one may be short)."""

        def __init__(self) -> None:
            self._iter: Iterator[dict[str, np.ndarray]] | None = None

        def _batches(self) -> Iterator[dict[str, np.ndarray]]:
            for start in range(0, images.shape[0], batch_size):
                yield {input_name: np.ascontiguousarray(images[start : start + batch_size], dtype=np.float32)}

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._iter is None:
                self._iter = self._batches()
            return next(self._iter, None)

        def rewind(self) -> None:
            self._iter = None

    return _Reader()


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise CstarError(f"calibration images must be a non-empty NCHW batch, got shape {images.shape}",
                         "build them with calibration.calib_set.build_calibration_set")
    if not np.isfinite(images).all():
        raise CstarError("calibration images contain NaN or Inf", "pixels must be finite values in [0, 1]")
    return images.astype(np.float32, copy=False)


def preprocess(fp32_path: str | Path, out_path: str | Path) -> dict[str, Any]:
    """onnxruntime's quant_pre_process (shape inference + basic graph optimizations) into `out_path`."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    has_sympy = importlib.util.find_spec("sympy") is not None
    quant_pre_process(str(fp32_path), str(out_path), skip_symbolic_shape=not has_sympy)
    return {"symbolic_shape": has_sympy}


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    images: np.ndarray,
    method: str = "minmax",
    per_channel: bool = True,
    batch_size: int = 64,
    symmetric: bool = True,
    activation_type: str = "int8",
    extra_options: dict[str, Any] | None = None,
    reduce_range: bool = False,
) -> dict[str, Any]:
    """Static INT8 quantization (QDQ) of `fp32_path` calibrated on `images`; writes `out_path` atomically.

    Defaults give what TensorRT wants: int8 weights per channel, int8 activations, symmetric so every
    zero point is 0, biases float. `symmetric`/`activation_type`/`extra_options` exist to build
    counter-examples (asymmetric, uint8) for tests. Returns a summary for the manifest.
    """
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    fp32_path = Path(fp32_path)
    out_path = Path(out_path)
    images = _check_images(images)
    calibrate_method = _calibration_method(method)
    qtypes = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8}
    if activation_type not in qtypes:
        raise CstarError(f"unknown activation type '{activation_type}'", "use int8 (TensorRT) or uint8")
    source = onnx.load(str(fp32_path), load_external_data=False)
    input_name, fixed_batch, dynamic = _input_info(source)
    if fixed_batch is not None:
        batch_size = fixed_batch
        if images.shape[0] % fixed_batch:
            keep = images.shape[0] - images.shape[0] % fixed_batch
            if keep == 0:
                raise CstarError(
                    f"the model has a fixed batch of {fixed_batch} but only {images.shape[0]} calibration images",
                    f"pass --samples {fixed_batch} or more, or export with a dynamic batch",
                )
            images = images[:keep]
    options: dict[str, Any] = {
        "ActivationSymmetric": symmetric,
        "WeightSymmetric": True,
        "QuantizeBias": False,
    }
    if method == "percentile":
        options["CalibPercentile"] = 99.999
    options.update(extra_options or {})
    tmp = atomic_target(out_path)
    try:
        with tempfile.TemporaryDirectory(prefix="cstar-quant-") as work:
            pre_path = Path(work) / "preprocessed.onnx"
            pre_info = preprocess(fp32_path, pre_path)
            with contextlib.redirect_stdout(io.StringIO()):  # ORT prints histogram progress to stdout
                quantize_static(
                    str(pre_path),
                    str(tmp),
                    _make_reader(input_name, images, batch_size),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=qtypes[activation_type],
                    weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method,
                    calibration_providers=["CPUExecutionProvider"],
                    reduce_range=reduce_range,
                    extra_options=options,
                )
        quantized = onnx.load(str(tmp))
        _restore_dynamic_batch(quantized, dynamic, tmp)
        _check_runs(tmp, input_name, images[: min(2, images.shape[0])] if fixed_batch is None else images[:fixed_batch])
        os.replace(tmp, out_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    quantized = onnx.load(str(out_path))
    counts: dict[str, int] = {}
    for node in quantized.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {
        "file": out_path.name,
        "sha256": sha256_file(out_path),
        "method": method,
        "per_channel": per_channel,
        "quant_format": "QDQ",
        "format": format_name(activation_type, symmetric),
        "activation_type": activation_type,
        "weight_type": "int8",
        "symmetric": symmetric,
        "reduce_range": reduce_range,
        "quantize_bias": bool(options.get("QuantizeBias", True)),
        "samples": int(images.shape[0]),
        "batch_size": int(batch_size),
        "input_name": input_name,
        "output_name": quantized.graph.output[0].name,
        "opset": _default_opset(quantized),
        "dynamic_batch": dynamic,
        "quantize_nodes": counts.get("QuantizeLinear", 0),
        "dequantize_nodes": counts.get("DequantizeLinear", 0),
        "preprocess": pre_info,
    }


def quantize_for_target(
    fp32_path: str | Path,
    out_path: str | Path,
    images: np.ndarray,
    target: str = DEFAULT_TARGET,
    method: str = "minmax",
    per_channel: bool = True,
    batch_size: int = 64,
) -> dict[str, Any]:
    """`quantize_int8` in the format `target` runs fast (TARGET_FORMATS); the summary adds format/target."""
    fmt = target_format(target)
    summary = quantize_int8(fp32_path, out_path, images, method=method, per_channel=per_channel,
                            batch_size=batch_size, symmetric=fmt.activation_symmetric,
                            activation_type=fmt.activation_type, reduce_range=fmt.reduce_range)
    summary["target"] = target
    summary["quantization"] = {**fmt.describe(per_channel), "target": target}
    return summary


def _default_opset(model: onnx.ModelProto) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _restore_dynamic_batch(model: onnx.ModelProto, dynamic: bool, path: Path) -> None:
    """Make sure a dynamic-batch source stays dynamic-batch after quantization (re-save if repaired)."""
    if not dynamic:
        return
    changed = False
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
            changed = True
    if changed:
        del model.graph.value_info[:]
        onnx.save(model, str(path))


def _check_runs(path: Path, input_name: str, sample: np.ndarray) -> None:
    """The quantized model must load and run on ONNX Runtime CPU."""
    from cstar.ort_cpu import cpu_session

    try:
        session = cpu_session(path, fix="report this with the exported model.onnx attached")
        session.run(None, {input_name: np.ascontiguousarray(sample, dtype=np.float32)})
    except Exception as exc:  # noqa: BLE001 - ORT raises many types; report them as one user error
        raise CstarError(f"the quantized model does not run on ONNX Runtime CPU: {exc}",
                         "report this with the exported model.onnx attached") from exc
