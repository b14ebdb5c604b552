"""`cstar pipeline --config examples/cifar10-cpu.toml --quick` end to end on a small CIFAR-10-layout image tree."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cstar.data import CIFAR10_CLASSES

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "cifar10-cpu.toml"


def write_cifar_tree(root: Path, train_per_class: int = 24, test_per_class: int = 10) -> Path:
    """train/<class>/*.png and test/<class>/*.png, 32x32 RGB: each class a colour plus noise (learnable)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    colours = rng.uniform(0.15, 0.85, size=(len(CIFAR10_CLASSES), 3))
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for index, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(colours[index] + rng.normal(0, 0.08, size=(32, 32, 3)), 0, 1)
                Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def test_cifar_config_runs_end_to_end_quick(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cstar.cli import main as cli_main

    tree = write_cifar_tree(tmp_path / "cifar")
    run = tmp_path / "run"
    code = cli_main(["pipeline", "--config", str(CONFIG), "--data", f"cifar10:{tree}", "--quick", "--out", str(run)])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    train = json.loads((run / "train" / "manifest.json").read_text())
    assert train["dataset"]["name"] == "cifar10" and train["dataset"]["input_shape"] == [3, 32, 32]
    assert train["config"]["epochs"] == 1 and train["config"]["method"] == "n-fgsm"
    assert abs(train["eps"] - 8 / 255) < 1e-9
    compress = json.loads((run / "compress" / "manifest.json").read_text())
    assert compress["compression"]["by"] == "latency" and compress["compression"]["target"] == 2.0
    assert compress["compression"]["latency_ratio"] >= 2.0  # predicted by the profile stage's table
    assert compress["config"]["train_method"] == "n-fgsm" and compress["config"]["finetune_epochs"] == 0
    text = (run / "report.md").read_text()
    assert text.startswith("# cstar pipeline report") and "## Verdict: gate" in text
    assert (run / "report.html").is_file() and (run / "deploy-ort-cpu").is_dir()
    for precision in ("fp32", "int8", "dense"):
        verify = json.loads((run / f"verify-{precision}-ort-cpu" / "report.json").read_text())
        runtime = verify["metrics"]["runtime"]
        assert runtime["square"]["queries"] == 50 and runtime["n"] == 50
        assert 0.0 <= runtime["worst_case_robust_acc"] <= runtime["clean_acc"] <= 1.0
