"""ExecuTorch XNNPACK backend: FP32/INT8 .pte lowering, build/calibrate wiring, format refusals, CLI."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import file_entry, read_manifest, sha256_file, write_manifest
from deploy.artifact import load_artifact, open_runner
from deploy.backends import backend_available, backend_names, create_runner
from deploy.build import run_build
from tests.deploy.test_backends import make_export_dir
from tests.deploy.test_int8_formats import make_calibrate_dir
from tests.logit_checks import assert_fp32_parity, assert_int8_tracks_fp32

BACKEND = "executorch-xnnpack"
HAS_EXECUTORCH = importlib.util.find_spec("executorch") is not None
requires_executorch = pytest.mark.skipif(
    not HAS_EXECUTORCH, reason="executorch is not installed (pip install 'cstar[executorch]')")
MAX_BATCH = 16  # the builds here: batch 1..16 (b1, b8 and the max are exercised)
N_EVAL = 200


def _ort(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def test_images(digits: DataBundle) -> tuple[np.ndarray, np.ndarray]:
    """A fixed slice of the digits TEST split (images, labels)."""
    images, labels = to_tensors(digits.test)
    return images.numpy()[:N_EVAL], labels.numpy()[:N_EVAL]


@pytest.fixture(scope="module")
def export_dir(robust_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from export.exporter import run_export

    out = tmp_path_factory.mktemp("et") / "export"
    run_export(robust_digits_dir, out, parity_samples=32, progress=False)
    return out


@pytest.fixture(scope="module")
def fp32_build(export_dir: Path) -> tuple[Path, dict[str, Any]]:
    if not HAS_EXECUTORCH:
        pytest.skip("executorch is not installed (pip install 'cstar[executorch]')")
    out = export_dir.parent / "build-fp32"
    return out, run_build(export_dir, BACKEND, out, batch_sizes=(1, MAX_BATCH), threads=1)


@pytest.fixture(scope="module")
def int8_calibrate(export_dir: Path) -> tuple[Path, dict[str, Any]]:
    if not HAS_EXECUTORCH:
        pytest.skip("executorch is not installed (pip install 'cstar[executorch]')")
    from calibration.calibrate import run_calibrate

    out = export_dir.parent / "calib-et"
    return out, run_calibrate(export_dir, out, data="digits", samples=128, parity_samples=100,
                              target="executorch", verbose=False)


def _xnnpack_calibrate_dir(directory: Path) -> Path:
    """A hand-made calibrate directory in the xnnpack-pt2e-int8 format (no executorch needed to refuse it)."""
    export = make_export_dir(directory / "export")
    out = directory / "calib-xnnpack"
    out.mkdir(parents=True)
    (out / "model.pte").write_bytes(b"not a real program")
    body = {k: v for k, v in read_manifest(export).items() if k not in ("schema_version", "stage", "onnx")}
    body.update({"artifact": {"file": "model.pte", "sha256": sha256_file(out / "model.pte")},
                 "precision": "int8", "quantization": {"format": "xnnpack-pt2e-int8", "target": "executorch"},
                 "inputs": [file_entry(export / "manifest.json")]})
    write_manifest(out, "calibrate", body)
    return out


# ------------------------------------------------------------------------------------- registry


def test_backend_missing_says_why(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Where executorch (or the torch its runtime links) is absent: a reason, and the extra to install."""
    real = importlib.util.find_spec
    assert BACKEND in backend_names()
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "executorch" else real(n, *a))
    ok, reason = backend_available(BACKEND)
    assert not ok and "executorch is not installed" in reason
    with pytest.raises(MissingDependencyError) as info:
        create_runner(BACKEND, tmp_path / "model.pte")
    assert info.value.package == "executorch" and "cstar[executorch]" in (info.value.hint or "")
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "torch" else real(n, *a))
    if HAS_EXECUTORCH:  # executorch present, torch (which its runtime links) absent: torch is what to install
        ok, reason = backend_available(BACKEND)
        assert not ok and "torch is not" in reason
        with pytest.raises(MissingDependencyError) as info:
            create_runner(BACKEND, tmp_path / "model.pte")
        assert info.value.package == "torch" and "cstar[executorch]" in (info.value.hint or "")


