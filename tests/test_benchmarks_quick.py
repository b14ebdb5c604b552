"""`benchmarks/run_all.py --quick` end to end: every result file is written and holds sane numbers."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ("compression_table", "deploy_speed", "training_overhead", "export_robustness")


def _accuracies(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every (path, value) whose key ends in '_acc', anywhere in a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key.endswith("_acc"):
                yield f"{path}.{key}", item
            yield from _accuracies(item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _accuracies(item, f"{path}[{index}]")


@pytest.mark.slow
def test_run_all_quick(tmp_path: Path) -> None:
    results = tmp_path / "results"
    command = [sys.executable, str(REPO / "benchmarks" / "run_all.py"), "--quick", "--work", str(tmp_path / "work"),
               "--results-dir", str(results)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in BENCHMARKS:
        payload = json.loads((results / f"{name}_digits.json").read_text())
        assert (results / f"{name}_digits.md").read_text().strip()
        assert payload["quick"] is True and payload["rows"]
        assert payload["machine"]["cpu_model"] and payload["versions"]["torch"]
        accuracies = [(where, v) for where, v in _accuracies(payload) if v is not None]
        if name == "training_overhead":
            assert all(row["epoch_seconds"] > 0 for row in payload["rows"])
            continue
        assert accuracies, f"{name}: no accuracies"
        for where, value in accuracies:
            assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, f"{name}{where} = {value!r}"
    run_all = json.loads((results / "run_all_digits.json").read_text())
    assert [r["script"] for r in run_all["runs"]] == list(BENCHMARKS)


def test_cifar10_gpu_plan_fits_the_budget() -> None:
    """The planned epochs, at the planned cost per epoch, stay inside the budget's training shares."""
    import argparse

    sys.path.insert(0, str(REPO))
    from benchmarks import cifar10_gpu

    args = argparse.Namespace(budget_seconds=360.0, dense_epochs=None, compress_epochs=None)
    plan = cifar10_gpu.plan_epochs({"epoch_seconds": 5.9}, args, n_methods=3, n_ratios=1)
    epoch = plan["estimated_epoch_seconds"]
    assert plan["dense_epochs"] * epoch <= cifar10_gpu.DENSE_SHARE * 360 + 1e-9
    compress = 3 * (plan["admm_epochs"] + plan["finetune_epochs"]) * epoch * cifar10_gpu.COMPRESS_SLOWDOWN
    assert compress <= cifar10_gpu.COMPRESS_SHARE * 360 + 1e-9
    assert plan["admm_epochs"] >= 1 and plan["finetune_epochs"] >= 1


def test_cifar10_image_tree_is_decoded_once(tmp_path: Path) -> None:
    """A benchmark loads the same JPEG tree many times: the decoded tensors are cached per process."""
    import numpy as np
    from PIL import Image

    from cstar.data import load_dataset

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("test", 2)):
        for label in range(10):
            folder = tmp_path / "cifar" / split / f"c{label}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    first = load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    second = load_dataset(f"cifar10:{tmp_path / 'cifar'}")
    assert len(first.train) == 30 and len(first.test) == 20
    assert first.train.images.data_ptr() == second.train.images.data_ptr()  # type: ignore[attr-defined]
    assert int(first.test.labels.sum()) == 2 * sum(range(10))  # type: ignore[attr-defined]


def test_seed_spread_paired_differences() -> None:
    """Paired differences are per seed (not difference of means), with the win count."""
    sys.path.insert(0, str(REPO))
    from benchmarks.seed_spread import paired_differences, parse_variant, summarize

    rows = [{"variant": v, "seed": s, "clean_acc": c, "robust_acc": r} for v, s, c, r in [
        ("cstar", 0, 0.90, 0.50), ("cstar", 1, 0.92, 0.40), ("prune", 0, 0.91, 0.45), ("prune", 1, 0.90, 0.44)]]
    diff = paired_differences(rows, "cstar", "prune")
    assert diff is not None and diff["wins"] == 1 and diff["pairs"] == 2
    assert abs(diff["robust"]["mean"] - 0.005) < 1e-12 and abs(diff["robust"]["min"] + 0.04) < 1e-12
    assert paired_differences(rows, "prune", "prune") is None
    stats = summarize([0.4, 0.5, 0.6])
    assert abs(stats["mean"] - 0.5) < 1e-12 and abs(stats["std"] - 0.1) < 1e-12
    assert parse_variant("cstar:rho=0.5+finetune_epochs=20") == (
        "cstar-rho0.5-finetune_epochs20", "cstar", {"rho": 0.5, "finetune_epochs": 20})


def test_finished_compress_run_with_another_config_is_not_reused(tmp_path: Path) -> None:
    """A run made with another configuration (here: before factor_decay existed, i.e. per-factor decay)
    is refused, not reused."""
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import compress_config_drift, run_or_reuse

    stored = {"ratio": 8.0, "method": "cstar", "seed": 0, "finetune_epochs": 35, "device": "cpu"}
    wanted = {"ratio": 8.0, "method": "cstar", "seed": 0, "finetune_epochs": 35, "device": "cuda",
              "factor_decay": "frobenius"}
    assert compress_config_drift(stored, wanted) == {"factor_decay": ("factors", "frobenius")}
    assert compress_config_drift(stored, {**wanted, "factor_decay": "factors"}) == {}  # device is ignored
    assert compress_config_drift(stored, {**wanted, "factor_decay": "factors", "seed": 1}) == {"seed": (0, 1)}
    pruned = {**stored, "method": "prune"}
    assert compress_config_drift(pruned, {**wanted, "method": "prune"}) == {}  # no factors: decay is moot
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps(
        {"schema_version": 1, "stage": "compress", "config": stored}))
    with pytest.raises(SystemExit, match="factor_decay='factors' there, 'frobenius' wanted"):
        run_or_reuse(tmp_path / "run", "compress", lambda: None, compress_config=wanted)


def test_stage_made_from_changed_inputs_is_not_reused(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.artifacts import changed_inputs, run_or_reuse
    from cstar.manifest import sha256_file

    source = tmp_path / "model.safetensors"
    source.write_bytes(b"v1")
    manifest = {"schema_version": 1, "stage": "export", "inputs": [{"path": str(source), "sha256": sha256_file(source)}]}
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "manifest.json").write_text(json.dumps(manifest))
    assert changed_inputs(manifest) == []
    assert run_or_reuse(tmp_path / "export", "export", lambda: None).reused
    source.write_bytes(b"v2")  # the source was made again
    assert changed_inputs(manifest) == [str(source)]
    with pytest.raises(SystemExit, match="inputs that have changed"):
        run_or_reuse(tmp_path / "export", "export", lambda: None)
