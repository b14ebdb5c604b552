"""`cstar build`, artifact loading and `deploy.load` (torch-free)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

import deploy
from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import read_manifest, sha256_file
from deploy.artifact import load_artifact, open_runner
from deploy.build import run_build
from tests.deploy.test_backends import make_export_dir, tiny_reference

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

BUILD_JSON_KEYS = {"backend", "provider", "provider_options", "session_options", "precision", "model_file",
                   "batch", "runner_options", "input", "versions"}


@pytest.fixture()
def export_dir(tmp_path: Path) -> Path:
    return make_export_dir(tmp_path / "export")


@pytest.fixture()
def images() -> np.ndarray:
    return np.random.default_rng(2).random((7, 1, 8, 8), dtype=np.float32)


def _direct_ort(model: Path, x: np.ndarray) -> np.ndarray:
    """A plain session with the build's thread count (1): bit-equal outputs are then expected on any CPU
    (another intra-op thread count may split float sums differently)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_build_ort_cpu(export_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    out = tmp_path / "build"
    manifest = run_build(export_dir, "ort-cpu", out, batch_sizes=(1, 16), threads=1)
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "manifest.json", "model.onnx"]
    assert manifest == read_manifest(out)
    assert manifest["stage"] == "build" and manifest["backend"] == "ort-cpu" and manifest["precision"] == "fp32"
    assert manifest["artifact"] == {"file": "model.onnx", "sha256": sha256_file(out / "model.onnx")}
    assert [e["sha256"] for e in manifest["inputs"]] == [
        sha256_file(export_dir / "model.onnx"), sha256_file(export_dir / "manifest.json")]
    for key in ("dataset", "model", "eps", "norm", "metrics", "params", "flops", "input", "classes", "onnx"):
        assert manifest[key] == read_manifest(export_dir)[key]
    build = json.loads((out / "build.json").read_text())
    assert set(build) >= BUILD_JSON_KEYS
    assert manifest["build"] == build
    assert build["provider"] == "CPUExecutionProvider"
    assert build["batch"] == {"min": 1, "opt": 8, "max": 16}
    assert build["session_options"]["intra_op_threads"] == 1
    assert manifest["smoke"] == {"batch_sizes": [1, 16], "num_classes": 3}

    artifact = load_artifact(out)
    assert artifact.stage == "build" and artifact.backend == "ort-cpu"
    assert artifact.input_shape == (1, 8, 8) and artifact.classes == ["class0", "class1", "class2"]
    assert artifact.eps == 0.1 and artifact.norm == "linf" and artifact.precision == "fp32"

    expected = _direct_ort(out / "model.onnx", images)
    with deploy.load(out) as predictor:
        assert predictor.backend == "ort-cpu"
        got = predictor.predict(images)
        again = predictor.predict(images)  # reusable
        top = predictor.classify(images, k=2)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(again, expected)
    np.testing.assert_allclose(got, tiny_reference(images), atol=1e-5, rtol=1e-5)
    assert len(top) == 7 and all(len(row) == 2 for row in top)
    assert top[0][0][0] == f"class{int(np.argmax(expected[0]))}"
    assert top[0][0][1] >= top[0][1][1]


def test_build_batch_range_is_enforced_and_predict_chunks(export_dir: Path, tmp_path: Path,
                                                          images: np.ndarray) -> None:
    out = tmp_path / "build"
    run_build(export_dir, "ort-cpu", out, batch_sizes=(1, 4))
    with open_runner(load_artifact(out)) as runner:
        assert runner.batch_range() == (1, 4)
        with pytest.raises(CstarError, match="outside the range"):
            runner.infer(images)
        np.testing.assert_allclose(runner.predict(images), tiny_reference(images), atol=1e-5, rtol=1e-5)


def test_export_and_calibrate_dirs_load_directly(export_dir: Path, tmp_path: Path, images: np.ndarray) -> None:
    with deploy.load(export_dir) as predictor:
        np.testing.assert_allclose(predictor.predict(images), tiny_reference(images), atol=1e-5, rtol=1e-5)
    calib = make_export_dir(tmp_path / "calib", stage="calibrate")
    artifact = load_artifact(calib)
    assert artifact.stage == "calibrate" and artifact.precision == "int8"
    assert artifact.model_path.name == "model.int8.onnx"
    manifest = run_build(calib, "ort-cpu", tmp_path / "build-int8")
    assert manifest["precision"] == "int8" and manifest["artifact"]["file"] == "model.int8.onnx"
    assert manifest["calibration"]["samples"] == 8


