"""Runtime backends: registry, ONNX Runtime CPU runner, input validation, predict chunking (torch-free)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import sha256_file, write_manifest
from deploy.backends import InputSpec, backend_available, backend_names, create_runner
from deploy.backends.ort import OrtCpuRunner, OrtCudaRunner

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
requires_tensorrt = pytest.mark.skipif(
    not HAS_TENSORRT, reason="needs the tensorrt Python package (not installable here)"
)
REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------- tiny model


def tiny_weights(seed: int = 0, classes: int = 3) -> dict[str, np.ndarray]:
    """Weights of Conv(1->4, 3x3, pad 1) + Relu + GlobalAveragePool + Flatten + Gemm(4->classes)."""
    rng = np.random.default_rng(seed)
    return {
        "conv_w": rng.normal(size=(4, 1, 3, 3)).astype(np.float32),
        "conv_b": rng.normal(size=(4,)).astype(np.float32),
        "fc_w": rng.normal(size=(classes, 4)).astype(np.float32),
        "fc_b": rng.normal(size=(classes,)).astype(np.float32),
    }


def make_tiny_onnx(path: Path, batch: int | str = "N", seed: int = 0, classes: int = 3) -> Path:
    """Write the tiny model with input 'input' [batch, 1, 8, 8] (batch 'N' = dynamic)."""
    w = tiny_weights(seed, classes)
    nodes = [
        helper.make_node("Conv", ["input", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])],
        initializer=[numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="cstar-tests")
    model.ir_version = 9
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_reference(x: np.ndarray, seed: int = 0, classes: int = 3) -> np.ndarray:
    """numpy forward pass of the tiny model (float64)."""
    w = tiny_weights(seed, classes)
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))  # N,1,8,8,3,3
    conv = np.einsum("nchwij,ocij->nohw", windows, w["conv_w"].astype(np.float64))
    conv += w["conv_b"][None, :, None, None]
    pooled = np.maximum(conv, 0).mean(axis=(2, 3))
    return pooled @ w["fc_w"].T.astype(np.float64) + w["fc_b"]


def make_export_dir(directory: Path, stage: str = "export", batch: int | str = "N", seed: int = 0,
                    classes: int = 3, manifest_classes: list[str] | None = None) -> Path:
    """An export (or calibrate) directory: the tiny ONNX plus a hand-written manifest."""
    name = "model.int8.onnx" if stage == "calibrate" else "model.onnx"
    model = make_tiny_onnx(directory / name, batch=batch, seed=seed, classes=classes)
    names = manifest_classes if manifest_classes is not None else [f"class{i}" for i in range(classes)]
    body = {
        "onnx": {"file": name, "sha256": sha256_file(model), "opset": 17, "input_name": "input",
                 "output_name": "logits", "dynamic_batch": batch == "N", "simplifier": "none"},
        "precision": "int8" if stage == "calibrate" else "fp32",
        "input": {"name": "input", "shape": [1, 8, 8], "dtype": "float32", "range": [0, 1]},
        "classes": names,
        "dataset": {"name": "tiny", "input_shape": [1, 8, 8], "classes": names},
        "model": {"name": "tiny"},
        "eps": 0.1,
        "norm": "linf",
        "metrics": {"clean_acc": 0.5, "robust_acc": 0.25},
        "params": 55,
        "flops": 2600,
    }
    if stage == "calibrate":
        body["calibration"] = {"samples": 8, "method": "minmax"}
    write_manifest(directory, stage, body)
    return directory


@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    return make_tiny_onnx(tmp_path / "model.onnx")


@pytest.fixture()
def images() -> np.ndarray:
    return np.random.default_rng(1).random((10, 1, 8, 8), dtype=np.float32)


# ------------------------------------------------------------------------------------- registry


def test_backend_names() -> None:
    assert backend_names()[:4] == ["ort-cpu", "ort-cuda", "ort-trt", "tensorrt"]
    assert {"openvino-cpu", "openvino-gpu", "openvino-npu"} <= set(backend_names())


def test_unknown_backend_lists_valid_names(tiny_model: Path) -> None:
    with pytest.raises(CstarError) as info:
        create_runner("onnx-gpu", tiny_model)
    assert "onnx-gpu" in info.value.message
    for name in backend_names():
        assert name in (info.value.hint or "")
    with pytest.raises(CstarError):
        backend_available("nope")


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_missing_names_the_extra(tiny_model: Path) -> None:
    ok, reason = backend_available("tensorrt")
    assert not ok and "tensorrt" in reason
    with pytest.raises(MissingDependencyError) as info:
        create_runner("tensorrt", tiny_model)
    assert info.value.package == "tensorrt"
    assert "cstar[tensorrt]" in (info.value.hint or "")


@pytest.mark.parametrize(("name", "provider"), [("ort-cuda", "CUDAExecutionProvider"),
                                                ("ort-trt", "TensorrtExecutionProvider")])
def test_gpu_providers_missing_name_the_gpu_extra(tiny_model: Path, name: str, provider: str) -> None:
    if provider in ort.get_available_providers():
        pytest.skip(f"needs an onnxruntime without GPU providers ({provider} is installed here, so the "
                    "missing-dependency path cannot be tested)")
    ok, reason = backend_available(name)
    assert not ok and provider in reason
    with pytest.raises(MissingDependencyError) as info:
        create_runner(name, tiny_model)
    assert info.value.package == "onnxruntime-gpu"
    assert "cstar[gpu]" in (info.value.hint or "")


def test_ort_cpu_available() -> None:
    ok, reason = backend_available("ort-cpu")
    assert ok, reason


def test_silent_cpu_fallback_is_refused(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT quietly running a CUDA session on the CPU must not pass for ort-cuda."""
    real_session = ort.InferenceSession
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])

    def fake_session(path: str, sess_options: object = None, providers: object = None) -> object:
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "InferenceSession", fake_session)
    with pytest.raises(CstarError, match="fell back"):
        OrtCudaRunner(tiny_model).activate()


