"""`cstar calibrate --target`: the default ort-cpu target writes U8S8 Q/DQ that stays close to FP32."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto

from calibration.calibrate import INT8_NAME, run_calibrate
from calibration.execution import open_target_session, run_logits
from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError


@pytest.fixture(scope="module")
def u8s8(export_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Default target (ort-cpu), 128 train images, parity on the whole 360-image digits test split."""
    out = tmp_path_factory.mktemp("u8s8") / "int8"
    return out, run_calibrate(export_dir, out, data="digits", samples=128, parity_samples=360, verbose=False)


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    """ORT CPU with its fused kernels (how the ort-cpu target runs U8S8), one thread."""
    return run_logits(open_target_session(path, "ort-cpu", threads=1), x)


def test_default_target_records_u8s8(u8s8: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = u8s8
    quant = manifest["quantization"]
    assert quant["format"] == "u8s8-qdq" and quant["target"] == "ort-cpu" and quant["quant_format"] == "QDQ"
    assert quant["activations"] == {"type": "uint8", "symmetric": False, "granularity": "per-tensor"}
    assert quant["weights"] == {"type": "int8", "symmetric": True, "granularity": "per-channel", "bits": 7}
    assert quant["reduce_range"] is True  # 7-bit weights: no u8s8 int16 saturation on CPUs without VNNI
    assert manifest["calibration"]["activation_type"] == "uint8" and manifest["calibration"]["symmetric"] is False
    assert "trt_preflight" not in manifest  # the TensorRT check is for --target tensorrt
    model = onnx.load(str(out / INT8_NAME))
    inits = {i.name: i for i in model.graph.initializer}
    act_types = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert act_types == {TensorProto.UINT8}
    weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weight_dq and all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dq)
    assert any(len(inits[n.input[1]].dims) == 1 and inits[n.input[1]].dims[0] > 1 for n in weight_dq)  # per channel
    weights = [onnx.numpy_helper.to_array(inits[n.input[0]]) for n in weight_dq]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64  # reduce_range: 7-bit weights


def test_u8s8_close_to_fp32(u8s8: tuple[Path, dict[str, Any]], export_dir: Path, digits: DataBundle) -> None:
    """Bounded relative to the logit scale (CPU-independent), and the recorded parity matches the files."""
    out, manifest = u8s8
    images = to_tensors(digits.test)[0].numpy()
    fp32, int8 = _logits(export_dir / "model.onnx", images), _logits(out / INT8_NAME, images)
    scale = float(np.std(fp32))
    diff = np.abs(int8 - fp32)
    assert float(diff.mean()) <= 0.05 * scale
    assert float(diff.max()) <= 0.5 * scale
    assert manifest["parity"]["runtime"] == "ort-cpu" and manifest["parity"]["n"] == 360
    # U8S8 is measured on ORT CPU's own fused kernels; its 7-bit weights make them exact on AVX2 and VNNI alike
    assert manifest["parity"]["executed_as"] == "ort-cpu" and manifest["parity"]["graph_optimization"] == "all"
    assert manifest["parity"]["max_abs_diff"] == pytest.approx(float(diff.max()), rel=0.25)
    metrics = manifest["metrics"]
    assert metrics["fp32_clean_acc"] >= 0.8  # a real classifier, so agreement is meaningful
    assert abs(metrics["clean_acc"] - metrics["fp32_clean_acc"]) <= 0.02


def test_bad_target_options_write_nothing(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="unknown calibration target") as info:
        run_calibrate(export_dir, tmp_path / "a", data="digits", samples=16, target="tflite", verbose=False)
    assert "tensorrt" in (info.value.hint or "")
    with pytest.raises(CstarError, match="--strict-trt") as info:
        run_calibrate(export_dir, tmp_path / "b", data="digits", samples=16, strict_trt=True, verbose=False)
    assert "--target tensorrt" in (info.value.hint or "")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_target_openvino(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main

    out = tmp_path / "ov"
    assert main(["calibrate", "--from", str(export_dir), "--data", "digits", "--samples", "32",
                 "--parity-samples", "60", "--target", "openvino", "--out", str(out)]) == 0
    assert "u8s8-qdq for openvino" in capsys.readouterr().out
    from cstar.manifest import read_manifest

    assert read_manifest(out)["quantization"]["target"] == "openvino"