@requires_executorch
def test_backend_available_with_xnnpack() -> None:
    ok, reason = backend_available(BACKEND)
    assert ok and "XnnpackBackend" in reason


# ------------------------------------------------------------------------------------- format refusals


@pytest.mark.parametrize("backend", ["ort-cpu", "openvino-cpu", "tensorrt"])
def test_xnnpack_int8_refused_on_onnx_backends(tmp_path: Path, backend: str) -> None:
    calib = _xnnpack_calibrate_dir(tmp_path)
    with pytest.raises(CstarError, match="only executorch-xnnpack runs") as info:
        run_build(calib, backend, tmp_path / "build")
    assert "xnnpack-pt2e-int8" in info.value.message and BACKEND in (info.value.hint or "")
    assert not (tmp_path / "build").exists()


def test_qdq_onnx_refused_on_executorch(tmp_path: Path) -> None:
    calib = make_calibrate_dir(tmp_path, "ort-cpu")
    with pytest.raises(CstarError, match="not ONNX Q/DQ") as info:
        run_build(calib, BACKEND, tmp_path / "build")
    assert "u8s8-qdq" in info.value.message
    assert "cstar calibrate" in (info.value.hint or "") and "--target executorch" in (info.value.hint or "")
    assert not (tmp_path / "build").exists()


def test_onnx_dirs_and_pte_dirs_name_the_right_backend(tmp_path: Path) -> None:
    """An ONNX directory on executorch-xnnpack, or a .pte directory on ONNX Runtime: refused with the fix."""
    export = make_export_dir(tmp_path / "export")
    with pytest.raises(CstarError, match="holds an ONNX model") as info:
        open_runner(load_artifact(export), BACKEND)
    assert f"--backend {BACKEND}" in (info.value.hint or "")
    calib = make_calibrate_dir(tmp_path, "ort-cpu")
    with pytest.raises(CstarError, match="holds an ONNX model") as info:
        open_runner(load_artifact(calib), BACKEND)
    assert "--target executorch" in (info.value.hint or "")
    pte = _xnnpack_calibrate_dir(tmp_path / "x")
    artifact = load_artifact(pte)
    assert artifact.default_backend == BACKEND and artifact.model_path.name == "model.pte"
    with pytest.raises(CstarError, match="ExecuTorch program"):
        open_runner(artifact, "ort-cpu")


# ------------------------------------------------------------------------------------- FP32


@requires_executorch
def test_fp32_build_matches_onnx_and_torch(fp32_build: tuple[Path, dict[str, Any]], export_dir: Path,
                                          robust_digits_dir: Path,
                                          test_images: tuple[np.ndarray, np.ndarray]) -> None:
    import torch

    from export.executorch import deploy_model
    from export.reference import load_reference

    out, manifest = fp32_build
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "manifest.json", "model.pte"]
    build = json.loads((out / "build.json").read_text())
    assert build == manifest["build"] and manifest["precision"] == "fp32" and manifest["backend"] == BACKEND
    assert build["batch"] == {"min": 1, "opt": 8, "max": MAX_BATCH}
    assert build["input"]["shape"] == [None, 1, 16, 16]
    lowering = build["lowering"]
    assert lowering["dynamic_batch"] is True and lowering["batch"] == {"min": 1, "max": MAX_BATCH}
    assert lowering["delegation"]["delegated_fraction"] >= 0.9, lowering["delegation"]
    assert lowering["parity"]["passed"] and lowering["parity"]["against"] == "fp32-onnx"
    assert manifest["smoke"]["batch_sizes"] == [1, MAX_BATCH] and manifest["versions"]["executorch"]
    x, _ = test_images
    reference = _ort(export_dir / "model.onnx", x)
    atol = 1e-4 * max(1.0, float(np.abs(reference).max()))
    with open_runner(load_artifact(out)) as runner:
        assert runner.batch_range() == (1, MAX_BATCH)
        got = runner.predict(x)  # chunks of 16, the last one of 8
        single = np.concatenate([runner.infer(x[i : i + 1]) for i in range(8)])
        eight = runner.infer(x[:8])
        with pytest.raises(CstarError, match="outside the range"):
            runner.infer(np.zeros((MAX_BATCH + 1, 1, 16, 16), dtype=np.float32))
        info = runner.describe()
    assert_fp32_parity(reference, got, atol=atol)
    assert_fp32_parity(reference[:8], single, atol=atol)
    assert_fp32_parity(reference[:8], eight, atol=atol)
    model = deploy_model(load_reference(robust_digits_dir)[0], read_manifest(export_dir))
    with torch.no_grad():
        assert_fp32_parity(model(torch.from_numpy(x)).numpy(), got, atol=atol)
    assert info["threadpool_threads"] == 1 and info["dynamic_batch"] is True
    assert "XnnpackBackend" in info["registered_backends"]


