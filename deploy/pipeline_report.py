"""RUN_DIR/report.md + report.html for `cstar pipeline`: every stage, side by side.

Reads only the manifests, verify reports and bench results the stages wrote, so the report can be
re-made from a finished run directory without re-running anything.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.manifest import MANIFEST_NAME, atomic_write_json, atomic_write_text


@dataclass
class PipelineSummary:
    """What the report shows: stage timings, model rows, deployed-artifact rows, ranks, plots."""

    stages: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    ranks: dict[str, Any] = field(default_factory=dict)
    plots: list[str] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * float(value):.1f}"


def _model_rows(run_dir: Path) -> list[dict[str, Any]]:
    rows = []
    dense = _read_json(run_dir / "train" / MANIFEST_NAME)
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
        })
    if dense is None:
        return rows
    return rows


def _bench_p50(bench: dict[str, Any] | None, batch: int) -> float | None:
    """p50 latency in ms for one batch size from a bench result (tolerant of layout)."""
    if not bench:
        return None
    for row in bench.get("results", []):
        if int(row.get("batch_size", -1)) == batch:
            return row.get("p50_ms")
    return None


def _artifact_rows(run_dir: Path, batch_sizes: list[int]) -> list[dict[str, Any]]:
    rows = []
    for verify_dir in sorted(run_dir.glob("verify-*")) + sorted(run_dir.glob("bench-dense-*")):
        kind = verify_dir.name.split("-", 1)[1]  # e.g. fp32-ort-cpu
        precision, backend = kind.split("-", 1)
        report = _read_json(verify_dir / "report.json") if verify_dir.name.startswith("verify") else None
        bench = _read_json(run_dir / f"bench-{kind}" / "bench.json")
        runtime = (report or {}).get("metrics", {}).get("runtime", {})
        build = _read_json(run_dir / f"build-{kind}" / MANIFEST_NAME) or {}
        row = {
            "artifact": "dense" if precision == "dense" else f"compressed {precision}",
            "backend": backend,
            "params": build.get("params"),
            "flops": build.get("flops"),
            "clean_acc": runtime.get("clean_acc"),
            "agreement": runtime.get("agreement"),
            "transfer": runtime.get("transfer", {}),
            "square": runtime.get("square", {}).get("robust_acc") if runtime.get("square") else None,
            "worst_case": runtime.get("worst_case_robust_acc"),
            "passed": None if report is None else report.get("passed"),
            "failed_checks": [] if report is None else report.get("failed_checks", []),
            "warnings": [] if report is None else list(report.get("warnings", [])),
        }
        for batch in batch_sizes:
            row[f"p50_b{batch}"] = _bench_p50(bench, batch)
        rows.append(row)
    return rows


def _plots(run_dir: Path, summary: PipelineSummary, batch_sizes: list[int]) -> list[str]:
    """Accuracy, latency and rank plots as PNG files beside the report (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    verified = [r for r in summary.artifacts if r["clean_acc"] is not None]
    if verified:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{r['artifact']}\n{r['backend']}" for r in verified]
        series = {"clean": [r["clean_acc"] for r in verified],
                  "transfer (worst PGD)": [min(r["transfer"].values()) if r["transfer"] else 0 for r in verified],
                  "square": [r["square"] or 0 for r in verified],
                  "worst case": [r["worst_case"] or 0 for r in verified]}
        width = 0.8 / len(series)
        for offset, (name, values) in enumerate(series.items()):
            ax.bar([i + offset * width for i in range(len(verified))], values, width, label=name)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(verified))], labels, fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy on the runtime")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(run_dir / "accuracy.png", dpi=120)
        plt.close(fig)
        made.append("accuracy.png")
    timed = [r for r in summary.artifacts if any(r.get(f"p50_b{b}") for b in batch_sizes)]
    if timed:
        fig, axes = plt.subplots(1, len(batch_sizes), figsize=(3 * len(batch_sizes), 3))
        axes = axes if len(batch_sizes) > 1 else [axes]
        for ax, batch in zip(axes, batch_sizes, strict=True):
            ax.bar([f"{r['artifact']}" for r in timed], [r.get(f"p50_b{batch}") or 0 for r in timed])
            ax.set_title(f"p50 latency, batch {batch}", fontsize=9)
            ax.set_ylabel("ms")
            ax.tick_params(axis="x", labelsize=7, rotation=20)
        fig.tight_layout()
        fig.savefig(run_dir / "latency.png", dpi=120)
        plt.close(fig)
        made.append("latency.png")
    factorized = {k: v for k, v in summary.ranks.items() if v.get("kind") in ("tucker2", "svd", "pruned")}
    if factorized:
        fig, ax = plt.subplots(figsize=(7, 3))
        names = list(factorized)
        kept = [_rank_fraction(factorized[n]) for n in names]
        ax.bar(range(len(names)), kept)
        ax.set_xticks(range(len(names)), [n.replace("net.", "") for n in names], rotation=70, fontsize=6)
        ax.set_ylabel("kept rank / full rank")
        ax.set_title("global rank allocation per layer", fontsize=9)
        fig.tight_layout()
        fig.savefig(run_dir / "ranks.png", dpi=120)
        plt.close(fig)
        made.append("ranks.png")
    return made


