"""`cstar export`: standard-op graphs, parity on clean + PGD inputs, dynamic batch, clean failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from cstar.admm import rank_map
from cstar.checkpoint import load_checkpoint, save_checkpoint
from cstar.cli import main as cli_main
from cstar.errors import CstarError, GateFailure
from cstar.flops import count_params
from cstar.lowrank import LowRankConv2d
from cstar.manifest import read_manifest, sha256_file
from cstar.models import build_model
from export import onnx_export
from export.deploy_form import to_deploy
from export.exporter import run_export
from export.forms import CONVS_PER_FORM
from export.parity import ort_logits
from tests.export.helpers import factorize_all, random_factorize, randomize_batchnorms, synthetic_spec
from tests.logit_checks import assert_fp32_parity

# Every op a (factorized) cstar CNN may export to: nothing custom, nothing training-only.
STANDARD_OPS = {
    "Conv", "Relu", "Add", "Sub", "Div", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Gemm", "MatMul", "BatchNormalization", "Identity",
}


@pytest.fixture(scope="module")
def factorized_digits_dir(robust_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compress-stage directory: the robust digits model with every conv/linear factorized at half ranks."""
    dense, manifest = load_checkpoint(robust_digits_dir)
    model = factorize_all(dense)
    out = tmp_path_factory.mktemp("factorized_digits")
    from cstar.data import DatasetSpec

    body = {"eps": manifest["eps"], "norm": manifest["norm"], "metrics": manifest["metrics"],
            "ranks": rank_map(model), "compression": {"params_ratio": 0.5, "flops_ratio": 0.5}}
    save_checkpoint(out, model, "compress", "small-resnet", {"width": 8}, DatasetSpec.from_dict(manifest["dataset"]),
                    body)
    return out


