"""RUN_DIR/report.md + report.html for `cstar pipeline`: the verdict first, then every stage's detail.

Reads only the manifests, verify reports and bench results the stages wrote, so the report can be
re-made from a finished run directory without re-running anything. The headline robust number is
the per-example worst case over every attack run (`worst_case_robust_acc` of each verify report);
single attacks are detail columns. The stage log comes last: a reader wants the outcome first.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.manifest import MANIFEST_NAME, atomic_write_json, atomic_write_text
from deploy.markdown import md_table
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


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:]


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------------------------------ collect


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


def _artifact_rows(run_dir: Path, batch_sizes: list[int]) -> list[dict[str, Any]]:
    """Verified artifacts (verify-*) and the dense reference benchmarks (bench-dense-*), with speedups."""
    rows = []
    verified = sorted(run_dir.glob("verify-*"), key=lambda d: (d.name.startswith("verify-dense-"), d.name))
    benched_dense = [d for d in sorted(run_dir.glob("bench-dense-*"))
                     if not (run_dir / d.name.replace("bench-", "verify-", 1)).is_dir()]
    for verify_dir in verified + benched_dense:
        parts = parse_artifact_dir(verify_dir.name)
        precision, backend = parts.precision, parts.backend  # e.g. verify-fp32-ort-cpu
        report = _read_json(verify_dir / "report.json") if verify_dir.name.startswith("verify") else None
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
        rows.append(row)
    _add_robust_vs_dense(rows)
    return rows


def _add_robust_vs_dense(rows: list[dict[str, Any]]) -> None:
    """Each compressed row's worst-case robust accuracy minus the dense model's on the same runtime."""
    dense = {r["backend"]: r["robust_acc"] for r in rows if r["artifact"] == "dense" and r["robust_acc"] is not None}
    for row in rows:
        reference = dense.get(row["backend"])
        row["robust_vs_dense"] = (None if row["artifact"] == "dense" or reference is None or row["robust_acc"] is None
                                  else row["robust_acc"] - reference)


def make_verdict(artifacts: list[dict[str, Any]]) -> dict[str, Any]:
    """Overall gate result over every verified compressed artifact (dense is the reference, not shipped)."""
    verified = [a for a in artifacts if a["passed"] is not None and a["artifact"] != "dense"]
    failed = [f"{a['artifact']} on {a['backend']}" for a in verified if not a["passed"]]
    return {"passed": (not failed) if verified else None, "verified": len(verified), "failed": failed}


# ------------------------------------------------------------------------------------------ blocks
# The report is a list of blocks rendered twice (Markdown and HTML), so both say the same, in the same order.

Block = tuple[str, Any]


def _verdict_heading(verdict: dict[str, Any]) -> str:
    if verdict["passed"] is None:
        return "Verdict: nothing verified (no verify stage wrote a report)"
    if verdict["passed"]:
        return f"Verdict: gate PASSED ({verdict['verified']} of {verdict['verified']} deployed artifacts)"
    return (f"Verdict: gate FAILED ({len(verdict['failed'])} of {verdict['verified']} deployed artifacts: "
            f"{', '.join(verdict['failed'])})")


def _verdict_item(a: dict[str, Any], batch_sizes: list[int]) -> str:
    """One deployed artifact: where, gate, worst-case robust, clean, speedup vs dense on the runtime."""
    gate = "**PASSED**" if a["passed"] else "**FAILED** (" + ", ".join(a["failed_checks"]) + ")"
    attacks = ", ".join(a["robust_attacks"]) or "no attack"
    speeds = [f"{_times(a['speedup_vs_dense'].get(str(b)))} (b{b})" for b in batch_sizes]
    speed = ", ".join(speeds) if any(a["speedup_vs_dense"].get(str(b)) for b in batch_sizes) else \
        f"- (no dense benchmark on {a['backend']})"
    return (f"**{a['artifact']}** on **{a['backend']}** (`{a['path']}`, {a['precision']}): gate {gate}; "
            f"robust **{_pct(a['robust_acc'])}%** (worst case over {attacks}; n={a['robust_n'] or '-'}"
            f"{_vs_dense(a)}), "
            f"clean {_pct(a['clean_acc'])}%; speedup vs dense on {a['backend']}: {speed}")


def _vs_dense(row: dict[str, Any]) -> str:
    delta = row.get("robust_vs_dense")
    return "" if delta is None else f"; {100 * delta:+.1f} points vs dense on the runtime"


def _reference_line(summary: PipelineSummary) -> str:
    """The dense reference the verdict compares against: PyTorch accuracy and runtime latency."""
    parts = []
    for m in summary.models:
        parts.append(f"{m['model']} clean {_pct(m['clean_acc'])}%, {m['robust_label']} robust "
                     f"{_pct(m['robust_acc'])}%")
    for a in summary.artifacts:
        if a["artifact"] == "dense":
            latency = ", ".join(f"{_fmt(a.get(f'p50_b{b}'), 3)} ms (b{b})" for b in summary.batch_sizes)
            robust = "" if a["robust_acc"] is None else f", worst-case robust {_pct(a['robust_acc'])}% on the runtime"
            parts.append(f"dense FP32 on {a['backend']} p50 {latency}{robust}")
    return "Reference: " + ("; ".join(parts) if parts else "-") + "."


def _verdict_blocks(summary: PipelineSummary) -> list[Block]:
    verified = [a for a in summary.artifacts if a["passed"] is not None and a["artifact"] != "dense"]
    blocks: list[Block] = [("verdict", _verdict_heading(summary.verdict))]
    if verified:
        blocks.append(("ul", [_verdict_item(a, summary.batch_sizes) for a in verified]))
    if summary.deployed:
        blocks.append(("ul", [deployed_line(d) for d in summary.deployed.values()]))
    blocks += [("p", _reference_line(summary)), ("p", f"{_sentence(ROBUST_NOTE)}. {_sentence(SPEEDUP_NOTE)}.")]
    return blocks


def deployed_line(record: dict[str, Any]) -> str:
    """What ships on one runtime and why (the fastest precision that passed verification)."""
    if record["precision"] is None:
        return f"Deployed on **{record['backend']}**: {record['reason']}"
    return (f"Deployed on **{record['backend']}**: compressed **{record['precision']}** in `{record['path']}/` "
            f"(speedup vs dense {_times(record.get('speedup_vs_dense'))} at b{record['batch']}): {record['reason']}")


def _artifact_table(summary: PipelineSummary) -> tuple[list[str], list[list[str]]]:
    attacks = sorted({k for a in summary.artifacts for k in a["transfer"]})
    bs = summary.batch_sizes
    headers = ["artifact", "precision", "backend", "gate", "clean %", "robust % (worst case)",
               *[f"{k} % (transfer)" for k in attacks], "square %", "agreement",
               *[f"p50 ms (b{b})" for b in bs], *[f"speedup vs dense (b{b})" for b in bs]]
    rows = [[a["artifact"], a["precision"], a["backend"],
             "-" if a["passed"] is None else ("pass" if a["passed"] else "FAIL " + ",".join(a["failed_checks"])),
             _pct(a["clean_acc"]), _pct(a["robust_acc"]), *[_pct(a["transfer"].get(k)) for k in attacks],
             _pct(a["square"]), _fmt(a["agreement"]), *[_fmt(a.get(f"p50_b{b}"), 3) for b in bs],
             *[_times(a["speedup_vs_dense"].get(str(b))) for b in bs]]
            for a in summary.artifacts]
    return headers, rows


def _model_table(summary: PipelineSummary) -> tuple[list[str], list[list[str]]]:
    label = summary.models[0]["robust_label"] if summary.models else "PGD"
    headers = ["model", "params", "MACs", "params ratio", "MACs ratio", "clean %", f"robust % ({label} worst case)",
               "PGD-20 % (training-time check)"]
    rows = [[m["model"], _fmt(m["params"]), _fmt(m["flops"]), _fmt(m["params_ratio"], 2), _fmt(m["flops_ratio"], 2),
             _pct(m["clean_acc"]), _pct(m["robust_acc"]), _pct(m.get("pgd20_robust_acc"))] for m in summary.models]
    return headers, rows


def _report_blocks(summary: PipelineSummary) -> list[Block]:
    """Verdict, artifacts, models, warnings, plots, ranks, then the stage log (last)."""
    blocks = _verdict_blocks(summary)
    blocks += [("h2", "Deployed artifacts, re-checked on the runtime"), ("table", _artifact_table(summary)),
               ("p", "Transfer: the attack set crafted on the compressed PyTorch model, replayed on the runtime; "
                     "square: the black-box Square attack run against the runtime (queries and n in each verify "
                     "report).")]
    blocks += [("h2", "Models (PyTorch, test split)"), ("table", _model_table(summary))]
    warning_rows = [[m["model"], w] for m in summary.models for w in m.get("warnings", [])]
    warning_rows += [[f"{a['artifact']} @{a['backend']}", w] for a in summary.artifacts for w in a.get("warnings", [])]
    if warning_rows:
        blocks += [("h2", "Warnings (attack diagnostics and verification)"),
                   ("table", (["model / artifact", "warning"], warning_rows))]
    plots = [p for p in summary.plots if p != "ranks.png"]
    if plots:
        blocks += [("h2", "Plots"), *[("img", p) for p in plots]]
    rank_rows = [[name, str(v.get("kind")), str(v.get("ranks")), str(v.get("shape"))] for name, v in summary.ranks.items()]
    blocks += [("h2", "Ranks per layer"), ("table", (["layer", "kind", "ranks", "shape"], rank_rows))]
    if "ranks.png" in summary.plots:
        blocks.append(("img", "ranks.png"))
    stage_rows = [[s["key"], s["title"], s["status"], f"{s['seconds']:.1f}", s.get("message", "")] for s in summary.stages]
    blocks += [("h2", "Stage log"), ("table", (["stage", "what", "status", "seconds", "note"], stage_rows))]
    return blocks


def _table_md(headers: list[str], rows: list[list[str]]) -> str:
    return md_table(headers, rows)


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _inline_html(text: str) -> str:
    """The two Markdown inline marks the report uses (**bold**, `code`) as HTML, the rest escaped."""
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_markdown(blocks: list[Block]) -> str:
    """report.md from the blocks."""
    md = ["# cstar pipeline report", ""]
    for kind, content in blocks:
        if kind in ("h2", "verdict"):
            md += [f"## {content}", ""]
        elif kind == "p":
            md += [content, ""]
        elif kind == "ul":
            md += [*[f"- {item}" for item in content], ""]
        elif kind == "table":
            md += [_table_md(*content), ""]
        elif kind == "img":
            md += [f"![{content}]({content})", ""]
    return "\n".join(md)


_CSS = ("body{font-family:sans-serif;max-width:1150px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}th{background:#f3f3f3}"
        "img{max-width:100%;display:block;margin:1em 0}.verdict{border-left:6px solid #888;padding:.2em 1em;"
        "background:#fafafa}.pass{border-color:#2a8a2a}.fail{border-color:#c0392b}li{margin:.3em 0}")


def render_html(blocks: list[Block], passed: bool | None) -> str:
    """report.html from the blocks; the verdict sits in a box coloured by the gate result."""
    state = "" if passed is None else (" pass" if passed else " fail")
    page = ["<!doctype html><html><head><meta charset='utf-8'><title>cstar pipeline report</title>",
            f"<style>{_CSS}</style></head><body><h1>cstar pipeline report</h1>"]
    in_verdict = False
    for kind, content in blocks:
        if kind == "h2" and in_verdict:
            page.append("</div>")
            in_verdict = False
        if kind == "verdict":
            page.append(f"<div class='verdict{state}'><h2>{_inline_html(content)}</h2>")
            in_verdict = True
        elif kind == "h2":
            page.append(f"<h2>{_inline_html(content)}</h2>")
        elif kind == "p":
            page.append(f"<p>{_inline_html(content)}</p>")
        elif kind == "ul":
            page.append("<ul>" + "".join(f"<li>{_inline_html(item)}</li>" for item in content) + "</ul>")
        elif kind == "table":
            page.append(_table_html(*content))
        elif kind == "img":
            page.append(f"<img src='{html.escape(content)}' alt='{html.escape(content)}'>")
    if in_verdict:
        page.append("</div>")
    page.append("</body></html>")
    return "\n".join(page)


# ------------------------------------------------------------------------------------------ plots


def _accuracy_series(summary: PipelineSummary) -> tuple[list[str], dict[str, list[float | None]]]:
    """Groups (PyTorch models, then verified artifacts) and series (clean, worst case, each attack)."""
    verified = [a for a in summary.artifacts if a["clean_acc"] is not None]
    attacks = sorted({k for a in verified for k in a["transfer"]})
    labels = [m["model"].replace(" (", "\n(") for m in summary.models] + \
        [f"{a['artifact']}\n{a['backend']}" for a in verified]
    series: dict[str, list[float | None]] = {
        "clean": [m["clean_acc"] for m in summary.models] + [a["clean_acc"] for a in verified],
        "robust (worst case)": [m["robust_acc"] for m in summary.models] + [a["robust_acc"] for a in verified],
    }
    for k in attacks:
        pytorch = [m.get("pgd20_robust_acc") if k == "pgd" else None for m in summary.models]
        series[f"{k} ({'white-box / ' if k == 'pgd' else ''}transfer)"] = pytorch + [a["transfer"].get(k) for a in verified]
    series["square (black-box)"] = [None for _ in summary.models] + [a["square"] for a in verified]
    return labels, series


def accuracy_figure(summary: PipelineSummary) -> Any:
    """Grouped bars: the dense and compressed PyTorch references, then every verified runtime artifact.

    The legend sits below the axes so it never covers a bar; missing values draw no bar.
    """
    import matplotlib.pyplot as plt

    labels, series = _accuracy_series(summary)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(labels) + 1.5), 3.6))
    width = 0.8 / len(series)
    for offset, (name, values) in enumerate(series.items()):
        xs = [i - 0.4 + (offset + 0.5) * width for i, v in enumerate(values) if v is not None]
        bars = ax.bar(xs, [v for v in values if v is not None], width, label=name)
        if name.startswith("robust"):
            ax.bar_label(bars, labels=[f"{100 * float(v):.0f}" for v in values if v is not None], fontsize=7, padding=1)
    if summary.models and len(labels) > len(summary.models):
        ax.axvline(len(summary.models) - 0.5, color="#999", linestyle=":", linewidth=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("accuracy")
    ax.set_title("PyTorch references | deployed artifacts on the runtime", fontsize=9)
    ax.legend(fontsize=7, ncol=min(len(series), 3), loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    fig.tight_layout()
    return fig


def latency_figure(summary: PipelineSummary) -> Any:
    """p50 per batch size; the dense reference first and in grey, each bar labelled with ms and speedup vs dense."""
    import matplotlib.pyplot as plt

    timed = [r for r in summary.artifacts if any(r.get(f"p50_b{b}") for b in summary.batch_sizes)]
    timed.sort(key=lambda r: r["artifact"] != "dense")
    sizes = summary.batch_sizes
    fig, axes = plt.subplots(1, len(sizes), figsize=((0.9 * len(timed) + 1.2) * len(sizes), 3.2), squeeze=False)
    for ax, batch in zip(axes[0], sizes, strict=True):
        values = [r.get(f"p50_b{batch}") or 0.0 for r in timed]
        colors = ["#999999" if r["artifact"] == "dense" else "#1f77b4" for r in timed]
        bars = ax.bar(range(len(timed)), values, color=colors)
        texts = [f"{v:.3g} ms" + ("" if r["artifact"] == "dense" else f"\n{_times(r['speedup_vs_dense'].get(str(batch)))}")
                 for r, v in zip(timed, values, strict=True)]
        ax.bar_label(bars, labels=texts, fontsize=7, padding=1)
        ax.set_ylim(0, max([*values, 1e-9]) * 1.35)
        ax.set_xticks(range(len(timed)), [f"{r['artifact'].split()[0]}\n{r['precision']} {r['backend']}" for r in timed],
                      fontsize=7)
        ax.set_title(f"p50 latency, batch {batch}", fontsize=9)
        ax.set_ylabel("ms")
    fig.suptitle("grey: dense reference; labels: p50 and speedup vs dense", fontsize=8)
    fig.tight_layout()
    return fig


def ranks_figure(factorized: dict[str, Any]) -> Any:
    """Kept rank / full rank per factorized or pruned layer."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    names = list(factorized)
    ax.bar(range(len(names)), [_rank_fraction(factorized[n]) for n in names])
    ax.set_xticks(range(len(names)), [n.replace("net.", "") for n in names], rotation=70, fontsize=6)
    ax.set_ylabel("kept rank / full rank")
    ax.set_title("global rank allocation per layer", fontsize=9)
    fig.tight_layout()
    return fig


