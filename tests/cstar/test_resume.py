"""Crash safety of `cstar train`: SIGKILL mid-epoch + --resume == an uninterrupted run; half-written
run directories are detected, never trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cstar.checkpoint import save_checkpoint
from cstar.cli import main as cli_main
from cstar.data import DataBundle
from cstar.errors import CstarError
from cstar.models import build_model
from cstar.train import STATE_NAME, TrainConfig, fit, read_state

REPO = Path(__file__).resolve().parents[2]
# 1293 training images / batch 16 = 81 steps per epoch; a checkpoint every 5 steps
ARGS = ["train", "--data", "digits", "--width", "4", "--epochs", "2", "--train-steps", "1", "--batch-size", "16",
        "--eval-suite", "apgd", "--eval-steps", "2", "--checkpoint-every", "5", "--device", "cpu"]


def _start(out: Path, *extra: str) -> subprocess.Popen[str]:
    # one thread: CPU kernels then reduce in a fixed order, so two runs are bit-identical
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "cstar", *ARGS, "--out", str(out), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-2000:] + stderr[-2000:]
    return stdout


def _state_step(path: Path) -> tuple[int, int] | None:
    """(epoch, step) of the state file, or None while there is none (it is replaced atomically)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (FileNotFoundError, EOFError, RuntimeError):
        return None
    return int(state["epoch"]), int(state["step"])


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    reference = _start(tmp_path / "ref")
    victim = _start(tmp_path / "run")
    state = tmp_path / "run" / ".state" / STATE_NAME
    deadline = time.monotonic() + 180
    seen: tuple[int, int] | None = None
    while time.monotonic() < deadline and victim.poll() is None:
        seen = _state_step(state)
        if seen is not None and seen[1] > 0:  # a mid-epoch checkpoint is on disk
            victim.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    victim.wait(timeout=60)
    assert victim.returncode == -signal.SIGKILL, f"the run ended before a mid-epoch checkpoint (last {seen})"
    assert not (tmp_path / "run" / "manifest.json").exists()
    killed_at = _state_step(state)
    assert killed_at is not None and killed_at[1] > 0, killed_at

    again = subprocess.run([sys.executable, "-m", "cstar", *ARGS, "--out", str(tmp_path / "run")], cwd=REPO,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "interrupted run" in again.stderr and "--resume" in again.stderr

    log = _finish(_start(tmp_path / "run", "--resume"))
    assert f"resuming at epoch {killed_at[0] + 1}, step {killed_at[1]}/81" in log
    _finish(reference)
    ref, run = _weights(tmp_path / "ref"), _weights(tmp_path / "run")
    assert ref.keys() == run.keys()
    for name in ref:
        assert torch.allclose(ref[name].double(), run[name].double(), rtol=0, atol=1e-5), name
    ref_manifest = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    run_manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert run_manifest["metrics"] == ref_manifest["metrics"]
    assert run_manifest["best_epoch"] == ref_manifest["best_epoch"]
    for a, b in zip(ref_manifest["history"], run_manifest["history"], strict=True):
        assert (a["loss"], a["val_clean"], a["val_robust"]) == pytest.approx((b["loss"], b["val_clean"],
                                                                              b["val_robust"]), abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["manifest.json", "model.safetensors"]


# ------------------------------------------------------------------------------- half-written dirs


def _finished_dir(out: Path, digits: DataBundle) -> Path:
    torch.manual_seed(0)
    model = build_model("small-resnet", digits.spec, width=4)
    save_checkpoint(out, model, "train", "small-resnet", {"width": 4}, digits.spec,
                    {"eps": 0.2, "norm": "linf", "metrics": {}, "config": {}})
    return out


def _cli(out: Path, *extra: str) -> list[str]:
    return ["train", "--data", "digits", "--width", "4", "--epochs", "1", "--out", str(out), *extra]


def test_weights_without_manifest_is_an_interrupted_run(digits: DataBundle, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = _finished_dir(tmp_path / "run", digits)
    (out / "manifest.json").unlink()  # killed between the weights and the manifest
    assert cli_main(_cli(out)) == 2
    err = capsys.readouterr().err
    assert "interrupted run" in err and "pass --resume" in err
    assert cli_main(_cli(out, "--resume")) == 2  # ... but nothing to resume from: start over
    err = capsys.readouterr().err
    assert "without a resume state" in err and f"delete {out}" in err


def test_manifest_with_mismatching_weights_is_corrupt(digits: DataBundle, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = _finished_dir(tmp_path / "run", digits)
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    for extra in ((), ("--resume",)):
        assert cli_main(_cli(out, *extra)) == 2
        err = capsys.readouterr().err
        assert "corrupt run directory" in err and "sha256" in err and f"delete {out}" in err


def test_resume_of_a_finished_run_changes_nothing(digits: DataBundle, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = _finished_dir(tmp_path / "run", digits)
    before = (out / "model.safetensors").read_bytes()
    assert cli_main(_cli(out, "--resume")) == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert (out / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_corrupt_state_file_is_refused(damage: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    (out / ".state").mkdir(parents=True)
    path = out / ".state" / STATE_NAME
    torch.save({"model": {"w": torch.zeros(1000)}, "epoch": 1}, path)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert cli_main(_cli(out, "--resume")) == 2
    err = capsys.readouterr().err
    assert "corrupt resume state" in err and "delete" in err
    assert cli_main(_cli(out)) == 2  # without --resume: an interrupted run, not a fresh directory
    assert "interrupted run" in capsys.readouterr().err
    with pytest.raises(CstarError, match="corrupt resume state"):
        read_state(path)


def test_resume_with_a_different_configuration_is_refused(digits: DataBundle, tmp_path: Path) -> None:
    from torch.utils.data import Subset

    train = Subset(digits.train, range(64))
    cfg: dict[str, Any] = {"epochs": 2, "batch_size": 32, "eps": 0.2, "train_steps": 1, "device": "cpu",
                           "checkpoint_every": 1}

    class Killed(RuntimeError):
        pass

    def crash(epoch: int, model: torch.nn.Module) -> None:
        raise Killed

    torch.manual_seed(0)
    with pytest.raises(Killed):
        fit(build_model("small-resnet", digits.spec, width=4), train, None, TrainConfig(**cfg), progress=False,
            state_dir=tmp_path, on_epoch_end=crash)
    assert _state_step(tmp_path / STATE_NAME) == (0, 1)  # the step-1 checkpoint; epoch 0 never finished
    with pytest.raises(CstarError, match=r"different configuration \(lr: 0.05 -> 0.1\)"):
        fit(build_model("small-resnet", digits.spec, width=4), train, None, TrainConfig(**{**cfg, "lr": 0.1}),
            progress=False, state_dir=tmp_path)
