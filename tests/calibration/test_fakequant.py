"""The fake-quant twin (calibration.fakequant): the INT8 graph in PyTorch, equal to its Q/DQ arithmetic,
with straight-through gradients; the INT8 attack set crafted on it; verify's warning for a foreign twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from calibration.calibrate import INT8_NAME
from calibration.execution import QDQ_REFERENCE, open_session, run_logits
from calibration.fakequant import fake_quant_twin, round_ste, twin_logits, twin_parity
from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError


def _qdq_graph(path: Path, extra_op: str | None = None) -> Path:
    """x (uint8 Q/DQ) -> Conv 3x3 (int8 per-channel weights) -> Relu -> (int8 Q/DQ) -> GlobalAveragePool -> Flatten."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, size=(4, 2, 3, 3)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(0.02, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
        numpy_helper.from_array(weight, "w_q"),
        numpy_helper.from_array(np.array([0.01, 0.02, 0.005, 0.03], np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w_zp"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "bias"),
        numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "a_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w"], axis=0),
        helper.make_node("Conv", ["xd", "w", "bias"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("QuantizeLinear", ["r", "a_scale", "a_zp"], ["rq"]),
        helper.make_node("DequantizeLinear", ["rq", "a_scale", "a_zp"], ["rd"]),
        helper.make_node("GlobalAveragePool", ["rd"], ["p"]),
        helper.make_node("Flatten", ["p"], ["y"]),
    ]
    if extra_op is not None:
        nodes.append(helper.make_node(extra_op, ["y"], ["z"]))
    output = "z" if extra_op else "y"
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2, 8, 8])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_round_is_half_to_even_with_identity_gradient() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.49], requires_grad=True)
    y = round_ste(x)
    assert y.tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 0.0]
    y.sum().backward()
    assert x.grad is not None and x.grad.tolist() == [1.0] * 6


def test_twin_equals_qdq_arithmetic_of_a_hand_made_graph(tmp_path: Path) -> None:
    path = _qdq_graph(tmp_path / "qdq.onnx")
    x = np.random.default_rng(1).uniform(-3, 6, size=(64, 2, 8, 8)).astype(np.float32)  # saturates both ends
    reference = run_logits(open_session(path, QDQ_REFERENCE), x)
    mine = twin_logits(fake_quant_twin(path), x)
    step = 0.05 / 64  # one activation quantization step, averaged over the 8x8 pool
    assert np.abs(mine - reference).max() <= step + 1e-6
    assert np.mean(np.abs(mine - reference) < 1e-5) >= 0.99


def test_twin_gradient_is_straight_through_inside_the_range_and_zero_outside(tmp_path: Path) -> None:
    twin = fake_quant_twin(_qdq_graph(tmp_path / "qdq.onnx"))
    x = torch.zeros(1, 2, 8, 8)
    x[0, 0, :4] = 10.0  # above the input range (0.02 * 127 = 2.54): saturated, no gradient
    x[0, 0, 4:] = 0.3
    x.requires_grad_(True)
    twin(x).sum().backward()
    grad = x.grad
    assert grad is not None
    assert torch.all(grad[0, 0, :4] == 0)
    assert torch.count_nonzero(grad[0, 0, 4:]) > 0


def test_unsupported_op_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CstarError) as caught:
        fake_quant_twin(_qdq_graph(tmp_path / "qdq.onnx", extra_op="Softmax"))
    assert "Softmax" in caught.value.message and "QuantizeLinear" in (caught.value.hint or "")


def test_twin_of_the_calibrated_fixture_follows_its_qdq_execution(export_dir: Path, tmp_path: Path,
                                                                  digits: DataBundle) -> None:
    from calibration.calibrate import run_calibrate

    out = tmp_path / "calib"
    run_calibrate(export_dir, out, data="digits", samples=128, parity_samples=60, target="tensorrt",
                  reference=None, verbose=False)
    images = to_tensors(digits.test, limit=200)[0].numpy()
    twin = fake_quant_twin(out / INT8_NAME)
    parity = twin_parity(twin, out / INT8_NAME, images)
    assert parity.agreement >= 0.99 and parity.n == 200
    close = np.abs(twin_logits(twin, images) - run_logits(open_session(out / INT8_NAME, QDQ_REFERENCE), images))
    assert np.mean(close.max(axis=1) < 1e-4) >= 0.9  # the rest differ by single rounding-boundary flips
    fp32 = fake_quant_twin(export_dir / "model.onnx")  # a float graph runs too, exactly
    fp32_ref = run_logits(open_session(export_dir / "model.onnx", QDQ_REFERENCE), images)
    assert np.abs(twin_logits(fp32, images) - fp32_ref).max() < 1e-4


def _set(path: Path) -> dict[str, Any]:
    with np.load(path / "attackset.npz") as data:
        return {key: data[key] for key in data.files}


def test_attackset_quantized_crafts_on_the_twin_and_verify_names_a_foreign_twin(
        export_dir: Path, robust_digits_dir: Path, tmp_path: Path) -> None:
    from calibration.calibrate import run_calibrate
    from deploy.attackset import TWIN_ATTACKS, run_attackset
    from deploy.build import run_build
    from deploy.verify import run_verify

    calib = tmp_path / "calib"
    run_calibrate(export_dir, calib, data="digits", samples=128, parity_samples=40, target="ort-cpu",
                  reference=None, verbose=False)
    manifest = run_attackset(robust_digits_dir, "digits", tmp_path / "set", samples=60, suite="apgd", iters=20,
                             quantized=calib)
    arrays = _set(tmp_path / "set")
    x = arrays["x_clean"]
    for name in TWIN_ATTACKS:
        adv = arrays[f"adv_{name}"]
        assert adv.shape == x.shape and np.abs(adv - x).max() <= 0.2 + 1e-6 and adv.min() >= 0 and adv.max() <= 1
    twin = manifest["set"]["quantized"]
    assert twin["onnx_sha256"] == read_sha(calib) and twin["attacks"] == list(TWIN_ATTACKS)
    assert 0.0 <= twin["twin_robust_acc"] <= twin["twin_clean_acc"]
    # the reference's own number counts only the attacks crafted on the reference
    per_attack = manifest["metrics"]["per_attack"]
    assert set(TWIN_ATTACKS) <= set(per_attack)
    assert manifest["metrics"]["robust_acc"] <= min(per_attack[a] for a in ("apgd_ce", "apgd_t", "pgd", "fgsm"))

    run_build(calib, "ort-cpu", tmp_path / "build-int8")
    run_build(export_dir, "ort-cpu", tmp_path / "build-fp32")
    own = run_verify(tmp_path / "build-int8", tmp_path / "set", tmp_path / "verify-int8", square_queries=20, raise_on_fail=False)
    other = run_verify(tmp_path / "build-fp32", tmp_path / "set", tmp_path / "verify-fp32", square_queries=20, raise_on_fail=False)
    assert not [w for w in own["warnings"] if "fake-quant" in w]
    assert [w for w in other["warnings"] if "fake-quant" in w]
    assert set(TWIN_ATTACKS) <= set(own["metrics"]["runtime"]["transfer"])


def read_sha(calib: Path) -> str:
    return str(json.loads((calib / "manifest.json").read_text())["onnx"]["sha256"])