# ------------------------------------------------------------------------------------- ort-cpu


def test_ort_cpu_matches_numpy_reference(tiny_model: Path, images: np.ndarray) -> None:
    with create_runner("ort-cpu", tiny_model) as runner:
        assert runner.input_spec == InputSpec("input", (None, 1, 8, 8), "float32")
        out = runner.infer(images)
    assert out.dtype == np.float32 and out.shape == (10, 3)
    np.testing.assert_allclose(out, tiny_reference(images), atol=1e-5, rtol=1e-5)


def test_runner_before_activate_is_refused(tiny_model: Path, images: np.ndarray) -> None:
    runner = create_runner("ort-cpu", tiny_model)
    with pytest.raises(CstarError, match="not active"):
        runner.infer(images)
    with pytest.raises(CstarError, match="not active"):
        _ = runner.input_spec
    with pytest.raises(CstarError, match="not active"):
        runner.predict(images)


def test_unknown_option_is_refused(tiny_model: Path) -> None:
    with pytest.raises(CstarError, match="intra_op_thread"):
        create_runner("ort-cpu", tiny_model, intra_op_thread=2)
    with pytest.raises(CstarError, match="graph_optimization_level"):
        create_runner("ort-cpu", tiny_model, graph_optimization_level="max")


def test_missing_or_broken_model_file(tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="does not exist"):
        create_runner("ort-cpu", tmp_path / "absent.onnx").activate()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not an onnx model")
    with pytest.raises(CstarError, match="could not load"):
        create_runner("ort-cpu", broken).activate()


@pytest.mark.parametrize(
    ("make_bad", "match"),
    [
        (lambda x: x[0], "rank 4"),
        (lambda x: x[:, :, :, :, None], "rank 4"),
        (lambda x: np.repeat(x, 3, axis=1), "axis 1"),
        (lambda x: x[:, :, :7, :], "axis 2"),
        (lambda x: np.pad(x, ((0, 0), (0, 0), (0, 0), (0, 1))), "axis 3"),
        (lambda x: x.astype(np.float64), "float64"),
        (lambda x: (x * 255).astype(np.uint8), "uint8"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.nan, x).astype(np.float32), "NaN"),
        (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 5, np.inf, x).astype(np.float32), "inf"),
        (lambda x: x.tolist(), "numpy array"),
        (lambda x: x[:0], "batch of 0"),
    ],
)
def test_bad_inputs_raise_cstar_error(tiny_model: Path, images: np.ndarray, make_bad: object, match: str) -> None:
    bad = make_bad(images)  # type: ignore[operator]
    with create_runner("ort-cpu", tiny_model) as runner, pytest.raises(CstarError, match=match) as info:
        runner.infer(bad)
    assert type(info.value) is CstarError  # never an onnxruntime exception


