"""The pipeline ships, per runtime, the fastest precision whose verification passed, and says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.selection import DEPLOYMENT_FILE, materialize, select_deployments


def _row(precision: str, backend: str, passed: bool | None, p50: float | None, checks: tuple[str, ...] = ()
         ) -> dict[str, Any]:
    return {"artifact": "dense" if precision == "dense" else f"compressed {precision}",
            "precision": "fp32" if precision == "dense" else precision, "backend": backend,
            "path": f"build-{precision}-{backend}", "passed": passed, "failed_checks": list(checks),
            "p50_b1": p50, "speedup_vs_dense": {"1": None if p50 is None else 0.1 / p50}, "robust_acc": 0.3,
            "clean_acc": 0.9}


def test_the_faster_passing_precision_is_chosen_even_when_it_is_fp32() -> None:
    rows = [_row("fp32", "ort-cpu", True, 0.067), _row("int8", "ort-cpu", True, 0.084),
            _row("dense", "ort-cpu", None, 0.064)]
    chosen = select_deployments(rows, batch=1)["ort-cpu"]
    assert chosen["precision"] == "fp32" and chosen["build"] == "build-fp32-ort-cpu"
    assert "fastest" in chosen["reason"] and "0.067 ms vs int8 0.084 ms" in chosen["reason"]
    assert abs(chosen["speedup_vs_dense"] - 0.1 / 0.067) < 1e-12
    assert [c["precision"] for c in chosen["candidates"]] == ["fp32", "int8"]


def test_a_failed_gate_is_never_shipped_however_fast() -> None:
    rows = [_row("fp32", "openvino-cpu", True, 0.05), _row("int8", "openvino-cpu", False, 0.01, ("robust_drop",))]
    chosen = select_deployments(rows, batch=1)["openvino-cpu"]
    assert chosen["precision"] == "fp32"
    assert "only precision that passed" in chosen["reason"] and "int8 failed its gate (robust_drop)" in chosen["reason"]


def test_nothing_passes_nothing_ships(tmp_path: Path) -> None:
    rows = [_row("fp32", "ort-cpu", False, 0.05, ("clean_drop",)), _row("int8", "ort-cpu", False, 0.04, ("agreement",))]
    deployments = select_deployments(rows, batch=1)
    assert deployments["ort-cpu"]["precision"] is None and "clean_drop" in deployments["ort-cpu"]["reason"]
    stale = tmp_path / "deploy-ort-cpu"
    stale.mkdir()
    materialize(tmp_path, deployments)
    assert not stale.exists()


def test_materialize_copies_the_build_and_replaces_an_old_deployment(tmp_path: Path) -> None:
    for precision in ("fp32", "int8"):
        build = tmp_path / f"build-{precision}-ort-cpu"
        build.mkdir()
        (build / "model.onnx").write_bytes(precision.encode())
    rows = [_row("fp32", "ort-cpu", True, 0.2), _row("int8", "ort-cpu", True, 0.1)]
    materialize(tmp_path, select_deployments(rows, batch=1))
    assert (tmp_path / "deploy-ort-cpu" / "model.onnx").read_bytes() == b"int8"
    rows[1]["passed"] = False
    materialize(tmp_path, select_deployments(rows, batch=1))
    deployed = tmp_path / "deploy-ort-cpu"
    assert (deployed / "model.onnx").read_bytes() == b"fp32"
    assert json.loads((deployed / DEPLOYMENT_FILE).read_text())["precision"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
