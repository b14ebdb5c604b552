"""INT8 format per target: what calibrate's quantizer writes, and `cstar build` refusing format/backend mismatches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from calibration.execution import ORT_CPU, open_session, open_target_session, run_logits
from calibration.quantize import FORMATS, TARGET_FORMATS, format_name, quantize_for_target, target_format
from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, file_entry, read_manifest, sha256_file, write_manifest
from deploy.build import check_int8_format, int8_format, run_build
from tests.deploy.test_backends import make_export_dir, tiny_reference

INT8_NAME = "model.int8.onnx"


def make_calibrate_dir(directory: Path, target: str) -> Path:
    """A calibrate directory: the tiny model quantized for `target` by the real quantizer + its manifest."""
    export = make_export_dir(directory / "export")
    out = directory / f"calib-{target}"
    out.mkdir(parents=True)
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    quant = quantize_for_target(export / "model.onnx", out / INT8_NAME, images, target=target, batch_size=16)
    body = {k: v for k, v in read_manifest(export).items() if k not in ("schema_version", "stage", "inputs")}
    body.update({
        "inputs": [file_entry(export / "model.onnx"), file_entry(export / MANIFEST_NAME)],
        "onnx": {**body["onnx"], "file": INT8_NAME, "sha256": sha256_file(out / INT8_NAME)},
        "precision": "int8",
        "quantization": quant["quantization"],
        "calibration": {"samples": 32, "method": "minmax", "symmetric": quant["symmetric"],
                        "activation_type": quant["activation_type"]},
    })
    write_manifest(out, "calibrate", body)
    return out


def _zero_point_types(path: Path) -> dict[str, set[int]]:
    """{'activation' | 'weight': set of zero-point element types} of the Q/DQ nodes."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    kinds: dict[str, set[int]] = {"activation": set(), "weight": set()}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            kinds["weight"].add(inits[node.input[2]].data_type)
            assert int(np.abs(numpy_helper.to_array(inits[node.input[2]])).max()) == 0, "weights are symmetric"
        elif node.op_type == "QuantizeLinear":
            kinds["activation"].add(inits[node.input[2]].data_type)
    return kinds


def test_target_formats_table() -> None:
    assert TARGET_FORMATS == {"ort-cpu": "u8s8-qdq", "openvino": "u8s8-qdq", "tensorrt": "s8s8-qdq"}
    assert target_format("ort-cpu") == FORMATS["u8s8-qdq"]
    assert FORMATS["u8s8-qdq"].activation_type == "uint8" and not FORMATS["u8s8-qdq"].activation_symmetric
    assert FORMATS["s8s8-qdq"].activation_type == "int8" and FORMATS["s8s8-qdq"].activation_symmetric
    assert format_name("uint8", False) == "u8s8-qdq" and format_name("int8", True) == "s8s8-qdq"
    assert format_name("int8", False) == "s8s8-qdq-asymmetric"
    with pytest.raises(CstarError, match="unknown calibration target 'executorch'") as info:
        target_format("executorch")
    assert "ort-cpu" in (info.value.hint or "")


@pytest.mark.parametrize(("target", "act_type"), [("ort-cpu", TensorProto.UINT8), ("tensorrt", TensorProto.INT8)])
def test_quantizer_writes_the_target_format(tmp_path: Path, target: str, act_type: int) -> None:
    calib = make_calibrate_dir(tmp_path, target)
    quant = read_manifest(calib)["quantization"]
    fmt = TARGET_FORMATS[target]
    assert quant["format"] == fmt and quant["target"] == target and quant["per_channel"] is True
    bits = 7 if target == "ort-cpu" else 8  # u8s8 uses reduce_range (no int16 saturation without VNNI)
    assert quant["weights"] == {"type": "int8", "symmetric": True, "granularity": "per-channel", "bits": bits}
    assert quant["reduce_range"] is (bits == 7)
    assert quant["activations"]["type"] == FORMATS[fmt].activation_type
    kinds = _zero_point_types(calib / INT8_NAME)
    assert kinds == {"activation": {act_type}, "weight": {TensorProto.INT8}}
    # the quantized tiny model still computes the tiny model, within a bound relative to its logit scale, executed
    # as its target executes it: U8S8 on ORT CPU's kernels (7-bit weights: exact on every x86), the TensorRT
    # format as Q/DQ arithmetic (ORT CPU's fused S8S8 kernels saturate without VNNI: checked to run, not gated)
    x = np.random.default_rng(5).random((16, 1, 8, 8), dtype=np.float32)
    got = run_logits(open_target_session(calib / INT8_NAME, target), x)
    ref = tiny_reference(x)
    assert float(np.abs(got - ref).max()) <= 0.05 * float(np.abs(ref).max())
    kernels = run_logits(open_session(calib / INT8_NAME, ORT_CPU), x)
    assert kernels.shape == ref.shape and np.isfinite(kernels).all()


def test_int8_format_read_from_manifests() -> None:
    assert int8_format({"quantization": {"format": "u8s8-qdq"}}) == "u8s8-qdq"
    assert int8_format({"calibration": {"activation_type": "int8", "symmetric": True}}) == "s8s8-qdq"
    assert int8_format({"calibration": {"samples": 8, "method": "minmax"}}) is None  # unrecorded: not checked
    check_int8_format({"calibration": {"samples": 8}}, Path("x"), "tensorrt")


def test_build_refuses_s8s8_for_ort_cpu(tmp_path: Path) -> None:
    calib = make_calibrate_dir(tmp_path, "tensorrt")
    out = tmp_path / "build"
    with pytest.raises(CstarError) as info:
        run_build(calib, "ort-cpu", out)
    message, hint = info.value.message, info.value.hint or ""
    assert "s8s8-qdq" in message and "'ort-cpu'" in message and "--target tensorrt" in message
    assert "slower than U8S8" in message
    assert f"cstar calibrate --from {tmp_path / 'export'} --target ort-cpu" in hint
    assert not out.exists()


@pytest.mark.parametrize("backend", ["tensorrt", "ort-trt"])
def test_build_refuses_u8s8_for_tensorrt(tmp_path: Path, backend: str) -> None:
    """Refused before any runtime check, so it holds where TensorRT is not installed too."""
    calib = make_calibrate_dir(tmp_path, "ort-cpu")
    out = tmp_path / "build"
    with pytest.raises(CstarError) as info:
        run_build(calib, backend, out)
    assert "u8s8-qdq" in info.value.message and f"'{backend}'" in info.value.message
    assert "symmetric int8" in info.value.message
    assert "--target tensorrt" in (info.value.hint or "")
    assert not out.exists()


def test_build_u8s8_for_ort_cpu(tmp_path: Path) -> None:
    calib = make_calibrate_dir(tmp_path, "ort-cpu")
    manifest = run_build(calib, "ort-cpu", tmp_path / "build", threads=1)
    assert manifest["precision"] == "int8" and manifest["quantization"]["format"] == "u8s8-qdq"
    assert manifest["quantization"] == read_manifest(calib)["quantization"]


def test_cli_build_mismatch_prints_fix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main

    calib = make_calibrate_dir(tmp_path, "tensorrt")
    assert main(["build", "--from", str(calib), "--backend", "ort-cpu", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "s8s8-qdq" in err and "fix:" in err and "--target ort-cpu" in err