def test_float64_hint_names_astype(tiny_model: Path, images: np.ndarray) -> None:
    with create_runner("ort-cpu", tiny_model) as runner, pytest.raises(CstarError) as info:
        runner.infer(images.astype(np.float64))
    assert "astype(np.float32)" in (info.value.hint or "")


def test_out_of_range_values_warn_not_fail(tiny_model: Path, images: np.ndarray) -> None:
    with create_runner("ort-cpu", tiny_model) as runner, pytest.warns(UserWarning, match=r"\[0, 1\]"):
        out = runner.infer(images * 255)
    assert out.shape == (10, 3)


def test_predict_chunks_and_equals_infer(tiny_model: Path, images: np.ndarray) -> None:
    with create_runner("ort-cpu", tiny_model) as full:
        expected = full.infer(images)
    with create_runner("ort-cpu", tiny_model, max_batch=4) as runner:
        assert runner.max_batch == 4
        calls: list[int] = []
        real = runner.infer_impl

        def counting(batch: np.ndarray) -> np.ndarray:
            calls.append(batch.shape[0])
            return real(batch)

        runner.infer_impl = counting  # type: ignore[method-assign]
        got = runner.predict(images)
        assert calls == [4, 4, 2]
        with pytest.raises(CstarError, match="outside the range"):
            runner.infer(images)
        assert runner.predict(images[:0]).shape == (0, 3)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)  # batch 4 vs 10 may pick other kernels


def test_static_batch_model_is_padded_and_split(tmp_path: Path, images: np.ndarray) -> None:
    model = make_tiny_onnx(tmp_path / "static.onnx", batch=4)
    with create_runner("ort-cpu", model) as runner:
        assert runner.input_spec.shape == (4, 1, 8, 8)
        assert runner.batch_range() == (4, 4)
        got = runner.predict(images)  # 10 -> 4 + 4 + (2 padded to 4)
        with pytest.raises(CstarError, match="exactly 4"):
            runner.infer(images[:3])
    np.testing.assert_allclose(got, tiny_reference(images), atol=1e-5, rtol=1e-5)


def test_describe(tiny_model: Path) -> None:
    with create_runner("ort-cpu", tiny_model, intra_op_threads=1) as runner:
        info = runner.describe()
    assert info["backend"] == "ort-cpu"
    assert info["provider"] == "CPUExecutionProvider"
    assert info["providers"][0] == "CPUExecutionProvider"
    assert info["versions"]["onnxruntime"] == ort.__version__
    assert info["session_options"]["intra_op_threads"] == 1
    assert info["input"]["shape"] == [None, 1, 8, 8]