@pytest.fixture(scope="module")
def dense_export(robust_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dense digits model exported through the CLI (default options)."""
    out = tmp_path_factory.mktemp("dense_export") / "onnx"
    assert cli_main(["export", "--from", str(robust_digits_dir), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def factorized_export(factorized_digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("factorized_export")
    run_export(factorized_digits_dir, out, progress=False)
    return out


def _assert_recorded_parity(parity: dict[str, Any], tol: float = 1e-4) -> None:
    """FP32 ONNX vs PyTorch as the manifest records it. max_abs_diff is the check; agreement may miss 1.0 by
    a near-tie (top-1 margin < 2 x max_abs_diff: PGD inputs sit on decision boundaries) that CPU rounding
    decides."""
    assert parity["max_abs_diff"] <= tol
    parts = [block for block in (parity.get("clean"), parity.get("adversarial")) if block is not None]
    for block, ties in [(part, 1) for part in parts] + [(parity, max(1, len(parts)))]:
        assert round((1.0 - block["agreement"]) * block["n"]) <= ties, block  # at most one near-tie per set


def _nodes(directory: Path) -> dict[str, int]:
    return onnx_export.op_counts(directory / "model.onnx")


def _assert_nothing_written(out: Path) -> None:
    assert not (out / "model.onnx").exists()
    assert not (out / "manifest.json").exists()
    assert not out.exists() or not any(p.name.startswith(".export-") for p in out.iterdir())


# ----------------------------------------------------------------------------------------- graphs


def test_factorized_graph_has_only_standard_ops(dense_export: Path, factorized_export: Path,
                                                factorized_digits_dir: Path) -> None:
    dense_nodes, factorized_nodes = _nodes(dense_export), _nodes(factorized_export)
    assert set(factorized_nodes) <= STANDARD_OPS, set(factorized_nodes) - STANDARD_OPS
    assert set(dense_nodes) <= STANDARD_OPS
    model, _ = load_checkpoint(factorized_digits_dir)
    n_factorized = sum(isinstance(m, LowRankConv2d) for m in model.modules())
    # small-resnet: stem + 3 blocks x 2 convs + 2 shortcut 1x1 convs; each exports in its fewest-MACs form:
    # at half ranks the 1-channel stem merges its input factor (2 convs), the 1x1 shortcuts go dense (1 conv)
    forms = {name: entry["form"] for name, entry in read_manifest(factorized_export)["deploy_forms"]["layers"].items()}
    assert dense_nodes["Conv"] == 9 and n_factorized == 9 == len(forms)
    assert sorted(forms.values()) == ["dense"] * 2 + ["merge-input"] + ["three-conv"] * 6
    assert factorized_nodes["Conv"] == sum(CONVS_PER_FORM[form] for form in forms.values()) == 22
    assert dense_nodes.get("Gemm", 0) + dense_nodes.get("MatMul", 0) == 1
    assert factorized_nodes.get("Gemm", 0) + factorized_nodes.get("MatMul", 0) == 2  # LowRankLinear -> 2
    assert "BatchNormalization" not in dense_nodes and "BatchNormalization" not in factorized_nodes  # all folded


def test_manifest_contract(factorized_export: Path, factorized_digits_dir: Path) -> None:
    manifest = read_manifest(factorized_export, ("export",))
    source = read_manifest(factorized_digits_dir)
    for key in ("schema_version", "stage", "inputs", "dataset", "model", "eps", "norm", "metrics", "params", "flops",
                "compression", "ranks", "parity", "onnx", "precision", "input", "classes", "versions"):
        assert key in manifest, key
    assert manifest["onnx"]["sha256"] == sha256_file(factorized_export / "model.onnx")
    assert [entry["sha256"] for entry in manifest["inputs"]] == [
        sha256_file(factorized_digits_dir / "manifest.json"), sha256_file(factorized_digits_dir / "model.safetensors")]
    assert manifest["onnx"]["opset"] == 20 and manifest["onnx"]["exporter"] == "dynamo"
    assert manifest["onnx"]["simplifier"] == "onnxslim" and manifest["onnx"]["dynamic_batch"] is True
    assert manifest["input"] == {"name": "input", "shape": [1, 16, 16], "batch": None, "dtype": "float32",
                                 "range": [0, 1]}
    assert manifest["precision"] == "fp32" and manifest["classes"] == [str(i) for i in range(10)]
    assert manifest["ranks"] == source["ranks"] and manifest["metrics"] == source["metrics"]
    model, _ = load_checkpoint(factorized_digits_dir)
    bn_features = sum(m.num_features for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    forms = {name: entry["form"] for name, entry in manifest["deploy_forms"]["layers"].items()}
    unmerged = to_deploy(model, dict.fromkeys(forms, "three-conv"))
    assert count_params(unmerged) == source["params"] - bn_features  # BN (scale, shift) -> one conv bias each
    assert manifest["params"] == count_params(to_deploy(model, forms))  # merged forms change the count
    layers = manifest["deploy_forms"]["layers"]  # MACs of 3 convs == MACs of the factorized layer; the rest save
    assert manifest["deploy_forms"]["chosen_by"] == "macs" and "table" not in manifest["deploy_forms"]
    assert all(entry["reason"] == "macs" and entry["macs"][entry["form"]] == min(entry["macs"].values())
               for entry in layers.values())
    saved = sum(entry["macs"]["three-conv"] - entry["macs"][entry["form"]] for entry in layers.values())
    assert saved > 0 and manifest["flops"] == source["flops"] - saved
    graph = onnx.load(str(factorized_export / "model.onnx"))
    assert graph.ir_version <= 10  # lowered to what opset 20 needs: older runtimes accept it
    assert [i.name for i in graph.graph.input] == ["input"] and [o.name for o in graph.graph.output] == ["logits"]
    assert not list(factorized_export.glob("*.data")) and len(list(factorized_export.iterdir())) == 2


# ----------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("which", ["dense", "factorized"])
def test_parity_clean_and_adversarial(which: str, dense_export: Path, factorized_export: Path) -> None:
    parity = read_manifest(dense_export if which == "dense" else factorized_export)["parity"]
    _assert_recorded_parity(parity)
    assert parity["clean"]["n"] == 256 and parity["adversarial"]["n"] == 256 and parity["n"] == 512
    assert parity["adversarial"]["attack"]["steps"] == 10 and parity["adversarial"]["attack"]["eps"] == 0.2


def test_dynamic_batch_runs_1_and_64(factorized_export: Path, factorized_digits_dir: Path) -> None:
    model, _ = load_checkpoint(factorized_digits_dir)
    x = np.random.default_rng(0).random((64, 1, 16, 16), dtype=np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(x)).numpy()
    for batch in (1, 64):
        logits = ort_logits(factorized_export / "model.onnx", x[:batch], batch_size=batch)
        assert logits.shape == (batch, 10)
        assert_fp32_parity(reference[:batch], logits, atol=1e-4)


def _corrupt_bias(path: Path) -> None:
    """Shift one float bias in an ONNX file by 0.01: a graph that no longer matches its model."""
    model = onnx.load(str(path))
    bias = next(t for t in model.graph.initializer if len(t.dims) == 1 and t.data_type == onnx.TensorProto.FLOAT)
    values = onnx.numpy_helper.to_array(bias) + 0.01
    bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("simplifier", ["onnxsim", "onnxslim", "none"])
def test_simplify_keeps_the_function(dense_export: Path, tmp_path: Path, simplifier: str) -> None:
    source = dense_export / "model.onnx"
    out = onnx_export.simplify(source, tmp_path / "s.onnx", simplifier)
    x = np.random.default_rng(0).random((8, 1, 16, 16), dtype=np.float32)
    assert_fp32_parity(ort_logits(source, x), ort_logits(out, x), atol=1e-5)
    assert onnx_export.op_counts(out)["Conv"] == 9


def test_static_batch_and_simplifier_fallback(robust_digits_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_export.simplify

    def corrupting(path_in: Path, path_out: Path, simplifier: str = "onnxslim") -> Path:
        real(path_in, path_out, simplifier)
        _corrupt_bias(Path(path_out))
        return Path(path_out)

    monkeypatch.setattr(onnx_export, "simplify", corrupting)
    manifest = run_export(robust_digits_dir, tmp_path, simplifier="onnxsim", static_batch=4, parity_samples=30,
                          progress=False)
    assert "onnxsim output failed parity" in manifest["simplifier_fallback"]["reason"]
    assert manifest["simplifier_fallback"]["requested"] == "onnxsim" and manifest["onnx"]["simplifier"] == "none"
    graph_input = onnx.load(str(tmp_path / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in graph_input.type.tensor_type.shape.dim] == [4, 1, 16, 16]
    assert manifest["onnx"]["static_batch"] == 4 and manifest["onnx"]["dynamic_batch"] is False
    assert manifest["input"]["batch"] == 4
    parity = manifest["parity"]
    assert parity["max_abs_diff"] <= 1e-4 and parity["clean"]["n"] == 30  # 30 = 7 x 4 + a padded chunk


def test_torchscript_fallback_is_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("dynamo cannot trace this")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    torch.manual_seed(0)
    model = randomize_batchnorms(build_model("small-resnet", synthetic_spec(1, 16), width=4)).eval()
    result = onnx_export.export_onnx(to_deploy(model), (1, 16, 16), tmp_path / "m.onnx")
    assert result.exporter == "torchscript" and "dynamo cannot trace this" in (result.fallback_reason or "")
    assert result.nodes["Conv"] == 9 and set(result.nodes) <= STANDARD_OPS
    x = np.random.default_rng(0).random((5, 1, 16, 16), dtype=np.float32)
    with torch.no_grad():
        assert_fp32_parity(model(torch.from_numpy(x)).numpy(), ort_logits(result.path, x), atol=1e-5)


# ----------------------------------------------------------------------------------------- errors


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CstarError, match="does not exist"):
        run_export(tmp_path / "nope", tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_corrupt_weights(robust_digits_dir: Path, tmp_path: Path) -> None:
    source = _copy(robust_digits_dir, tmp_path / "src")
    weights = source / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100:-90] = bytes(b ^ 0xFF for b in data[-100:-90])
    weights.write_bytes(bytes(data))
    with pytest.raises(CstarError, match="sha256"):
        run_export(source, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_unknown_layer_type(robust_digits_dir: Path, tmp_path: Path) -> None:
    source = _copy(robust_digits_dir, tmp_path / "src")
    manifest = json.loads((source / "manifest.json").read_text())
    manifest["structure"]["net.conv1"]["type"] = "quantum-conv"
    (source / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CstarError, match="unknown layer type 'quantum-conv'"):
        run_export(source, tmp_path / "out", progress=False)
    _assert_nothing_written(tmp_path / "out")


@pytest.mark.parametrize("opset", [13, 16, 99])
def test_bad_opset(robust_digits_dir: Path, tmp_path: Path, opset: int) -> None:
    with pytest.raises(CstarError, match="opset"):
        run_export(robust_digits_dir, tmp_path / "out", opset=opset, progress=False)
    _assert_nothing_written(tmp_path / "out")


def test_cli_help_and_exclusive_batch_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["export", "--help"])
    assert "--static-batch" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli_main(["export", "--from", "a", "--out", "b", "--dynamic-batch", "--static-batch", "2"])


def test_bad_opset_cli_exit_code(robust_digits_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["export", "--from", str(robust_digits_dir), "--out", str(tmp_path / "o"), "--opset", "13"]) == 2
    assert "opset 13 is too old" in capsys.readouterr().err


def test_parity_gate_failure_leaves_nothing(robust_digits_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    real = onnx_export.export_onnx

    def corrupting(*args: Any, **kwargs: Any) -> onnx_export.ExportResult:
        result = real(*args, **kwargs)
        _corrupt_bias(result.path)
        return result

    monkeypatch.setattr(onnx_export, "export_onnx", corrupting)
    out = tmp_path / "out"
    with pytest.raises(GateFailure, match="parity failed"):  # simplified graph fails, then the raw one too
        run_export(robust_digits_dir, out, parity_samples=10, progress=False)
    _assert_nothing_written(out)


def test_failed_reexport_keeps_previous_consistent(dense_export: Path, tmp_path: Path) -> None:
    out = _copy(dense_export, tmp_path / "prev")
    before = sha256_file(out / "model.onnx")
    with pytest.raises(CstarError):
        run_export(tmp_path / "missing", out, progress=False)
    assert sha256_file(out / "model.onnx") == before == read_manifest(out)["onnx"]["sha256"]


# ----------------------------------------------------------------------------------------- ResNet-50


@pytest.mark.slow
def test_factorized_tv_resnet50(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every factor is overwritten (from_factors, load_state_dict): skip the costly QR of orthogonal init.
    monkeypatch.setattr(torch.nn.init, "orthogonal_", lambda tensor, *args, **kwargs: tensor)
    spec = synthetic_spec(channels=3, size=32, classes=10)
    torch.manual_seed(0)
    model = random_factorize(randomize_batchnorms(build_model("tv-resnet50", spec)).eval())
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 10
    with torch.no_grad():  # random half-rank projections shrink activations: rescale logits to O(1)
        scale = 1.0 / float(model(images).std())
        model.net.fc.u.mul_(scale)
        model.net.fc.bias.mul_(scale)
        assert float(model(images).std()) == pytest.approx(1.0, rel=1e-3)
    save_checkpoint(tmp_path / "ckpt", model, "compress", "tv-resnet50", {}, spec,
                    {"eps": 4 / 255, "norm": "linf", "metrics": {}, "ranks": rank_map(model)})
    manifest: dict[str, Any] = run_export(tmp_path / "ckpt", tmp_path / "out", parity_samples=8,
                                          parity_data=(images, labels), progress=False)
    nodes = manifest["onnx"]["nodes"]
    assert set(nodes) <= STANDARD_OPS, set(nodes) - STANDARD_OPS
    forms = [entry["form"] for entry in manifest["deploy_forms"]["layers"].values()]
    assert len(forms) == 53  # resnet50: 53 convs (incl. 4 downsample), each in its fewest-MACs form
    assert nodes["Conv"] == sum(CONVS_PER_FORM[form] for form in forms)
    assert nodes["Gemm"] + nodes.get("MatMul", 0) == 2 and "BatchNormalization" not in nodes
    _assert_recorded_parity(manifest["parity"])