@requires_executorch
def test_static_batch_program_pads(tmp_path: Path) -> None:
    """min == max lowers a static batch; predict pads a short chunk and splits a long one."""
    import torch
    from torch import nn

    from export.executorch import lower_fp32, write_pte

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    path = write_pte(lower_fp32(model, (1, 8, 8), 4, 4), tmp_path / "static.pte")
    x = np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)
    with create_runner(BACKEND, path) as runner:
        assert runner.input_spec.shape == (4, 1, 8, 8) and runner.batch_range() == (4, 4)
        got = runner.predict(x)
        with pytest.raises(CstarError, match="exactly 4"):
            runner.infer(x[:3])
    with torch.no_grad():
        assert_fp32_parity(model(torch.from_numpy(x)).numpy(), got, atol=1e-4)


# ------------------------------------------------------------------------------------- INT8


@requires_executorch
def test_int8_calibrate_manifest(int8_calibrate: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = int8_calibrate
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.pte"]
    quant = manifest["quantization"]
    assert quant["format"] == "xnnpack-pt2e-int8" and quant["target"] == "executorch"
    assert quant["weights"]["granularity"] == "per-channel" and quant["weights"]["symmetric"] is True
    assert manifest["artifact"] == {"file": "model.pte", "sha256": sha256_file(out / "model.pte"),
                                    "format": "pte", "backend": BACKEND}
    assert "onnx" not in manifest and manifest["precision"] == "int8"
    assert manifest["executorch"]["delegation"]["delegated_fraction"] >= 0.9
    metrics, parity = manifest["metrics"], manifest["parity"]
    assert metrics["n"] == parity["n"] == 100
    assert parity["runtime"] == parity["executed_as"] == metrics["executed_as"] == BACKEND  # on its own runtime
    # clean accuracy can only move on examples whose top-1 changed
    assert abs(metrics["clean_acc"] - metrics["fp32_clean_acc"]) <= 1.0 - parity["agreement"] + 1e-9
    assert abs(metrics["clean_acc"] - metrics["fp32_clean_acc"]) <= 0.05
    assert 0.0 <= metrics["robust_acc"] <= metrics["clean_acc"]
    assert load_artifact(out).default_backend == BACKEND


@requires_executorch
def test_int8_tracks_fp32_on_digits(int8_calibrate: tuple[Path, dict[str, Any]], export_dir: Path,
                                    test_images: tuple[np.ndarray, np.ndarray]) -> None:
    """INT8 .pte logits within a bound of the FP32 ONNX logits (relative to their spread), top-1 kept where
    the FP32 margin is large, clean accuracy close: bounds that hold on any x86 CPU."""
    out, _ = int8_calibrate
    x, labels = test_images
    fp32 = _ort(export_dir / "model.onnx", x)
    with create_runner(BACKEND, out / "model.pte", intra_op_threads=1) as runner:
        int8 = runner.predict(x)
        single = runner.infer(x[:1])
        eight = runner.infer(x[:8])
    # measured (AMD EPYC): RMS 0.012 x spread, max 0.056 x spread; accuracy 0.944 vs 0.947 (360 images)
    assert_int8_tracks_fp32(fp32, int8, max_rel_rms=0.06, confident_margin=0.5)
    assert abs(float(np.mean(int8.argmax(1) == labels)) - float(np.mean(fp32.argmax(1) == labels))) <= 0.03
    # a batch of one and of eight give the rows of the batch of sixteen (same kernels, per-row math)
    spread = float(fp32.std())
    assert float(np.abs(single - int8[:1]).max()) <= 0.05 * spread
    assert float(np.abs(eight - int8[:8]).max()) <= 0.05 * spread


@requires_executorch
def test_int8_build_verify_bench_predict_cli(int8_calibrate: tuple[Path, dict[str, Any]],
                                             robust_digits_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from cstar.cli import main
    from deploy.attackset import run_attackset

    calib, _ = int8_calibrate
    build = tmp_path / "build"
    assert main(["build", "--from", str(calib), "--backend", BACKEND, "--out", str(build), "--threads", "1",
                 "--max-batch", "8"]) == 0
    manifest = read_manifest(build)
    assert manifest["precision"] == "int8" and manifest["quantization"]["format"] == "xnnpack-pt2e-int8"
    assert manifest["build"]["batch"] == {"min": 1, "opt": 8, "max": 8}
    assert manifest["artifact"]["sha256"] == sha256_file(calib / "model.pte")
    with pytest.raises(CstarError, match="takes batches 1..64"):
        run_build(calib, BACKEND, tmp_path / "wide", batch_sizes=(1, 128))
    run_attackset(robust_digits_dir, "digits", tmp_path / "set", samples=60)
    # one flipped image of 60 is 1.7 points, more than the default 1-point clean gate: which images flip is the
    # CPU's kernels' (and the thread count's) to decide, so the chain is gated at 3 flips here
    assert main(["verify", "--artifact", str(build), "--set", str(tmp_path / "set"), "--square-queries", "10",
                 "--threads", "1", "--max-clean-drop", "5", "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    run, ref = report["metrics"]["runtime"], report["metrics"]["reference"]
    assert report["backend"] == BACKEND and report["passed"], report["failed_checks"]
    assert run["agreement"] >= 0.9 and abs(run["clean_acc"] - ref["clean_acc"]) <= 0.05
    assert main(["bench", "--artifact", str(build), "--batch-sizes", "1,8", "--iters", "3", "--warmup", "1",
                 "--threads", "1", "--out", str(tmp_path / "bench")]) == 0
    bench = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert bench["backend"] == BACKEND and [r["batch_size"] for r in bench["results"]] == [1, 8]
    assert all(r["p50_ms"] > 0 for r in bench["results"]) and bench["runtime_info"]["threadpool_threads"] == 1
    x = np.random.default_rng(9).random((3, 1, 16, 16), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    with create_runner(BACKEND, build / "model.pte") as runner:
        expected = runner.predict(x).argmax(1)
    capsys.readouterr()
    assert main(["predict", "--artifact", str(build), "--json", str(tmp_path / "x.npy")]) == 0
    rows = json.loads(capsys.readouterr().out)
    classes = manifest["classes"]
    assert [row["top"][0]["class"] for row in rows] == [classes[int(i)] for i in expected]
    # the calibrate directory itself runs on its backend without --backend
    assert main(["predict", "--artifact", str(calib), "--json", str(tmp_path / "x.npy")]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["top"][0]["class"] for row in rows] == [classes[int(i)] for i in expected]


@requires_executorch
def test_device_without_torch_names_the_extra(fp32_build: tuple[Path, dict[str, Any]],
                                              tmp_path: Path) -> None:
    """The ExecuTorch Python runtime needs torch: without it, predict says so (exit 2, no traceback)."""
    from tests.deploy.test_torch_free import run_cli_without_torch

    out, _ = fp32_build
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 16, 16), dtype=np.float32))
    proc = run_cli_without_torch([["predict", "--artifact", str(out), str(tmp_path / "x.npy")]], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CODES [2]" in proc.stdout, proc.stdout + proc.stderr
    assert "'torch' is required for the 'executorch-xnnpack' backend" in proc.stderr
    assert "pip install 'cstar[executorch]'" in proc.stderr and "Traceback" not in proc.stderr