def test_device_side_modules_are_torch_free() -> None:
    code = (
        "import sys, deploy, deploy.backends, deploy.backends.ort, deploy.backends.tensorrt, deploy.artifact, "
        "deploy.build, cstar.manifest, cstar.errors\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


# ------------------------------------------------------------------------------------ tensorrt


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_tensorrt_module_imports_without_tensorrt(tiny_model: Path, tmp_path: Path) -> None:
    from deploy.backends.tensorrt import TensorrtRunner, build_engine

    with pytest.raises(MissingDependencyError, match="tensorrt"):
        build_engine(tiny_model, tmp_path / "model.engine")
    with pytest.raises(MissingDependencyError):
        TensorrtRunner(tiny_model).activate()
    assert not (tmp_path / "model.engine").exists()


@requires_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_engine_matches_reference(tiny_model: Path, tmp_path: Path, images: np.ndarray) -> None:
    from deploy.backends.tensorrt import build_engine

    ok, reason = backend_available("tensorrt")
    if not ok:
        pytest.skip(reason)
    info = build_engine(tiny_model, tmp_path / "model.engine", 1, 4, 8, "fp32",
                        timing_cache_path=tmp_path / "timing.cache")
    assert info["precision"] == "fp32" and info["batch"] == {"min": 1, "opt": 4, "max": 8}
    assert (tmp_path / "timing.cache").is_file()
    with create_runner("tensorrt", tmp_path / "model.engine", build_info=info) as runner:
        assert runner.batch_range() == (1, 8)
        got = runner.predict(images)
        with pytest.raises(CstarError):
            runner.infer(images)  # 10 > max batch 8
    np.testing.assert_allclose(got, tiny_reference(images), atol=1e-3, rtol=1e-3)


@requires_tensorrt
@pytest.mark.tensorrt
def test_tensorrt_refuses_engine_from_other_version(tiny_model: Path, tmp_path: Path) -> None:
    from deploy.backends.tensorrt import build_engine

    ok, reason = backend_available("tensorrt")
    if not ok:
        pytest.skip(reason)
    info = build_engine(tiny_model, tmp_path / "model.engine", 1, 1, 2, "fp32")
    info["tensorrt_version"] = "0.0.0"
    with pytest.raises(CstarError, match="TensorRT 0.0.0"):
        create_runner("tensorrt", tmp_path / "model.engine", build_info=info).activate()


def test_bench_times_the_runtime_call_alone(tiny_model: Path, images: np.ndarray) -> None:
    from deploy.bench import time_batch

    with create_runner("ort-cpu", tiny_model) as runner:
        validations: list[int] = []
        runtime_calls: list[int] = []
        real_validate, real_impl = runner.validate, runner.infer_impl

        def validate(batch: np.ndarray) -> np.ndarray:
            validations.append(batch.shape[0])
            return real_validate(batch)

        def impl(batch: np.ndarray) -> np.ndarray:
            runtime_calls.append(batch.shape[0])
            return real_impl(batch)

        runner.validate = validate  # type: ignore[method-assign]
        runner.infer_impl = impl  # type: ignore[method-assign]
        times = time_batch(runner, images[:4], iters=7, warmup=3)
    assert times.shape == (7,) and (times > 0).all()
    assert len(validations) == 1, "validation must run once, outside the timed loop"
    assert runtime_calls == [4] * (3 + 7)


# ------------------------------------------------------------------------ node-level provider fallback


def _cpu_profile(model: Path, tmp_path: Path) -> list[dict[str, object]]:
    """A real ONNX Runtime profile of one CPU run (graph optimizations off: one event per ONNX node)."""
    from deploy.backends.ort import profile_events

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    session.run(None, {"input": np.zeros((2, 1, 8, 8), dtype=np.float32)})
    return profile_events(session.end_profiling())


def test_fallback_nodes_from_a_real_profile(tiny_model: Path, tmp_path: Path) -> None:
    from deploy.backends.ort import fallback_nodes, node_placements

    events = _cpu_profile(tiny_model, tmp_path)
    placed = node_placements(events)
    assert sorted(p.op for p in placed) == ["Conv", "Flatten", "Gemm", "GlobalAveragePool", "Relu"]
    assert {p.provider for p in placed} == {"CPUExecutionProvider"}
    fallen = fallback_nodes(events, "CUDAExecutionProvider")
    assert sorted(p.op for p in fallen) == ["Conv", "Flatten", "Gemm", "GlobalAveragePool", "Relu"]
    assert fallback_nodes(events, "CPUExecutionProvider") == []
    assert fallback_nodes(events, ("TensorrtExecutionProvider", "CPUExecutionProvider")) == []


def test_shape_arithmetic_on_the_cpu_is_not_fallback(tmp_path: Path) -> None:
    """ONNX Runtime keeps int64 shape ops on the CPU next to a GPU provider on purpose; only compute counts."""
    from deploy.backends.ort import fallback_nodes

    nodes = [helper.make_node("Relu", ["input"], ["r"], name="relu"),
             helper.make_node("Shape", ["r"], ["s"], name="shape"),
             helper.make_node("Reshape", ["r", "s"], ["logits"], name="reshape")]
    graph = helper.make_graph(nodes, "shapes", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 8, 8])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(tmp_path / "shapes.onnx"))
    fallen = fallback_nodes(_cpu_profile(tmp_path / "shapes.onnx", tmp_path), "CUDAExecutionProvider")
    assert sorted((p.node, p.op) for p in fallen) == [("relu", "Relu"), ("reshape", "Reshape")]