def _plots(run_dir: Path, summary: PipelineSummary) -> list[str]:
    """Accuracy, latency and rank plots as PNG files beside the report (skipped without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figures: dict[str, Any] = {}
    if summary.models or any(a["clean_acc"] is not None for a in summary.artifacts):
        figures["accuracy.png"] = accuracy_figure(summary)
    if any(r.get(f"p50_b{b}") for r in summary.artifacts for b in summary.batch_sizes):
        figures["latency.png"] = latency_figure(summary)
    factorized = {k: v for k, v in summary.ranks.items() if v.get("kind") in ("tucker2", "svd", "pruned")}
    if factorized:
        figures["ranks.png"] = ranks_figure(factorized)
    for name, fig in figures.items():
        fig.savefig(run_dir / name, dpi=120, bbox_inches="tight")
        plt.close(fig)
    return list(figures)


def _rank_fraction(entry: dict[str, Any]) -> float:
    ranks = entry.get("ranks") or []
    shape = entry.get("shape") or []
    ranks = ranks if isinstance(ranks, list) else [ranks]
    if not ranks or len(shape) < 2:
        return 0.0
    full = [shape[0], shape[1]][: len(ranks)]
    return sum(r / f for r, f in zip(ranks, full, strict=False)) / len(ranks)


# ------------------------------------------------------------------------------------------ entry points


def summarize(run_dir: Path, config: Any, stages: list[Any], plots: bool = True) -> PipelineSummary:
    """Collect everything the report shows from the run directory."""
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
    if plots:
        summary.plots = _plots(run_dir, summary)
    return summary


def write_pipeline_report(run_dir: Path, config: Any, stages: list[Any]) -> PipelineSummary:
    """Write report.md, report.html and summary.json into `run_dir`."""
    summary = summarize(run_dir, config, stages)
    blocks = _report_blocks(summary)
    atomic_write_text(run_dir / "report.md", render_markdown(blocks))
    atomic_write_text(run_dir / "report.html", render_html(blocks, summary.verdict["passed"]))
    atomic_write_json(run_dir / "summary.json", {
        "verdict": summary.verdict, "robust_acc_definition": ROBUST_NOTE, "speedup_definition": SPEEDUP_NOTE,
        "stages": summary.stages, "models": summary.models, "artifacts": summary.artifacts,
        "deployed": summary.deployed})
    return summary


def _aligned(rows: list[list[str]]) -> list[str]:
    """Plain-text columns as wide as their widest cell: the first left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [row[0].ljust(widths[0]) + "".join(f"  {cell:>{w}}" for cell, w in zip(row[1:], widths[1:], strict=True))
            for row in rows]


