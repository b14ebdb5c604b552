"""Render: a `PipelineSummary` as report.md and report.html, and as the short table the terminal prints.

The report is a list of blocks (`Block`: a kind and its content) rendered twice, Markdown and HTML, so
both say the same in the same order: the verdict first (each deployed artifact's gate, worst-case robust
accuracy and speedup vs dense on its runtime), then the artifact and model tables, warnings, plots, ranks,
and the stage log last: a reader wants the outcome first. Standard library only (plus deploy.markdown).
"""

from __future__ import annotations

import html
import re
from typing import Any

from deploy.markdown import md_table
from deploy.pipeline_report.collect import ROBUST_NOTE, SPEEDUP_NOTE, PipelineSummary

Block = tuple[str, Any]


def _fmt(value: Any, digits: int = 3) -> str:
    """A cell: '-' for a missing value, floats to `digits` decimals."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    """A fraction as a percentage with one decimal ('-' when missing)."""
    return "-" if value is None else f"{100 * float(value):.1f}"


def _sentence(text: str) -> str:
    """The text with its first letter capitalized (the notes open a sentence in the report)."""
    return text[:1].upper() + text[1:]


def fmt_times(value: float | None) -> str:
    """A speedup as '3.00x' ('-' when missing); the latency plot labels its bars with it too."""
    return "-" if value is None else f"{value:.2f}x"


# ------------------------------------------------------------------------------------------ verdict


def _verdict_heading(verdict: dict[str, Any]) -> str:
    """The report's first heading: passed, failed (and which), or nothing verified."""
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
    speeds = [f"{fmt_times(a['speedup_vs_dense'].get(str(b)))} (b{b})" for b in batch_sizes]
    speed = ", ".join(speeds) if any(a["speedup_vs_dense"].get(str(b)) for b in batch_sizes) else \
        f"- (no dense benchmark on {a['backend']})"
    return (f"**{a['artifact']}** on **{a['backend']}** (`{a['path']}`, {a['precision']}): gate {gate}; "
            f"robust **{_pct(a['robust_acc'])}%** (worst case over {attacks}; n={a['robust_n'] or '-'}"
            f"{_vs_dense(a)}), "
            f"clean {_pct(a['clean_acc'])}%; speedup vs dense on {a['backend']}: {speed}")


def _vs_dense(row: dict[str, Any]) -> str:
    """'; -2.0 points vs dense on the runtime' when the dense model was verified there too, else ''."""
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
    """The verdict heading, one item per verified artifact, what ships, the reference and the definitions."""
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
            f"(speedup vs dense {fmt_times(record.get('speedup_vs_dense'))} at b{record['batch']}): {record['reason']}")


# ------------------------------------------------------------------------------------------ tables


def _artifact_table(summary: PipelineSummary) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the runtime artifacts: gate, accuracies (worst case first), p50s, speedups."""
    attacks = sorted({k for a in summary.artifacts for k in a["transfer"]})
    bs = summary.batch_sizes
    headers = ["artifact", "precision", "backend", "gate", "clean %", "robust % (worst case)",
               *[f"{k} % (transfer)" for k in attacks], "square %", "agreement",
               *[f"p50 ms (b{b})" for b in bs], *[f"speedup vs dense (b{b})" for b in bs]]
    rows = [[a["artifact"], a["precision"], a["backend"],
             "-" if a["passed"] is None else ("pass" if a["passed"] else "FAIL " + ",".join(a["failed_checks"])),
             _pct(a["clean_acc"]), _pct(a["robust_acc"]), *[_pct(a["transfer"].get(k)) for k in attacks],
             _pct(a["square"]), _fmt(a["agreement"]), *[_fmt(a.get(f"p50_b{b}"), 3) for b in bs],
             *[fmt_times(a["speedup_vs_dense"].get(str(b))) for b in bs]]
            for a in summary.artifacts]
    return headers, rows


def _model_table(summary: PipelineSummary) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the PyTorch models: size, ratios, clean, the suite's worst case, PGD-20."""
    label = summary.models[0]["robust_label"] if summary.models else "PGD"
    headers = ["model", "params", "MACs", "params ratio", "MACs ratio", "clean %", f"robust % ({label} worst case)",
               "PGD-20 % (training-time check)"]
    rows = [[m["model"], _fmt(m["params"]), _fmt(m["flops"]), _fmt(m["params_ratio"], 2), _fmt(m["flops_ratio"], 2),
             _pct(m["clean_acc"]), _pct(m["robust_acc"]), _pct(m.get("pgd20_robust_acc"))] for m in summary.models]
    return headers, rows


def report_blocks(summary: PipelineSummary) -> list[Block]:
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


# ------------------------------------------------------------------------------------------ Markdown and HTML


def _table_html(headers: list[str], rows: list[list[str]]) -> str:
    """An HTML table of preformatted string cells, every cell escaped."""
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
            md += [md_table(*content), ""]
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


# ------------------------------------------------------------------------------------------ terminal


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
                     _fmt(a.get(f"p50_b{batch}"), 3), fmt_times(a["speedup_vs_dense"].get(str(batch))), gate])
    lines = _aligned(rows)
    lines += ["", "robust% = per-example worst case over every attack run (PyTorch rows: the named attack suite, "
              "pgd% there is PGD-20 on the model itself; *_fq: crafted on the INT8 model's fake-quant twin); "
              f"speedup = dense p50 / artifact p50, same backend, batch {batch}",
              _verdict_heading(summary.verdict)]
    lines += [deployed_line(d).replace("**", "").replace("`", "") for d in summary.deployed.values()]
    return "\n".join(lines)
