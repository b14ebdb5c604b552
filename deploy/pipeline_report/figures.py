"""Figures: the report's matplotlib plots (accuracy, latency, rank allocation), saved as PNGs beside it.

matplotlib is a `train`-extra dependency, so it is imported lazily inside each function: the package
imports on a device install, and `write_plots` draws nothing there (the report then has no Plots
section). `write_plots` selects the Agg backend before importing pyplot, so a run needs no display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deploy.pipeline_report.collect import PipelineSummary
from deploy.pipeline_report.render import fmt_times


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
        texts = [f"{v:.3g} ms" + ("" if r["artifact"] == "dense" else f"\n{fmt_times(r['speedup_vs_dense'].get(str(batch)))}")
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


def _rank_fraction(entry: dict[str, Any]) -> float:
    """Kept rank / full rank of one rank-map entry, averaged over its ranked modes (0 when unknown)."""
    ranks = entry.get("ranks") or []
    shape = entry.get("shape") or []
    ranks = ranks if isinstance(ranks, list) else [ranks]
    if not ranks or len(shape) < 2:
        return 0.0
    full = [shape[0], shape[1]][: len(ranks)]
    return sum(r / f for r, f in zip(ranks, full, strict=False)) / len(ranks)


def write_plots(run_dir: Path, summary: PipelineSummary) -> list[str]:
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