class _CpuCheckedAsCuda(OrtCudaRunner):
    """Runs on the CPU provider but checks placement as ort-cuda would: every compute node 'fell back'."""

    provider = "CPUExecutionProvider"


@pytest.fixture()
def cpu_as_cuda(monkeypatch: pytest.MonkeyPatch) -> type[OrtCudaRunner]:
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    return _CpuCheckedAsCuda


def test_node_fallback_warns_and_strict_raises(tiny_model: Path, images: np.ndarray,
                                               cpu_as_cuda: type[OrtCudaRunner]) -> None:
    with pytest.warns(UserWarning, match=r"ran \d compute node\(s\) of model.onnx outside CPUExecutionProvider"):
        runner = cpu_as_cuda(tiny_model, intra_op_threads=1)
        runner.activate()
    info = runner.describe()
    assert info["node_providers"] == {"CPUExecutionProvider": len(info["fallback_nodes"])}
    assert {"Conv", "Gemm"} <= {n["op"] for n in info["fallback_nodes"]}
    assert runner._session.end_profiling() == ""  # profiling ended after the one check run: no hot-path cost
    np.testing.assert_allclose(runner.infer(images), tiny_reference(images), atol=1e-5, rtol=1e-5)
    runner.deactivate()
    with pytest.raises(CstarError, match="outside CPUExecutionProvider") as err:
        cpu_as_cuda(tiny_model, provider_check="strict").activate()
    assert "provider_check" in (err.value.hint or "")


def test_provider_check_off_and_ort_cpu_do_not_profile(tiny_model: Path, cpu_as_cuda: type[OrtCudaRunner],
                                                       recwarn: pytest.WarningsRecorder) -> None:
    with cpu_as_cuda(tiny_model, provider_check="off") as runner:
        assert "node_providers" not in runner.describe()
    cpu = OrtCpuRunner(tiny_model)
    with cpu:
        assert cpu.session_options().enable_profiling is False
        assert "node_providers" not in cpu.describe()
    assert not [w for w in recwarn if "compute node" in str(w.message)]
    with pytest.raises(CstarError, match="provider_check"):
        create_runner("ort-cpu", tiny_model, provider_check="loud")


def _two_output_model(path: Path, logits_name: str) -> Path:
    """x (N,1,2,2) -> outputs 'features' (Identity, listed first) and `logits_name` (Flatten)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])
    features = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 1, 2, 2])
    logits = helper.make_tensor_value_info(logits_name, TensorProto.FLOAT, ["N", 4])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["features"]),
                               helper.make_node("Flatten", ["x"], [logits_name])], "two", [x], [features, logits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_ort_runner_returns_the_logits_output_of_a_multi_output_model(tmp_path: Path) -> None:
    from deploy.backends import create_runner

    model = _two_output_model(tmp_path / "two.onnx", "logits")
    x = np.arange(8, dtype=np.float32).reshape(2, 1, 2, 2) / 8
    with create_runner("ort-cpu", model) as runner:
        out = runner.infer(x)
    np.testing.assert_array_equal(out, x.reshape(2, 4))  # not the first-listed 'features' output


def test_ort_runner_refuses_an_ambiguous_multi_output_model(tmp_path: Path) -> None:
    from deploy.backends import create_runner

    model = _two_output_model(tmp_path / "two.onnx", "scores")
    with pytest.raises(CstarError, match="none is named 'logits'"), create_runner("ort-cpu", model) as runner:
        runner.infer(np.zeros((1, 1, 2, 2), dtype=np.float32))
