"""`cstar import`: weights made elsewhere become a train-stage directory that compress accepts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cstar.checkpoint import load_checkpoint
from cstar.cli import main as cli_main
from cstar.data import DataBundle, to_tensors

EVAL = ["--eval-suite", "apgd", "--eval-steps", "2", "--eval-limit", "60"]


def _foreign_checkpoint(robust_digits_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    """The fixture's weights as another code base saves them: DataParallel prefix, a training wrapper,
    no normalization layer, no `net.` prefix."""
    state = load_file(str(robust_digits_dir / "model.safetensors"))
    body = {f"module.{k[len('net.'):]}": v for k, v in state.items() if k.startswith("net.")}
    torch.save({"epoch": 7, "state_dict": body, "best_acc": 0.5}, path)
    return state


def test_import_maps_a_foreign_checkpoint_and_the_model_predicts_as_before(
        robust_digits_dir: Path, digits: DataBundle, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "foreign.pt"
    original = _foreign_checkpoint(robust_digits_dir, weights)
    before = weights.read_bytes()
    out = tmp_path / "imported"
    assert cli_main(["import", "--model", "small-resnet", "--width", "8", "--weights", str(weights),
                     "--data", "digits", *EVAL, "--out", str(out)]) == 0
    assert weights.read_bytes() == before  # the input is unchanged
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "train" and manifest["imported"]["file"] == "foreign.pt"
    assert manifest["imported"]["mapping"] == ["unwrapped 'state_dict'", "stripped 'module.'", "added 'net.'",
                                               "normalization: the dataset's"]
    assert manifest["metrics"]["n"] == 60 and manifest["metrics"]["attack"]["suite"] == "apgd"
    model, _ = load_checkpoint(out)
    reference, _ = load_checkpoint(robust_digits_dir)
    for key, tensor in original.items():
        assert torch.equal(model.state_dict()[key], tensor), key
    x, _ = to_tensors(digits.test, limit=50)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-6)
    assert "dataset's mean/std were used" in capsys.readouterr().err


def test_import_mean_std_fill_the_missing_normalization(robust_digits_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "foreign.pt"
    _foreign_checkpoint(robust_digits_dir, weights)
    out = tmp_path / "imported"
    assert cli_main(["import", "--model", "small-resnet", "--width", "8", "--weights", str(weights), "--data",
                     "digits", "--mean", "0.25", "--std", "0.5", *EVAL, "--out", str(out)]) == 0
    model, manifest = load_checkpoint(out)
    assert float(model.normalize.mean.flatten()[0]) == 0.25 and float(model.normalize.std.flatten()[0]) == 0.5
    assert manifest["imported"]["normalization"] == "--mean/--std"


class _Payload:
    def __reduce__(self) -> tuple:
        return (print, ("pickle code ran",))


@pytest.mark.parametrize("case,needle", [
    ("pickle", "weights_only"), ("suffix", "unknown weights format"), ("missing", "does not exist"),
    ("wrong-model", "does not fit"), ("object", "not a state dict"), ("mean-alone", "go together"),
])
def test_import_bad_input_is_one_clear_error_and_leaves_nothing(case: str, needle: str, robust_digits_dir: Path,
                                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "w.pt"
    extra: list[str] = []
    model = ["--model", "small-resnet", "--width", "8"]
    if case == "pickle":
        with open(weights, "wb") as handle:
            pickle.dump({"state_dict": _Payload()}, handle)
    elif case == "suffix":
        weights = tmp_path / "w.ckpt"
        weights.write_bytes(b"x")
    elif case == "missing":
        weights = tmp_path / "nope.pt"
    elif case == "wrong-model":
        _foreign_checkpoint(robust_digits_dir, weights)
        model = ["--model", "small-resnet", "--width", "16"]
    elif case == "object":
        torch.save([torch.zeros(2)], weights)
    elif case == "mean-alone":
        _foreign_checkpoint(robust_digits_dir, weights)
        extra = ["--mean", "0.5"]
    out = tmp_path / "out"
    assert cli_main(["import", *model, "--weights", str(weights), "--data", "digits", *extra, *EVAL,
                     "--out", str(out)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("error:") and needle in lines[0] and lines[1].strip().startswith("fix:")
    assert "Traceback" not in captured.err and "pickle code ran" not in captured.out
    assert not out.exists()


def test_compress_starts_from_an_imported_model(robust_digits_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / "own.safetensors"
    weights.write_bytes((robust_digits_dir / "model.safetensors").read_bytes())
    imported = tmp_path / "imported"
    assert cli_main(["import", "--model", "small-resnet", "--width", "8", "--weights", str(weights), "--data",
                     "digits", *EVAL, "--out", str(imported)]) == 0
    assert cli_main(["compress", "--from", str(imported), "--ratio", "2", "--by", "params", "--admm-epochs", "1",
                     "--finetune-epochs", "0", "--train-steps", "1", *EVAL, "--quiet", "--out",
                     str(tmp_path / "compressed")]) == 0
    manifest = json.loads((tmp_path / "compressed" / "manifest.json").read_text())
    assert manifest["stage"] == "compress" and manifest["compression"]["params_ratio"] >= 1.8
