"""OpenVINO backends: FP32 parity with ONNX Runtime, real INT8 execution, build/verify/bench/predict, absent devices."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import read_manifest
from deploy.artifact import load_artifact
from deploy.backends import backend_available, backend_names, create_runner
from deploy.build import run_build
from tests.deploy.test_backends import make_export_dir, make_tiny_onnx, tiny_reference
from tests.deploy.test_int8_formats import INT8_NAME, make_calibrate_dir

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
pytestmark = pytest.mark.skipif(not HAS_OPENVINO, reason="openvino is not installed (pip install 'cstar[openvino]')")


def _devices() -> list[str]:
    import openvino

    return list(openvino.Core().available_devices)


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture()
def images() -> np.ndarray:
    return np.random.default_rng(3).random((7, 1, 8, 8), dtype=np.float32)


def test_names_registered() -> None:
    assert {"openvino-cpu", "openvino-gpu", "openvino-npu"} <= set(backend_names())
    ok, reason = backend_available("openvino-cpu")
    assert ok and "CPU" in reason


def test_fp32_matches_onnxruntime(tmp_path: Path, images: np.ndarray) -> None:
    model = make_tiny_onnx(tmp_path / "model.onnx")
    with create_runner("openvino-cpu", model, intra_op_threads=1) as runner:
        assert runner.input_spec.shape == (None, 1, 8, 8) and runner.input_spec.name == "input"
        got = runner.predict(images)
        single = runner.infer(images[:1])
        info = runner.describe()
    expected = _ort(model, images)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(single, expected[:1], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got, tiny_reference(images), atol=1e-4, rtol=0)
    # f32 asked for (not the CPU's bf16 default) and the thread count reached OpenVINO
    assert info["compiled_properties"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert info["compiled_properties"]["INFERENCE_NUM_THREADS"] == "1"
    assert info["execution_precisions"]["Convolution"] == {"f32": 1}
    assert info["backend"] == "openvino-cpu" and info["versions"]["openvino"]


def test_u8s8_runs_int8_and_stays_close_to_fp32(tmp_path: Path) -> None:
    """Real u8 kernels (not fake-quantized f32); logits within a bound relative to the FP32 logit scale."""
    calib = make_calibrate_dir(tmp_path, "openvino")
    assert read_manifest(calib)["quantization"]["format"] == "u8s8-qdq"
    x = np.random.default_rng(4).random((32, 1, 8, 8), dtype=np.float32)
    with create_runner("openvino-cpu", calib / INT8_NAME, intra_op_threads=1) as runner:
        got = runner.predict(x)
        precisions = runner.execution_precisions()
    assert set(precisions["Convolution"]) <= {"u8", "i8"}, precisions
    fp32 = tiny_reference(x)
    scale = float(np.abs(fp32).max())
    assert float(np.abs(got - fp32).max()) <= 0.05 * scale
    # the same quantized graph on ONNX Runtime: both runtimes agree up to INT8 rounding
    assert float(np.abs(got - _ort(calib / INT8_NAME, x)).max()) <= 0.02 * scale


def test_runner_options_refused(tmp_path: Path) -> None:
    model = make_tiny_onnx(tmp_path / "model.onnx")
    with pytest.raises(CstarError, match="unknown option") as info:
        create_runner("openvino-cpu", model, num_threads=1)
    assert "intra_op_threads" in (info.value.hint or "")
    with pytest.raises(CstarError, match="inference_precision"):
        create_runner("openvino-cpu", model, inference_precision="f64")
    with pytest.raises(CstarError, match="intra_op_threads"):
        create_runner("openvino-cpu", model, intra_op_threads=0)
    runner = create_runner("openvino-cpu", tmp_path / "missing.onnx")
    with pytest.raises(CstarError, match="does not exist"):
        runner.activate()


@pytest.mark.parametrize(("backend", "device"), [("openvino-gpu", "GPU"), ("openvino-npu", "NPU")])
def test_absent_device_refused(tmp_path: Path, backend: str, device: str) -> None:
    if any(d == device or d.startswith(device + ".") for d in _devices()):
        pytest.skip(reason=f"this machine has an OpenVINO {device} (gpu/npu present): the refusal cannot be shown here")
    model = make_tiny_onnx(tmp_path / "model.onnx")
    ok, reason = backend_available(backend)
    assert not ok and device in reason and "CPU" in reason
    with pytest.raises(CstarError) as info:
        create_runner(backend, model)
    assert not isinstance(info.value, MissingDependencyError)  # no pip install brings a GPU
    assert f"'{backend}'" in info.value.message and device in info.value.message
    assert "openvino-cpu" in (info.value.hint or "")
    export = make_export_dir(tmp_path / "export")
    with pytest.raises(CstarError, match=device):
        run_build(export, backend, tmp_path / "build")
    assert not (tmp_path / "build").exists()


def test_build_openvino_cpu(tmp_path: Path, images: np.ndarray) -> None:
    import deploy

    export = make_export_dir(tmp_path / "export")
    out = tmp_path / "build"
    manifest = run_build(export, "openvino-cpu", out, batch_sizes=(1, 16), threads=1)
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "manifest.json", "model.onnx"]
    build = json.loads((out / "build.json").read_text())
    assert build == manifest["build"]
    assert build["backend"] == "openvino-cpu" and build["provider"] == "openvino:CPU" and build["device"] == "CPU"
    assert build["provider_options"]["INFERENCE_NUM_THREADS"] == 1
    assert build["provider_options"]["INFERENCE_PRECISION_HINT"] == "f32"
    assert build["batch"] == {"min": 1, "opt": 8, "max": 16}
    assert build["execution_precisions"]["Convolution"] == {"f32": 1}
    assert build["versions"]["openvino"]
    assert manifest["smoke"] == {"batch_sizes": [1, 16], "num_classes": 3}
    assert load_artifact(out).backend == "openvino-cpu"
    with deploy.load(out) as predictor:
        assert predictor.backend == "openvino-cpu"
        np.testing.assert_allclose(predictor.predict(images), tiny_reference(images), atol=1e-4, rtol=0)
        assert predictor.runner.describe()["compiled_properties"]["INFERENCE_NUM_THREADS"] == "1"
        with pytest.raises(CstarError, match="outside the range"):
            predictor.runner.infer(np.zeros((17, 1, 8, 8), dtype=np.float32))


def test_build_int8_for_openvino_records_int8_execution(tmp_path: Path) -> None:
    calib = make_calibrate_dir(tmp_path, "openvino")
    manifest = run_build(calib, "openvino-cpu", tmp_path / "build", threads=1)
    assert manifest["precision"] == "int8" and manifest["quantization"]["target"] == "openvino"
    assert set(manifest["build"]["execution_precisions"]["Convolution"]) <= {"u8", "i8"}


def test_bench_and_predict_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main

    export = make_export_dir(tmp_path / "export")
    out = tmp_path / "build"
    assert main(["build", "--from", str(export), "--backend", "openvino-cpu", "--out", str(out), "--threads", "1",
                 "--max-batch", "8"]) == 0
    assert main(["bench", "--artifact", str(out), "--batch-sizes", "1,8", "--iters", "3", "--warmup", "1",
                 "--threads", "1", "--out", str(tmp_path / "bench")]) == 0
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["backend"] == "openvino-cpu"
    text = json.dumps(bench)
    assert '"p50' in text
    x = np.random.default_rng(9).random((2, 1, 8, 8), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(out), "--json", str(tmp_path / "x.npy")]) == 0
    rows = json.loads(capsys.readouterr().out)
    expected = tiny_reference(x).argmax(1)
    assert [row["top"][0]["class"] for row in rows[:2]] == [f"class{int(i)}" for i in expected]
    # an export directory runs on openvino-cpu directly too (OpenVINO reads the ONNX)
    assert main(["predict", "--artifact", str(export), "--backend", "openvino-cpu", "--json",
                 str(tmp_path / "x.npy")]) == 0
    assert json.loads(capsys.readouterr().out)[0]["top"][0]["class"] == f"class{int(expected[0])}"


def test_verify_on_openvino(robust_digits_dir: Path, tmp_path: Path) -> None:
    """`cstar verify` of the robust digits model on openvino-cpu passes the same gate as on ort-cpu."""
    from deploy.attackset import run_attackset
    from deploy.verify import run_verify
    from export.exporter import run_export

    run_export(robust_digits_dir, tmp_path / "export", parity_samples=32, progress=False)
    run_build(tmp_path / "export", "openvino-cpu", tmp_path / "build", threads=1)
    run_attackset(robust_digits_dir, "digits", tmp_path / "set", samples=60)
    report = run_verify(tmp_path / "build", tmp_path / "set", tmp_path / "report", square_queries=10, threads=1)
    assert report["backend"] == "openvino-cpu" and report["passed"], report["failed_checks"]
    run, ref = report["metrics"]["runtime"], report["metrics"]["reference"]
    assert run["max_abs_diff"] < 1e-3 and run["agreement"] >= 0.98
    assert abs(run["clean_acc"] - ref["clean_acc"]) <= 0.02


def test_openvino_build_verify_predict_without_torch(tmp_path: Path) -> None:
    """The OpenVINO device path (build, verify, predict) never needs torch."""
    from tests.deploy.test_torch_free import _attack_set, run_cli_without_torch

    export = make_export_dir(tmp_path / "export")
    attack_set = _attack_set(tmp_path / "set")
    np.save(tmp_path / "x.npy", np.random.default_rng(2).random((2, 1, 8, 8), dtype=np.float32))
    build = tmp_path / "build"
    commands = [
        ["build", "--from", str(export), "--backend", "openvino-cpu", "--threads", "1", "--out", str(build)],
        ["verify", "--artifact", str(build), "--set", str(attack_set), "--square-queries", "10",
         "--max-robust-drop", "100", "--out", str(tmp_path / "report")],
        ["predict", "--artifact", str(build), "--json", str(tmp_path / "x.npy")],
    ]
    proc = run_cli_without_torch(commands, tmp_path)
    assert proc.returncode == 0 and "CODES [0, 0, 0]" in proc.stdout, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["backend"] == "openvino-cpu" and report["passed"]
    assert report["metrics"]["runtime"]["agreement"] == 1.0 and report["metrics"]["runtime"]["max_abs_diff"] < 1e-4
