"""`cstar pipeline`: load the config (`--quick` shrinks it), run every stage in one locked run directory,
write report.md/html, materialize what ships, print the summary table."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from deploy.pipeline.config import load_config, quick_config
from deploy.pipeline.run import run_pipeline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config (default: digits demo)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--force", action="store_true", help="re-run every stage even if its outputs are valid")
    parser.add_argument("--data", default=None, metavar="NAME[:PATH]",
                        help="dataset, overriding the config's [data] name (e.g. cifar10:/data/cifar-10-images)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes (1 epoch, few samples and queries): checks the config runs end to end")


def main(args: argparse.Namespace) -> int:
    from cstar.outdir import OutputDir
    from deploy.pipeline_report import summary_table, write_pipeline_report
    from deploy.selection import materialize

    config = load_config(args.config, getattr(args, "data", None))
    if getattr(args, "quick", False):
        config = quick_config(config)
    started = time.perf_counter()
    with OutputDir(args.out, "pipeline", (args.config,), resumable=True):  # checked and locked while it runs
        stages = run_pipeline(config, args.out, force=args.force)
        summary = write_pipeline_report(args.out, config, stages)
        materialize(args.out, summary.deployed)
    print()
    print(summary_table(summary))
    failed = [s.key for s in stages if s.status == "failed"]
    total = time.perf_counter() - started
    print(f"\npipeline: {len(stages)} stages ({sum(s.status == 'skipped' for s in stages)} skipped) in {total:.0f}s; "
          f"report: {args.out / 'report.md'} and report.html" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
