"""Collect: read the stage directories of a finished run into a `PipelineSummary`.

Only the manifests, verify reports and bench results the stages wrote are read, so a summary can be
re-made from a run directory without re-running anything. The headline robust number of a runtime
artifact is the per-example worst case over every attack run (`worst_case_robust_acc` of its verify
report); of a PyTorch model, the worst case over its manifest's attack suite. The verdict is the gate
result over every verified compressed artifact; `deployed` is what ships per runtime (deploy.selection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.manifest import MANIFEST_NAME
from deploy.run_layout import ArtifactDir, parse_artifact_dir
from deploy.selection import select_deployments

ROBUST_NOTE = ("robust = per-example worst case: an image counts only if it survives every attack run on the runtime "
               "(transfer attacks crafted on the PyTorch reference, and the black-box Square attack against the runtime "
               "itself); PyTorch rows: the per-example worst case over the named white-box suite (APGD-CE, APGD-T; aa adds "
               "Square) on the test split")
SPEEDUP_NOTE = ("speedup = p50 latency of the dense FP32 export / p50 of the artifact, same backend and batch size, "
                "measured in one cstar bench run with the two interleaved (median of the per-round ratios)")


@dataclass
class PipelineSummary:
    """What the report shows: verdict, stage timings, model rows, deployed-artifact rows, ranks, plots."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    ranks: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    verdict: dict[str, Any] = field(default_factory=dict)
    deployed: dict[str, dict[str, Any]] = field(default_factory=dict)


def _read_json(path: Path) -> dict[str, Any] | None:
    """A stage's JSON file, or None when it is missing or unreadable (that stage did not run)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ------------------------------------------------------------------------------------------ models


def _attack_label(attack: dict[str, Any]) -> str:
    """'aa suite' / 'apgd suite (10 it)' from a metrics.attack suite block; 'PGD-20' from an older PGD block."""
    if "suite" in attack:
        iters = next((a["settings"].get("n_iter") for a in attack.get("attacks", []) if "n_iter" in a.get("settings", {})),
                     None)
        short = f" ({iters} it)" if attack.get("iterations_overridden") and iters else ""
        queries = next((a["settings"].get("n_queries") for a in attack.get("attacks", [])
                        if a.get("name") == "square"), None)
        if queries is not None and queries != 5000:
            short += f", Square {queries} q"
        return f"{attack['suite']} suite{short}"
    name = str(attack.get("name") or "pgd").upper()
    return f"{name}-{attack['steps']}" if attack.get("steps") else name


def _suite_attacks(attack: dict[str, Any]) -> list[str]:
    """The attacks behind a PyTorch row's worst case (['PGD-20'] for an older PGD-only manifest)."""
    names = [str(a.get("name")) for a in attack.get("attacks", [])]
    return names or [_attack_label(attack)]


def _model_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Dense and compressed PyTorch models: clean accuracy, the suite's worst case and PGD-20 (test split)."""
    rows = []
    for key, title in (("train", "dense (PyTorch)"), ("compress", "compressed (PyTorch)")):
        manifest = _read_json(run_dir / key / MANIFEST_NAME)
        if manifest is None:
            continue
        metrics = manifest.get("metrics", {})
        ratio = manifest.get("compression", {})
        rows.append({
            "model": title,
            "params": manifest.get("params"),
            "flops": manifest.get("flops"),
            "params_ratio": ratio.get("params_ratio", 1.0 if key == "train" else None),
            "flops_ratio": ratio.get("flops_ratio", 1.0 if key == "train" else None),
            "clean_acc": metrics.get("clean_acc"),
            "robust_acc": metrics.get("robust_acc"),
            "attack": metrics.get("attack", {}),
            "robust_label": _attack_label(metrics.get("attack", {})),
            "robust_attacks": _suite_attacks(metrics.get("attack", {})),
            "pgd20_robust_acc": metrics.get("pgd20_robust_acc"),
            "warnings": list(metrics.get("attack", {}).get("warnings", [])),
        })
    return rows


# ------------------------------------------------------------------------------------------ artifacts


def _bench_p50(bench: dict[str, Any] | None, batch: int) -> float | None:
    """p50 latency in ms for one batch size from a bench result (tolerant of layout)."""
    if not bench:
        return None
    for row in bench.get("results", []):
        if int(row.get("batch_size", -1)) == batch:
            return row.get("p50_ms")
    return None


def speedup(dense_p50: float | None, p50: float | None) -> float | None:
    """Dense p50 / artifact p50 (both on the same backend and batch size); None when either is missing."""
    if not dense_p50 or not p50:
        return None
    return float(dense_p50) / float(p50)


def _attacks_run(runtime: dict[str, Any]) -> list[str]:
    """Names of the attacks behind a runtime's worst case: every transfer attack, then square if it ran."""
    return [*sorted(runtime.get("transfer", {})), *(["square"] if runtime.get("square") else [])]


