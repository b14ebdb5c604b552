"""Bad input to every command: one `error:` line, one `  fix:` line, exit 2, no traceback, inputs unchanged,
nothing partial left (issue 26, "What failed" 3-6). Each case runs the CLI in-process and fails before any
training, export or runtime work starts, so the module stays cheap.

Stage directories come from the suite's fixtures: the tiny hand-written export of tests/deploy/test_backends.py
(torch-free) and the session's robust digits checkpoint (tests/conftest.py). Every case tampers a copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cstar.cli import main as cli_main
from cstar.errors import CstarError
from cstar.manifest import MANIFEST_NAME, sha256_file, write_manifest
from tests.deploy.test_backends import make_export_dir

TINY_CLASSES = ["class0", "class1", "class2"]


# ------------------------------------------------------------------------------------------ helpers


def snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 (or link target) of every file under `paths`: the inputs must read the same afterwards."""
    state: dict[str, str] = {}
    for root in paths:
        entries = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for entry in entries:
            if entry.is_symlink():
                state[str(entry)] = "link:" + os.readlink(entry)
            elif entry.is_file():
                state[str(entry)] = sha256_file(entry)
    return state


def expect_refusal(argv: list[str], inputs: list[Path], capsys: pytest.CaptureFixture[str],
                   out: Path | None = None, contains: str = "") -> str:
    """Run `cstar ARGV`; assert exit 2 with one error and one fix line, inputs unchanged, nothing left at `out`."""
    before = snapshot(inputs)
    siblings = sorted(p.name for p in out.parent.iterdir()) if out is not None and out.parent.exists() else None
    capsys.readouterr()
    code = cli_main(argv)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert code == 2, err
    assert "Traceback" not in err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert sum(line.startswith("  fix:") for line in lines) == 1, err
    assert contains in err, err
    assert snapshot(inputs) == before
    if out is not None:
        assert not out.exists() or not any(out.iterdir()), f"{out} holds {sorted(out.iterdir())}"
        after = sorted(p.name for p in out.parent.iterdir()) if out.parent.exists() else None
        assert after in (siblings, sorted({*(siblings or []), out.name})), (siblings, after)
    return err


