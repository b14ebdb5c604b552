"""The verify report: where it is written, what report.json holds, and the one line the command prints.

The report directory is claimed through cstar.outdir in place, so verify never writes into an input's or
another stage's directory, and a set crafted into OUT/attackset (`--reference`) counts as the report's
own. `assemble_report` builds report.json's content (schema of deploy.report: the artifact, the set,
the threat model, thresholds, checks, metrics, warnings, hardware and versions); deploy.report writes
it with report.md and report.png. `summary_line` leads with the worst-case robust accuracy, the headline.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deploy.report import REPORT_SCHEMA_VERSION, device_versions, hardware_info
from deploy.verify.attack_set import AttackSet
from deploy.verify.options import Thresholds

if TYPE_CHECKING:
    from cstar.outdir import OutputDir
    from deploy.artifact import Artifact


def report_claim(out: str | Path, artifact_dir: str | Path, set_dir: str | Path | None,
                 force: bool) -> OutputDir:
    """The report directory's claim (cstar.outdir, in place): never an input's or another stage's directory.

    A set crafted into OUT/attackset (`--reference`) is the report's own, not an input to protect.
    """
    from cstar.outdir import OutputDir

    own = set_dir is not None and Path(out).resolve() in Path(set_dir).resolve().parents
    inputs = (artifact_dir,) if set_dir is None or own else (artifact_dir, set_dir)
    return OutputDir(Path(out), "verify", inputs, force=force, in_place=True,
                     own_files=("attackset", "report.md", "report.png"))


def assemble_report(artifact: Artifact, backend: str, attack_set: AttackSet, eps: float, norm: str,
                    thresholds: Thresholds, checks: list[dict[str, Any]], failed: list[str],
                    metrics: dict[str, Any], warnings: list[str], runner_info: dict[str, Any],
                    started: float) -> dict[str, Any]:
    """report.json's content for one verify run (`started`: its time.perf_counter() start)."""
    model_path = Path(artifact.model_path)
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "backend": backend,
        "artifact": {"path": str(Path(artifact.directory).resolve()), "sha256": artifact.sha256,
                     "model": model_path.name, "stage": artifact.stage, "precision": artifact.precision},
        "hardware": hardware_info(),
        "versions": device_versions(),
        "thresholds": thresholds.to_dict(),
        "passed": not failed,
        "failed_checks": failed,
        "checks": checks,
        "metrics": metrics,
        "warnings": warnings,
        "set": set_record(attack_set),
        "threat_model": {"artifact": {"eps": artifact.eps, "norm": artifact.norm},
                         "set": {"eps": attack_set.manifest.get("eps"), "norm": attack_set.manifest.get("norm")}},
        "eps": eps,
        "norm": norm,
        "runtime_info": runner_info,
        "seconds": round(time.perf_counter() - started, 3),
    }


def set_record(attack_set: AttackSet) -> dict[str, Any]:
    """The attack set as the report names it: path, sha256, size, threat model and attacks."""
    return {"path": str(attack_set.directory.resolve()), "sha256": attack_set.sha256, "n": attack_set.n,
            "eps": attack_set.manifest.get("eps"), "norm": attack_set.manifest.get("norm"),
            "attacks": attack_set.manifest.get("set", {}).get("attacks", {})}


def summary_line(report: dict[str, Any]) -> str:
    """One line: pass/fail, the worst-case robust accuracy (the headline), clean, then each attack as detail."""
    run = report["metrics"]["runtime"]
    square = (run.get("square") or {}).get("robust_acc")
    transfer = " ".join(f"{k}={v:.4f}" for k, v in sorted(run["transfer"].items()))
    sq = "-" if square is None else f"{square:.4f}"
    return (f"verify {report['backend']}: {'PASSED' if report['passed'] else 'FAILED'} "
            f"robust(worst case)={run['worst_case_robust_acc']:.4f} clean={run['clean_acc']:.4f} "
            f"| detail: {transfer} square={sq} agreement={run['agreement']:.4f}")
