"""Checkpoints: safe loading, exact round trip, corrupt or missing files are clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cstar.checkpoint import load_checkpoint
from cstar.cli import main as cli_main
from cstar.data import DataBundle, to_tensors
from cstar.errors import CstarError


def test_round_trip_logits_identical(robust_digits_dir: Path, digits: DataBundle) -> None:
    model, manifest = load_checkpoint(robust_digits_dir)
    again, _ = load_checkpoint(robust_digits_dir)
    x, _ = to_tensors(digits.test, limit=16)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
    assert manifest["params"] == sum(p.numel() for p in model.parameters())
    assert not model.training


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def test_corrupt_weights_are_detected(robust_digits_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(robust_digits_dir, tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CstarError, match="sha256"):
        load_checkpoint(ckpt)


def test_missing_directory_and_manifest(tmp_path: Path) -> None:
    with pytest.raises(CstarError):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CstarError, match="manifest"):
        load_checkpoint(tmp_path / "half")


def test_garbage_manifest(robust_digits_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(robust_digits_dir, tmp_path)
    (ckpt / "manifest.json").write_text("{not json")
    with pytest.raises(CstarError):
        load_checkpoint(ckpt)


def test_unknown_layer_type_is_a_clear_error(robust_digits_dir: Path, tmp_path: Path) -> None:
    ckpt = _copy(robust_digits_dir, tmp_path)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    first = next(iter(manifest["structure"]))
    manifest["structure"][first]["type"] = "quantum-conv"
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CstarError, match="quantum-conv"):
        load_checkpoint(ckpt)


def test_cli_reports_corrupt_checkpoint_without_traceback(robust_digits_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    ckpt = _copy(robust_digits_dir, tmp_path)
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    code = cli_main(["compress", "--from", str(ckpt), "--ratio", "4", "--out", str(tmp_path / "c")])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "manifest.json").exists()