def test_corrupted_model_after_build_is_refused(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    run_build(export_dir, "ort-cpu", out)
    with open(out / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(CstarError, match="sha256") as info:
        load_artifact(out)
    assert "model.onnx" in info.value.message
    assert "cstar build" in (info.value.hint or "")
    (out / "model.onnx").unlink()
    with pytest.raises(CstarError, match="missing"):
        deploy.load(out)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt is installed here")
def test_build_tensorrt_without_tensorrt_writes_nothing(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "build-trt"
    with pytest.raises(MissingDependencyError) as info:
        run_build(export_dir, "tensorrt", out)
    assert "cstar[tensorrt]" in (info.value.hint or "")
    assert not (out / "manifest.json").exists()
    assert not out.exists()


def test_build_dir_opened_with_another_backend(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    run_build(export_dir, "ort-cpu", out)
    with pytest.raises(CstarError, match="built for backend 'ort-cpu'") as info:
        deploy.load(out, backend="ort-cuda")
    assert "--backend ort-cpu" in (info.value.hint or "")
    with pytest.raises(CstarError, match="unknown backend"):
        deploy.load(out, backend="cuda")


def test_export_dir_with_tensorrt_backend_asks_for_build(export_dir: Path) -> None:
    with pytest.raises(CstarError, match="runs engines") as info:
        open_runner(load_artifact(export_dir), "tensorrt")
    assert "cstar build" in (info.value.hint or "")


@pytest.mark.parametrize(
    ("backend", "precision", "match"),
    [("ort-cpu", "int8", "Q/DQ"), ("ort-cpu", "fp16", "fp16 is only available"), ("ort-cpu", "fp64", "not valid")],
)
def test_precision_mismatch(export_dir: Path, tmp_path: Path, backend: str, precision: str, match: str) -> None:
    out = tmp_path / "build"
    with pytest.raises(CstarError, match=match):
        run_build(export_dir, backend, out, precision=precision)
    assert not out.exists()


def test_bad_batch_range_and_sources(export_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="batch range"):
        run_build(export_dir, "ort-cpu", tmp_path / "b1", batch_sizes=(8, 4))
    with pytest.raises(CstarError, match="unknown backend"):
        run_build(export_dir, "trt", tmp_path / "b2")
    with pytest.raises(CstarError, match="is the input"):
        run_build(export_dir, "ort-cpu", export_dir, force=True)
    built = tmp_path / "b3"
    run_build(export_dir, "ort-cpu", built)
    with pytest.raises(CstarError, match="already a build"):
        run_build(built, "ort-cpu", tmp_path / "b4")
    with pytest.raises(CstarError, match="does not exist"):
        run_build(tmp_path / "b1-not-there-either", "ort-cpu", tmp_path / "b5")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    with pytest.raises(CstarError, match="manifest.json is missing"):
        run_build(unfinished, "ort-cpu", tmp_path / "b5")
    assert not any((tmp_path / name).exists() for name in ("b1", "b2", "b4", "b5"))


def test_smoke_failure_leaves_no_files(tmp_path: Path) -> None:
    """A model whose logits disagree with the manifest's classes fails at build time, leaving nothing."""
    source = make_export_dir(tmp_path / "export", manifest_classes=["a", "b", "c", "d", "e"])
    out = tmp_path / "build"
    with pytest.raises(CstarError, match="5 classes"):
        run_build(source, "ort-cpu", out)
    assert not out.exists()


def test_rebuild_into_existing_build_dir(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "build"
    run_build(export_dir, "ort-cpu", out, batch_sizes=(1, 8))
    with pytest.raises(CstarError, match="already holds a finished build"):
        run_build(export_dir, "ort-cpu", out, batch_sizes=(2, 32))
    assert read_manifest(out)["build"]["batch"]["max"] == 8
    manifest = run_build(export_dir, "ort-cpu", out, batch_sizes=(2, 32), force=True)
    assert manifest["build"]["batch"]["max"] == 32
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staged/old copy, no lock
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(CstarError, match="not empty"):
        run_build(export_dir, "ort-cpu", other)
    assert (other / "notes.txt").read_text() == "keep me"


def test_static_batch_source_records_effective_range(tmp_path: Path) -> None:
    source = make_export_dir(tmp_path / "export", batch=2)
    manifest = run_build(source, "ort-cpu", tmp_path / "build", batch_sizes=(1, 64))
    assert manifest["build"]["batch"] == {"min": 2, "opt": 2, "max": 2}
    assert manifest["build"]["input"]["shape"] == [2, 1, 8, 8]


def test_cli_build(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main

    out = tmp_path / "build"
    assert main(["build", "--from", str(export_dir), "--backend", "ort-cpu", "--out", str(out),
                 "--max-batch", "32", "--threads", "1"]) == 0
    assert "model.onnx" in capsys.readouterr().out
    assert read_manifest(out)["build"]["batch"]["max"] == 32
    assert main(["build", "--from", str(export_dir), "--backend", "ort-cpu", "--out", str(tmp_path / "x"),
                 "--precision", "int8"]) == 2
    assert "fix:" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--threads", "-1"), ("--threads", "0"), ("--workspace", "0")])
def test_cli_build_refuses_non_positive_counts(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               flag: str, value: str) -> None:
    from cstar.cli import main

    out = tmp_path / "build"
    assert main(["build", "--from", str(export_dir), "--backend", "ort-cpu", "--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert f"{flag} must be >= 1" in err and "  fix: " in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_ort_trt_build_record_without_a_gpu(export_dir: Path, tmp_path: Path, precision: str) -> None:
    """ORT-TRT options are decided before any GPU is touched: int8 enabled for Q/DQ, the timing cache a folder."""
    from deploy.build import BuildRequest, build_ort

    out = tmp_path / "build"
    out.mkdir()
    cache_file = tmp_path / "caches" / "trt.timing"  # what --timing-cache names for the native backend
    info, options, _ = build_ort(BuildRequest(export_dir / "model.onnx", out, "ort-trt", precision, 1, 8, 64, None,
                                              256, cache_file))
    provider = info["provider_options"]
    assert provider.get("trt_int8_enable", False) is (precision == "int8")
    assert options.get("trt_int8_enable", False) is (precision == "int8")
    assert provider.get("trt_fp16_enable", False) is (precision == "fp16")
    assert provider["trt_timing_cache_path"] == str(cache_file.parent.resolve()) == options["trt_timing_cache_path"]
    assert provider["trt_max_workspace_size"] == 256 << 20
    assert info["executes_as"] == precision


def test_ort_cuda_int8_is_labelled_fake_quantized(export_dir: Path, tmp_path: Path) -> None:
    from deploy.build import BuildRequest, build_ort, ort_trt_timing_cache_dir

    out = tmp_path / "build"
    out.mkdir()
    info, _, _ = build_ort(BuildRequest(export_dir / "model.onnx", out, "ort-cuda", "int8", 1, 1, 8, None, 256, None))
    assert info["executes_as"].startswith("fp32 (Q/DQ fake-quantized")
    assert ort_trt_timing_cache_dir(tmp_path) == tmp_path.resolve()  # an existing folder is used as is


def test_build_tensorrt_fp16_without_converter_writes_nothing(export_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """FP16 engines need onnxconverter-common: refused before any file is written, naming the extra
    (the package is hidden from the import system here, so the test runs whether or not it is installed)."""
    import deploy.backends.tensorrt as trt_backend
    import deploy.build.stage as build

    monkeypatch.setitem(sys.modules, "onnxconverter_common", None)  # find_spec -> None, import -> ImportError

    monkeypatch.setattr(build, "require_backend", lambda name: None)  # as if tensorrt were installed
    monkeypatch.setattr(trt_backend, "import_trt", lambda: object())
    out = tmp_path / "build-fp16"
    with pytest.raises(MissingDependencyError) as info:
        run_build(export_dir, "tensorrt", out, precision="fp16")
    assert info.value.package == "onnxconverter-common" and "cstar[tensorrt]" in (info.value.hint or "")
    assert not out.exists()
