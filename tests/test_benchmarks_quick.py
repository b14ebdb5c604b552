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
