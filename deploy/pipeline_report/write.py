"""The report's entry points: summarize a run (collect, then plot) and write it into the run directory.

`write_pipeline_report` is what `cstar pipeline` calls after its stages: report.md and report.html from
the same blocks, and summary.json with the rows behind them and the definitions of robust and speedup.
It sits above collect, render and figures, so none of those needs another's entry point.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cstar.manifest import atomic_write_json, atomic_write_text
from deploy.pipeline_report.collect import ROBUST_NOTE, SPEEDUP_NOTE, PipelineSummary, collect_summary
from deploy.pipeline_report.figures import write_plots
from deploy.pipeline_report.render import render_html, render_markdown, report_blocks


def summarize(run_dir: Path, config: Any, stages: list[Any], plots: bool = True) -> PipelineSummary:
    """Collect everything the report shows from the run directory (and draw its plots unless `plots` is off)."""
    summary = collect_summary(run_dir, config, stages)
    if plots:
        summary.plots = write_plots(run_dir, summary)
    return summary


def write_pipeline_report(run_dir: Path, config: Any, stages: list[Any]) -> PipelineSummary:
    """Write report.md, report.html and summary.json into `run_dir`."""
    summary = summarize(run_dir, config, stages)
    blocks = report_blocks(summary)
    atomic_write_text(run_dir / "report.md", render_markdown(blocks))
    atomic_write_text(run_dir / "report.html", render_html(blocks, summary.verdict["passed"]))
    atomic_write_json(run_dir / "summary.json", {
        "verdict": summary.verdict, "robust_acc_definition": ROBUST_NOTE, "speedup_definition": SPEEDUP_NOTE,
        "stages": summary.stages, "models": summary.models, "artifacts": summary.artifacts,
        "deployed": summary.deployed})
    return summary