def rewrite_manifest(directory: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a copied directory's manifest.json in place (the tampering under test)."""
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def make_tiny_set(directory: Path, eps: float = 0.1, norm: str = "linf", n: int = 12) -> Path:
    """An attackset directory for the tiny export (dataset 'tiny', 1x8x8, 3 classes), written by hand."""
    rng = np.random.default_rng(0)
    x = rng.random((n, 1, 8, 8), dtype=np.float32)
    adv = np.clip(x + rng.uniform(-0.1, 0.1, x.shape).astype(np.float32), 0, 1)
    logits = rng.normal(size=(n, 3)).astype(np.float32)
    arrays = {"x_clean": x, "labels": (np.arange(n) % 3).astype(np.int64), "indices": np.arange(n, dtype=np.int64),
              "adv_pgd": adv, "adv_fgsm": adv, "ref_logits_clean": logits, "ref_logits_pgd": logits,
              "ref_logits_fgsm": logits}
    directory.mkdir(parents=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    (directory / "attackset.npz").write_bytes(buffer.getvalue())
    write_manifest(directory, "attackset", {
        "dataset": {"name": "tiny", "input_shape": [1, 8, 8], "classes": TINY_CLASSES}, "model": {"name": "tiny"},
        "eps": eps, "norm": norm, "classes": TINY_CLASSES,
        "set": {"file": "attackset.npz", "sha256": sha256_file(directory / "attackset.npz"), "n": n,
                "attacks": {"pgd": {"eps": eps}, "fgsm": {"eps": eps}}},
    })
    return directory


def png_header(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming width x height (one row of data): a decompression bomb in a few bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path


def small_png(path: Path, value: int = 128) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared tiny export (never tampered: tests copy it)."""
    return make_export_dir(tmp_path_factory.mktemp("bad_inputs") / "export")


@pytest.fixture()
def export_copy(tiny_export: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_export, tmp_path / "export"))


@pytest.fixture()
def tiny_npy(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(3).random((2, 1, 8, 8), dtype=np.float32))
    return path


@pytest.fixture()
def train_copy(robust_digits_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(robust_digits_dir, tmp_path / "train"))


# ---------------------------------------------------------------------- 3. silently wrong results


@pytest.mark.parametrize("eps", ["nan", "inf", "5", "-0.1"])
def test_train_refuses_eps(eps: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    expect_refusal(["train", "--data", "digits", "--epochs", "1", "--eps", eps, "--out", str(out)], [], capsys, out,
                   "--eps")


@pytest.mark.parametrize("eps", ["nan", "5"])
def test_attackset_refuses_eps(eps: str, train_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "set"
    expect_refusal(["attackset", "--reference", str(train_copy), "--data", "digits", "--samples", "10", "--eps", eps,
                    "--out", str(out)], [train_copy], capsys, out, "--eps")


def test_attackset_at_another_eps_warns(train_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid eps other than the reference's is crafted, with a warning that verify will hold it to that eps."""
    from deploy.attackset import run_attackset

    manifest = run_attackset(train_copy, "digits", tmp_path / "set", samples=10, eps=0.25, steps=1)
    assert manifest["eps"] == 0.25
    assert "differs from the reference's eps 0.2" in capsys.readouterr().err


@pytest.mark.parametrize(("set_eps", "set_norm"), [(5.0, "linf"), (0.3, "linf"), (0.1, "l2")])
def test_verify_refuses_a_set_of_another_threat_model(set_eps: float, set_norm: str, export_copy: Path,
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The tiny export's threat model is Linf eps 0.1; a set crafted at another eps or norm is refused."""
    attack_set = make_tiny_set(tmp_path / "set", eps=set_eps, norm=set_norm)
    out = tmp_path / "report"
    err = expect_refusal(["verify", "--artifact", str(export_copy), "--set", str(attack_set), "--square-queries", "0",
                          "--out", str(out)], [export_copy, attack_set], capsys, out, "threat model")
    assert ("norm" if set_norm != "linf" else f"eps={set_eps:g}") in err


def test_verify_records_the_sets_threat_model(export_copy: Path, tmp_path: Path) -> None:
    """A matching set: the report names both threat models (the set's eps and norm beside the artifact's)."""
    from deploy.verify import run_verify

    report = run_verify(export_copy, make_tiny_set(tmp_path / "set", eps=0.1), tmp_path / "report",
                        square_queries=0, raise_on_fail=False)
    assert report["set"]["eps"] == 0.1 and report["set"]["norm"] == "linf"
    assert report["threat_model"] == {"artifact": {"eps": 0.1, "norm": "linf"}, "set": {"eps": 0.1, "norm": "linf"}}


def test_train_refuses_an_imagefolder_with_one_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "folder"
    for split in ("train", "test"):
        for i in range(3):
            small_png(root / split / "cat" / f"{i}.png", 40 * i)
    out = tmp_path / "run"
    expect_refusal(["train", "--data", f"imagefolder:{root}", "--image-size", "8", "--epochs", "1", "--out", str(out)],
                   [root], capsys, out, "at least two")


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"]])
def test_predict_refuses_a_class_list_that_does_not_match_the_outputs(names: list[str], tmp_path: Path,
                                                                       tiny_npy: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    artifact = make_export_dir(tmp_path / "export", classes=3, manifest_classes=names)
    expect_refusal(["predict", "--artifact", str(artifact), str(tiny_npy)], [artifact, tiny_npy], capsys,
                   contains="3 outputs")


# ------------------------------------------------------------------------------ 4. tracebacks


@pytest.mark.parametrize("version", ["1", None, 1.5, True, [1]])
@pytest.mark.parametrize("command", ["predict", "build"])
def test_schema_version_of_the_wrong_type(version: Any, command: str, export_copy: Path, tiny_npy: Path,
                                          tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rewrite_manifest(export_copy, lambda m: m.update(schema_version=version))
    out = tmp_path / "build"
    argv = (["predict", "--artifact", str(export_copy), str(tiny_npy)] if command == "predict" else
            ["build", "--from", str(export_copy), "--backend", "ort-cpu", "--out", str(out)])
    expect_refusal(argv, [export_copy, tiny_npy], capsys, out if command == "build" else None, "schema_version")


def test_predict_refuses_a_decompression_bomb(export_copy: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    bomb = png_header(tmp_path / "huge.png", 20000, 20000)
    expect_refusal(["predict", "--artifact", str(export_copy), str(bomb)], [export_copy, bomb], capsys,
                   contains="67,108,864 pixels")


def test_dataset_loading_refuses_a_decompression_bomb(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An image tree (CIFAR-10 layout, decoded before training) with one 20000 x 20000 PNG."""
    root = tmp_path / "cifar"
    for split in ("train", "test"):
        for label in range(10):
            small_png(root / split / f"c{label}" / "0.png", 20 * label)
    png_header(root / "train" / "c3" / "1.png", 20000, 20000)
    out = tmp_path / "run"
    expect_refusal(["train", "--data", f"cifar10:{root}", "--epochs", "1", "--out", str(out)], [root], capsys, out,
                   "pixels")


def test_imagefolder_item_refuses_a_decompression_bomb(tmp_path: Path) -> None:
    from cstar.data import ImageFolderDataset

    png_header(tmp_path / "train" / "a" / "0.png", 20000, 20000)
    dataset = ImageFolderDataset(tmp_path / "train", ["a"], 8, train=False, augment=False)
    with pytest.raises(CstarError, match="limit"):
        dataset[0]


@pytest.mark.parametrize("ratio", ["1", "0.5", "nan", "inf"])
def test_compress_refuses_a_ratio_that_compresses_nothing(ratio: str, train_copy: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compressed"
    expect_refusal(["compress", "--from", str(train_copy), "--ratio", ratio, "--out", str(out)], [train_copy], capsys,
                   out, "--ratio")


@pytest.mark.parametrize("command", ["train", "compress"])
@pytest.mark.parametrize("device", ["tpu", "cuda:x", "CPU"])
def test_unknown_device(command: str, device: str, train_copy: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    argv = (["train", "--data", "digits", "--epochs", "1"] if command == "train" else
            ["compress", "--from", str(train_copy), "--ratio", "2"])
    expect_refusal([*argv, "--device", device, "--out", str(out)], [train_copy], capsys, out, "--device")


def test_calibrate_refuses_an_onnx_whose_input_differs_from_its_manifest(
        export_copy: Path, digits: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The manifest says digits 1x16x16; the model (sha256 intact) takes 1x8x8."""
    def as_digits(manifest: dict[str, Any]) -> None:
        manifest["dataset"] = digits.spec.to_dict()
        manifest["input"]["shape"] = [1, 16, 16]
        manifest["classes"] = list(digits.spec.classes)

    rewrite_manifest(export_copy, as_digits)
    out = tmp_path / "int8"
    expect_refusal(["calibrate", "--from", str(export_copy), "--data", "digits", "--samples", "8", "--out", str(out)],
                   [export_copy], capsys, out, "1, 16, 16")


PIPELINE_CONFIGS = {
    "train = 5": ("train = 5\n", "[train]"),
    "backends string": ('[verify]\nbackends = "ort-cpu"\n', "backends"),
    "epochs string": ('[train]\nepochs = "two"\n', "epochs"),
    "eps nan": ("[train]\neps = nan\n", "eps"),
    "eps 5": ("[train]\neps = 5.0\n", "eps"),
    "ratio 1": ("[compress]\nratio = 1\n", "ratio"),
    "unknown backend": ('[verify]\nbackends = ["tpu"]\n', "backends"),
    "drop nan": ("[verify]\nmax_robust_drop = nan\n", "max_robust_drop"),
    "samples float": ("[calibrate]\nsamples = 2.5\n", "samples"),
    "bool for int": ("[bench]\niters = true\n", "iters"),
}


@pytest.mark.parametrize("case", sorted(PIPELINE_CONFIGS))
def test_pipeline_config_values_are_checked_before_any_stage(case: str, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    text, key = PIPELINE_CONFIGS[case]
    config = tmp_path / "bad.toml"
    config.write_text(text)
    out = tmp_path / "run"
    err = expect_refusal(["pipeline", "--config", str(config), "--out", str(out)], [config], capsys, out, key)
    error_line = next(line for line in err.splitlines() if line.startswith("error:"))
    assert key in error_line and str(config) in error_line  # the key and the file are named


# -------------------------------------------------------------------------------- 5. path traversal


def _point_model_at(export_copy: Path, tmp_path: Path, how: str) -> None:
    """Make the manifest's onnx.file name a file outside the directory (its sha256 recorded, so only the
    confinement can catch it)."""
    outside = tmp_path / "x" / "model.onnx"
    outside.parent.mkdir()
    shutil.copyfile(export_copy / "model.onnx", outside)
    if how == "symlink":
        (export_copy / "model.onnx").unlink()
        (export_copy / "model.onnx").symlink_to(outside)
        return
    if how == "etc-passwd":
        name, digest = "../../../../../../../../etc/passwd", sha256_file("/etc/passwd")
    else:
        name = "../x/model.onnx" if how == "dotdot" else str(outside)
        digest = sha256_file(outside)
    rewrite_manifest(export_copy, lambda m: m["onnx"].update(file=name, sha256=digest))


@pytest.mark.parametrize("how", ["dotdot", "absolute", "etc-passwd", "symlink"])
@pytest.mark.parametrize("command", ["build", "predict", "verify", "calibrate"])
def test_manifest_file_entries_stay_in_their_directory(how: str, command: str, export_copy: Path, tiny_npy: Path,
                                                       tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if how == "etc-passwd" and not Path("/etc/passwd").is_file():
        pytest.skip(reason="no /etc/passwd on this system")
    _point_model_at(export_copy, tmp_path, how)
    out = tmp_path / "out"
    inputs = [export_copy, tiny_npy, tmp_path / "x"]
    argv = {
        "build": ["build", "--from", str(export_copy), "--backend", "ort-cpu", "--out", str(out)],
        "predict": ["predict", "--artifact", str(export_copy), str(tiny_npy)],
        "verify": ["verify", "--artifact", str(export_copy), "--set", str(make_tiny_set(tmp_path / "set")),
                   "--square-queries", "0", "--out", str(out)],
        "calibrate": ["calibrate", "--from", str(export_copy), "--data", "digits", "--samples", "8",
                      "--out", str(out)],
    }[command]
    expect_refusal(argv, inputs, capsys, None if command == "predict" else out, "outside its directory")


def test_attack_set_file_entry_stays_in_its_directory(export_copy: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    attack_set = make_tiny_set(tmp_path / "set")
    shutil.move(attack_set / "attackset.npz", tmp_path / "elsewhere.npz")
    rewrite_manifest(attack_set, lambda m: m["set"].update(file="../elsewhere.npz"))
    out = tmp_path / "report"
    expect_refusal(["verify", "--artifact", str(export_copy), "--set", str(attack_set), "--out", str(out)],
                   [export_copy, attack_set, tmp_path / "elsewhere.npz"], capsys, out, "outside its directory")


def test_confined_file_accepts_plain_names(tmp_path: Path) -> None:
    from cstar.validate import confined_file

    (tmp_path / "sub").mkdir()
    assert confined_file(tmp_path, "model.onnx") == tmp_path / "model.onnx"
    assert confined_file(tmp_path, "sub/model.onnx") == tmp_path / "sub" / "model.onnx"
    for bad in ("", "..", "sub/../../x", "/abs", "C:\\x", "..\\x", 5, None):
        with pytest.raises(CstarError):
            confined_file(tmp_path, bad)


# ------------------------------------------------------------------------------------------- 6. weak


def test_predict_on_a_directory(export_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "images"
    small_png(folder / "a.png")
    expect_refusal(["predict", "--artifact", str(export_copy), str(folder)], [export_copy, folder], capsys,
                   contains="is a directory")


@pytest.mark.parametrize("shape", [(0, 1, 8, 8), (0,)])
def test_predict_on_an_empty_array(shape: tuple[int, ...], export_copy: Path, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros(shape, dtype=np.float32))
    expect_refusal(["predict", "--artifact", str(export_copy), str(empty)], [export_copy, empty], capsys)


@pytest.mark.parametrize(("flag", "value"), [("--max-robust-drop", "nan"), ("--max-robust-drop", "-1"),
                                             ("--max-clean-drop", "inf"), ("--min-agreement", "2"),
                                             ("--min-agreement", "nan")])
def test_verify_thresholds_are_bad_arguments_not_gate_failures(flag: str, value: str, export_copy: Path,
                                                               tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    attack_set = make_tiny_set(tmp_path / "set")
    out = tmp_path / "report"
    expect_refusal(["verify", "--artifact", str(export_copy), "--set", str(attack_set), "--square-queries", "0",
                    flag, value, "--out", str(out)], [export_copy, attack_set], capsys, out, flag)


def test_resume_without_a_state_says_it_starts_from_scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """`train --resume` on a fresh directory trains from scratch (documented), but says so first."""
    import cstar.train.stage

    def stop(*_: Any, **__: Any) -> Any:
        raise CstarError("stopped before training (test)", "none")

    monkeypatch.setattr(cstar.train.stage, "fit", stop)
    out = tmp_path / "run"
    assert cli_main(["train", "--data", "digits", "--width", "4", "--epochs", "1", "--resume", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"note: --resume: {out} holds no saved training state; starting from scratch" in err
    assert "stopped before training" in err


# ------------------------------------------------------------------------------ the Python API too


def test_python_api_shares_the_checks(tiny_export: Path, tmp_path: Path) -> None:
    """The same layer guards the functions the CLI calls."""
    from cstar import validate
    from cstar.compress import CompressConfig
    from cstar.train import TrainConfig
    from deploy.verify import Thresholds

    with pytest.raises(CstarError, match="finite"):
        TrainConfig(eps=float("nan")).validate()
    with pytest.raises(CstarError, match="device"):
        TrainConfig(device="tpu").validate()
    with pytest.raises(CstarError, match="--ratio"):
        CompressConfig(ratio=1.0).validate()
    with pytest.raises(CstarError, match="--min-agreement"):
        Thresholds(min_agreement=1.5)
    with pytest.raises(CstarError, match="at least two"):
        validate.classes(["only"], "dataset x")
    assert validate.eps(0.2, dataset="digits") == 0.2
    assert validate.ratio("--ratio", 1.01) == 1.01


def test_eps_above_the_usual_range_warns(capsys: pytest.CaptureFixture[str]) -> None:
    from cstar import validate

    assert validate.eps(0.6, dataset="digits") == 0.6
    assert "above the usual range for digits" in capsys.readouterr().err
    assert validate.eps(8 / 255, dataset="cifar10") == pytest.approx(8 / 255)
    assert validate.eps(0.1, dataset="cifar10") == 0.1
    assert "above the usual range for cifar10" in capsys.readouterr().err
    assert validate.eps(0.45, dataset="digits") == 0.45
    assert capsys.readouterr().err == ""


def test_config_types_name_the_key() -> None:
    from cstar.config import config_from_dict
    from deploy.pipeline import VerifySection

    with pytest.raises(CstarError, match=r"backends in \[verify\] must be a list of strings"):
        config_from_dict(VerifySection, {"backends": "ort-cpu"}, "[verify]")
    assert config_from_dict(VerifySection, {"backends": ["ort-cpu"], "max_robust_drop": 3}, "[verify]").backends == [
        "ort-cpu"]


def test_snapshot_sees_a_change(tmp_path: Path) -> None:
    """The `inputs unchanged` check can fail: one changed byte, a new file or a retargeted link shows."""
    (tmp_path / "a").write_bytes(b"a")
    (tmp_path / "link").symlink_to(tmp_path / "a")
    before = snapshot([tmp_path])
    (tmp_path / "a").write_bytes(b"b")
    assert snapshot([tmp_path]) != before
