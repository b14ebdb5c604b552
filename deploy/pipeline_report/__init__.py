"""RUN_DIR/report.md + report.html for `cstar pipeline`: the verdict first, then every stage's detail.

Reads only the manifests, verify reports and bench results the stages wrote, so the report can be
re-made from a finished run directory without re-running anything. The headline robust number is
the per-example worst case over every attack run (`worst_case_robust_acc` of each verify report);
single attacks are detail columns. The stage log comes last: a reader wants the outcome first.

The package, one concept per module: `collect` (the run directory -> `PipelineSummary`: model rows,
artifact rows, verdict, deployments), `render` (the summary as Markdown/HTML blocks and the terminal
table), `figures` (the matplotlib plots, imported lazily) and `write` (`summarize`,
`write_pipeline_report`). Torch-free; matplotlib is optional.
"""

from deploy.pipeline_report.collect import (
    ROBUST_NOTE,
    SPEEDUP_NOTE,
    PipelineSummary,
    collect_summary,
    make_verdict,
    speedup,
)
from deploy.pipeline_report.figures import accuracy_figure, latency_figure, ranks_figure, write_plots
from deploy.pipeline_report.render import (
    Block,
    deployed_line,
    fmt_times,
    render_html,
    render_markdown,
    report_blocks,
    summary_table,
)
from deploy.pipeline_report.write import summarize, write_pipeline_report

__all__ = [
    "ROBUST_NOTE", "SPEEDUP_NOTE", "Block", "PipelineSummary", "accuracy_figure", "collect_summary", "deployed_line",
    "fmt_times", "latency_figure", "make_verdict", "ranks_figure", "render_html", "render_markdown", "report_blocks",
    "speedup", "summarize", "summary_table", "write_pipeline_report", "write_plots",
]
