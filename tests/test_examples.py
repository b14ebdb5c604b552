"""examples/own_model.py: a network defined in the example itself, through the whole chain with the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_own_model_example_runs_the_chain_and_prints_the_results(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "own_model.py"), "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("fp32: verify ort-cpu: PASSED") for line in lines), done.stdout[-2000:]
    assert any(line.startswith("int8: verify ort-cpu: ") for line in lines)  # its gate is the CPU kernels' call
    assert any(line.startswith("bench ort-cpu: p50 b32") for line in lines)
    dense = json.loads((out / "dense" / "manifest.json").read_text())
    assert dense["model"] == {"name": "own_model:make_net", "options": {"width": 16}}
    assert dense["metrics"]["clean_acc"] >= 0.6  # learns digits at eps 0.1 (measured ~0.9 on this recipe)
    compressed = json.loads((out / "compressed" / "manifest.json").read_text())
    assert compressed["compression"]["latency_ratio"] >= 1.5 and compressed["compression"]["by"] == "latency"
    exported = json.loads((out / "onnx" / "manifest.json").read_text())
    assert exported["parity"]["passed"] and exported["parity"]["max_abs_diff"] <= 1e-4
    for precision in ("fp32", "int8"):
        runtime = json.loads((out / f"verify-{precision}" / "report.json").read_text())["metrics"]["runtime"]
        assert runtime["n"] == 150 and runtime["square"]["queries"] == 100
        assert 0.0 <= runtime["worst_case_robust_acc"] <= runtime["clean_acc"] <= 1.0
