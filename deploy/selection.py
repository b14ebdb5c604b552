"""Which artifact the pipeline deploys per runtime: the fastest precision whose verification passed.

A precision that is slower than another one that also passed is not shipped (INT8 Q/DQ on a tiny model
can be slower than FP32 on the same runtime), and one that failed its gate is never shipped, however fast.
The chosen build directory is copied to RUN_DIR/deploy-<backend>/ with a `deployment.json` saying why.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

from cstar.manifest import atomic_write_json

DEPLOYMENT_FILE = "deployment.json"


def _p50(artifact: dict[str, Any], batch: int) -> float:
    value = artifact.get(f"p50_b{batch}")
    return math.inf if value is None else float(value)


def _candidate(artifact: dict[str, Any], batch: int) -> dict[str, Any]:
    return {"precision": artifact["precision"], "build": artifact["path"], "passed": artifact["passed"],
            "failed_checks": list(artifact.get("failed_checks", [])), "p50_ms": artifact.get(f"p50_b{batch}"),
            "robust_acc": artifact.get("robust_acc"), "clean_acc": artifact.get("clean_acc")}


def _reason(chosen: dict[str, Any], passing: list[dict[str, Any]], failing: list[dict[str, Any]], batch: int) -> str:
    parts = []
    if len(passing) > 1:
        others = ", ".join(f"{a['precision']} {_ms(a, batch)}" for a in passing if a is not chosen)
        parts.append(f"fastest of the precisions that passed verification at batch {batch}: "
                     f"{chosen['precision']} {_ms(chosen, batch)} vs {others}")
    else:
        parts.append(f"the only precision that passed verification ({chosen['precision']} {_ms(chosen, batch)} "
                     f"at batch {batch})")
    for a in failing:
        parts.append(f"{a['precision']} failed its gate ({', '.join(a.get('failed_checks', [])) or 'gate'})")
    return "; ".join(parts)


def _ms(artifact: dict[str, Any], batch: int) -> str:
    value = artifact.get(f"p50_b{batch}")
    return "(no benchmark)" if value is None else f"{value:.3f} ms"


def select_deployments(artifacts: list[dict[str, Any]], batch: int) -> dict[str, dict[str, Any]]:
    """backend -> the deployment record: chosen precision, why, and every candidate with its gate and p50.

    `artifacts` are the pipeline summary's rows (verified compressed builds; dense rows are ignored).
    A backend where nothing passed gets `precision: None` and the reason.
    """
    deployments: dict[str, dict[str, Any]] = {}
    backends = list(dict.fromkeys(a["backend"] for a in artifacts if a["artifact"] != "dense"))
    for backend in backends:
        rows = [a for a in artifacts if a["backend"] == backend and a["artifact"] != "dense" and a["passed"] is not None]
        passing = sorted((a for a in rows if a["passed"]), key=lambda a: _p50(a, batch))
        failing = [a for a in rows if not a["passed"]]
        record: dict[str, Any] = {"backend": backend, "batch": batch, "path": f"deploy-{backend}",
                                  "candidates": [_candidate(a, batch) for a in rows]}
        if not passing:
            record.update(precision=None, build=None, reason="nothing deployed: no precision passed verification ("
                          + "; ".join(f"{a['precision']}: {', '.join(a['failed_checks']) or 'gate'}" for a in failing)
                          + ")")
        else:
            chosen = passing[0]
            record.update(precision=chosen["precision"], build=chosen["path"], p50_ms=chosen.get(f"p50_b{batch}"),
                          speedup_vs_dense=chosen["speedup_vs_dense"].get(str(batch)),
                          robust_acc=chosen.get("robust_acc"), clean_acc=chosen.get("clean_acc"),
                          reason=_reason(chosen, passing, failing, batch))
        deployments[backend] = record
    return deployments


def materialize(run_dir: Path, deployments: dict[str, dict[str, Any]]) -> list[Path]:
    """Copy each chosen build to RUN_DIR/deploy-<backend>/ (replaced atomically) with deployment.json.

    A backend with nothing deployed loses any stale deploy-<backend>/ from an earlier run.
    """
    written = []
    for backend, record in deployments.items():
        target = run_dir / record["path"]
        if record["build"] is None:
            shutil.rmtree(target, ignore_errors=True)
            continue
        staging = run_dir / f".{record['path']}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(run_dir / record["build"], staging)
        atomic_write_json(staging / DEPLOYMENT_FILE, {"backend": backend, **record})
        old = run_dir / f".{record['path']}.old"
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
        written.append(target)
    return written