def _artifact_dirs(run_dir: Path) -> list[Path]:
    """The verify-* directories (verify-dense-* last), then bench-dense-* ones that no verify run sits beside."""
    verified = sorted(run_dir.glob("verify-*"), key=lambda d: (d.name.startswith("verify-dense-"), d.name))
    benched_dense = [d for d in sorted(run_dir.glob("bench-dense-*"))
                     if not (run_dir / d.name.replace("bench-", "verify-", 1)).is_dir()]
    return verified + benched_dense


def _artifact_row(run_dir: Path, directory: Path, batch_sizes: list[int]) -> dict[str, Any]:
    """One artifact: its verify report's accuracies and gate, its build's size, its p50s and speedups."""
    parts = parse_artifact_dir(directory.name)
    precision, backend = parts.precision, parts.backend  # e.g. verify-fp32-ort-cpu
    report = _read_json(directory / "report.json") if directory.name.startswith("verify") else None
    bench = _read_json(parts.sibling("bench").path(run_dir) / "bench.json")
    dense_bench = _read_json(ArtifactDir("bench", "dense", backend).path(run_dir) / "bench.json")
    runtime = (report or {}).get("metrics", {}).get("runtime", {})
    build = _read_json(parts.sibling("build").path(run_dir) / MANIFEST_NAME) or {}
    square = runtime.get("square") or {}
    worst = runtime.get("worst_case_robust_acc")
    row: dict[str, Any] = {
        "artifact": "dense" if precision == "dense" else f"compressed {precision}",
        "precision": "fp32" if precision == "dense" else precision,
        "backend": backend,
        "path": parts.sibling("build").name,
        "params": build.get("params"),
        "flops": build.get("flops"),
        "clean_acc": runtime.get("clean_acc"),
        "robust_acc": worst,
        "robust_attacks": _attacks_run(runtime),
        "robust_n": runtime.get("worst_case_n", runtime.get("n")),
        "agreement": runtime.get("agreement"),
        "transfer": runtime.get("transfer", {}),
        "square": square.get("robust_acc"),
        "square_queries": square.get("queries"),
        "worst_case": worst,
        "passed": None if report is None else report.get("passed"),
        "failed_checks": [] if report is None else report.get("failed_checks", []),
        "warnings": [] if report is None else list(report.get("warnings", [])),
        "speedup_vs_dense": {},
    }
    for batch in batch_sizes:
        row[f"p50_b{batch}"] = _bench_p50(bench, batch)
        interleaved = ((bench or {}).get("compare") or {}).get("speedup_p50", {}).get(str(batch))
        row["speedup_vs_dense"][str(batch)] = (interleaved if interleaved is not None else
                                               speedup(_bench_p50(dense_bench, batch), row[f"p50_b{batch}"]))
    return row


def _add_robust_vs_dense(rows: list[dict[str, Any]]) -> None:
    """Each compressed row's worst-case robust accuracy minus the dense model's on the same runtime."""
    dense = {r["backend"]: r["robust_acc"] for r in rows if r["artifact"] == "dense" and r["robust_acc"] is not None}
    for row in rows:
        reference = dense.get(row["backend"])
        row["robust_vs_dense"] = (None if row["artifact"] == "dense" or reference is None or row["robust_acc"] is None
                                  else row["robust_acc"] - reference)


def _artifact_rows(run_dir: Path, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Verified artifacts (verify-*) and the dense reference benchmarks (bench-dense-*), with speedups."""
    rows = [_artifact_row(run_dir, directory, batch_sizes) for directory in _artifact_dirs(run_dir)]
    _add_robust_vs_dense(rows)
    return rows


# ------------------------------------------------------------------------------------------ summary


def make_verdict(artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall gate result over every verified compressed artifact (dense is the reference, not shipped)."""
    verified = [a for a in artifacts if a["passed"] is not None and a["artifact"] != "dense"]
    failed = [f"{a['artifact']} on {a['backend']}" for a in verified if not a["passed"]]
    return {"passed": (not failed) if verified else None, "verified": len(verified), "failed": failed}


def collect_summary(run_dir: Path, config: Any, stages: list[Any]) -> PipelineSummary:
    """Everything the report shows except the plots: rows, ranks, verdict and the deployment per runtime."""
    batch_sizes = list(getattr(getattr(config, "bench", None), "batch_sizes", [1, 64]))
    summary = PipelineSummary(
        stages=[{"key": s.key, "title": s.title, "status": s.status, "seconds": s.seconds, "message": s.message}
                for s in stages],
        models=_model_rows(run_dir),
        artifacts=_artifact_rows(run_dir, batch_sizes),
        ranks=(_read_json(run_dir / "compress" / MANIFEST_NAME) or {}).get("ranks", {}),
        batch_sizes=batch_sizes,
    )
    summary.verdict = make_verdict(summary.artifacts)
    select_batch = getattr(getattr(config, "bench", None), "select_batch", None) or (batch_sizes or [1])[0]
    summary.deployed = select_deployments(summary.artifacts, select_batch)
    return summary