def _rank_fraction(entry: dict[str, Any]) -> float:
    ranks = entry.get("ranks") or []
    shape = entry.get("shape") or []
    ranks = ranks if isinstance(ranks, list) else [ranks]
    if not ranks or len(shape) < 2:
        return 0.0
    full = [shape[0], shape[1]][: len(ranks)]
    return sum(r / f for r, f in zip(ranks, full, strict=False)) / len(ranks)


def _table_md(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _tables(summary: PipelineSummary, batch_sizes: list[int]) -> list[tuple[str, list[str], list[list[str]]]]:
    stage_rows = [[s["key"], s["title"], s["status"], f"{s['seconds']:.1f}", s.get("message", "")] for s in summary.stages]
    model_rows = [[m["model"], _fmt(m["params"]), _fmt(m["flops"]), _fmt(m["params_ratio"], 2),
                   _fmt(m["flops_ratio"], 2), _pct(m["clean_acc"]), _pct(m["robust_acc"])] for m in summary.models]
    artifact_rows = [
        [a["artifact"], a["backend"], _pct(a["clean_acc"]), _fmt(a["agreement"]),
         ", ".join(f"{k} {_pct(v)}" for k, v in a["transfer"].items()) or "-", _pct(a["square"]), _pct(a["worst_case"]),
         *[_fmt(a.get(f"p50_b{b}"), 2) for b in batch_sizes],
         "-" if a["passed"] is None else ("pass" if a["passed"] else "FAIL " + ",".join(a["failed_checks"]))]
        for a in summary.artifacts
    ]
    rank_rows = [[name, str(v.get("kind")), str(v.get("ranks")), str(v.get("shape"))] for name, v in summary.ranks.items()]
    warning_rows = [[f"{a['artifact']} @{a['backend']}", w] for a in summary.artifacts for w in a.get("warnings", [])]
    warnings = [("Warnings from verification", ["artifact", "warning"], warning_rows)] if warning_rows else []
    return [
        ("Stages", ["stage", "what", "status", "seconds", "note"], stage_rows),
        ("Models (PyTorch, test split; robust = PGD-20 at the training eps)",
         ["model", "params", "MACs", "params ratio", "MACs ratio", "clean %", "robust %"], model_rows),
        ("Deployed artifacts, re-checked on the runtime",
         ["artifact", "backend", "clean %", "agreement", "transfer robust %", "Square robust %", "worst case %",
          *[f"p50 ms (b{b})" for b in batch_sizes], "gate"], artifact_rows),
        *warnings,
        ("Ranks per layer", ["layer", "kind", "ranks", "shape"], rank_rows),
    ]


def summarize(run_dir: Path, config: Any, stages: list[Any]) -> PipelineSummary:
    """Collect everything the report shows from the run directory."""
    batch_sizes = list(getattr(getattr(config, "bench", None), "batch_sizes", [1, 64]))
    summary = PipelineSummary(
        stages=[{"key": s.key, "title": s.title, "status": s.status, "seconds": s.seconds, "message": s.message}
                for s in stages],
        models=_model_rows(run_dir),
        artifacts=_artifact_rows(run_dir, batch_sizes),
        ranks=(_read_json(run_dir / "compress" / MANIFEST_NAME) or {}).get("ranks", {}),
    )
    summary.plots = _plots(run_dir, summary, batch_sizes)
    return summary


def write_pipeline_report(run_dir: Path, config: Any, stages: list[Any]) -> PipelineSummary:
    """Write report.md, report.html and summary.json into `run_dir`."""
    summary = summarize(run_dir, config, stages)
    batch_sizes = list(getattr(getattr(config, "bench", None), "batch_sizes", [1, 64]))
    tables = _tables(summary, batch_sizes)
    md = ["# cstar pipeline report", ""]
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>cstar pipeline report</title>",
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}"
            "img{max-width:100%}</style></head><body><h1>cstar pipeline report</h1>"]
    for title, headers, rows in tables:
        md += [f"## {title}", "", _table_md(headers, rows), ""]
        page.append(f"<h2>{html.escape(title)}</h2>{_table_html(headers, rows)}")
    for plot in summary.plots:
        md += [f"![{plot}]({plot})", ""]
        page.append(f"<img src='{plot}' alt='{plot}'>")
    page.append("</body></html>")
    atomic_write_text(run_dir / "report.md", "\n".join(md))
    atomic_write_text(run_dir / "report.html", "\n".join(page))
    atomic_write_json(run_dir / "summary.json", {"stages": summary.stages, "models": summary.models,
                                                 "artifacts": summary.artifacts})
    return summary


def summary_table(summary: PipelineSummary) -> str:
    """A short plain-text table for the terminal."""
    lines = [f"{'model / artifact':<26}{'params':>9}{'clean%':>8}{'robust%':>9}{'square%':>9}{'worst%':>8}{'p50 b1 ms':>11}"]
    for m in summary.models:
        lines.append(f"{m['model']:<26}{_fmt(m['params']):>9}{_pct(m['clean_acc']):>8}{_pct(m['robust_acc']):>9}"
                     f"{'-':>9}{'-':>8}{'-':>11}")
    for a in summary.artifacts:
        transfer = min(a["transfer"].values()) if a["transfer"] else None
        name = f"{a['artifact']} @{a['backend']}"
        lines.append(f"{name:<26}{_fmt(a['params']):>9}{_pct(a['clean_acc']):>8}{_pct(transfer):>9}"
                     f"{_pct(a['square']):>9}{_pct(a['worst_case']):>8}{_fmt(a.get('p50_b1'), 3):>11}")
    return "\n".join(lines)