def summary_table(summary: PipelineSummary) -> str:
    """A short plain-text table for the terminal: robust% is the worst case; single attacks follow it."""
    attacks = sorted({k for a in summary.artifacts for k in a["transfer"]})
    batch = summary.batch_sizes[0] if summary.batch_sizes else 1
    detail = [f"{k}%" for k in attacks] or ["pgd%"]
    rows = [["model / artifact", "params", "clean%", "robust%", *detail, "square%", f"p50 b{batch} ms", "speedup",
             "gate"]]
    for m in summary.models:
        pgd = [_pct(m.get("pgd20_robust_acc")) if d == "pgd%" else "-" for d in detail]
        rows.append([m["model"].replace(")", ", " + m["robust_label"] + ")"), _fmt(m["params"]), _pct(m["clean_acc"]),
                     _pct(m["robust_acc"]), *pgd, "-", "-", "-", "-"])
    for a in summary.artifacts:
        gate = "-" if a["passed"] is None else ("pass" if a["passed"] else "FAIL")
        rows.append([a["artifact"] + " @" + a["backend"], _fmt(a["params"]), _pct(a["clean_acc"]), _pct(a["robust_acc"]),
                     *(_pct(a["transfer"].get(k)) for k in attacks), _pct(a["square"]),
                     _fmt(a.get(f"p50_b{batch}"), 3), _times(a["speedup_vs_dense"].get(str(batch))), gate])
    lines = _aligned(rows)
    lines += ["", "robust% = per-example worst case over every attack run (PyTorch rows: the named attack suite, "
              "pgd% there is PGD-20 on the model itself; *_fq: crafted on the INT8 model's fake-quant twin); "
              f"speedup = dense p50 / artifact p50, same backend, batch {batch}",
              _verdict_heading(summary.verdict)]
    lines += [deployed_line(d).replace("**", "").replace("`", "") for d in summary.deployed.values()]
    return "\n".join(lines)
