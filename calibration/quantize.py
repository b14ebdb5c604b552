"""INT8 static quantization with ONNX Runtime: explicit Q/DQ, per-channel weights, symmetric (all zero points 0).

That is the form TensorRT consumes (explicit quantization) and ONNX Runtime CPU runs as is. Biases
stay float (TensorRT takes no int32 DequantizeLinear; it fuses the float bias into the INT8 conv).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from cstar.errors import CstarError
from cstar.manifest import atomic_target, sha256_file

METHODS = ("minmax", "entropy", "percentile")


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
        "activation_type": activation_type,
        "weight_type": "int8",
        "symmetric": symmetric,
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
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        session.run(None, {input_name: np.ascontiguousarray(sample, dtype=np.float32)})
    except Exception as exc:  # noqa: BLE001 - ORT raises many types; report them as one user error
        raise CstarError(f"the quantized model does not run on ONNX Runtime CPU: {exc}",
                         "report this with the exported model.onnx attached") from exc
