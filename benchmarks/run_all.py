"""Run the benchmarks in order: compression_table, deploy_speed, training_overhead, export_robustness,
cross_runtime; then latency_budget only with --latency-budget (it is long).

    python benchmarks/run_all.py [--quick] [--data digits] [--dense-dir DIR] [--work DIR] [--results-dir DIR]
                                 [--latency-budget]

Each script runs in its own process (clean torch/ORT state) and shares the work directory, so the
later ones reuse the compressed models, exports and INT8 artifacts of the earlier ones. Per-script
wall times are written to run_all_<data>.json/.md beside the other results.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from cstar.errors import CstarError  # noqa: E402

SCRIPTS = ("compression_table", "deploy_speed", "training_overhead", "export_robustness", "cross_runtime")
# Long scripts, run only when their flag asks (after SCRIPTS): latency_budget makes 36 compress runs
# (~50 min on 2 shared cores).
OPTIONAL_SCRIPTS = {"latency_budget": "--latency-budget"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options passed through to every script."""
    parser.add_argument("--quick", action="store_true", help="CI-sized runs (results in benchmarks/results/quick/)")
    parser.add_argument("--data", default="digits", help="digits (default) or fashion-mnist:/dir")
    parser.add_argument("--dense-dir", default=None, help="existing dense train-stage directory to reuse")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="epochs of the dense model trained here (default: the dataset's; quick: 1)")
    parser.add_argument("--work", default=None, help="shared working directory")
    parser.add_argument("--results-dir", default=None, help="where the result files go")
    parser.add_argument("--only", default=",".join(SCRIPTS), help="comma-separated subset of the scripts, in order")
    parser.add_argument("--latency-budget", action="store_true",
                        help="also run latency_budget (issue 15: --by latency on CIFAR shapes and digits; ~50 min)")
    parser.add_argument("--extra", action="append", default=[], metavar="SCRIPT:ARGS",
                        help="extra arguments for one script, e.g. 'compression_table:--ratios 4,8'")
    common.add_allow_dirty(parser)


def selected_scripts(args: argparse.Namespace) -> list[str]:
    """The scripts of --only in order, then each optional script whose flag is set."""
    chosen = [n for n in SCRIPTS if n in args.only.split(",")]
    return chosen + [n for n, flag in OPTIONAL_SCRIPTS.items() if getattr(args, flag.lstrip("-").replace("-", "_"))]


def script_argv(name: str, args: argparse.Namespace) -> list[str]:
    """Command line of one script."""
    argv = [sys.executable, str(common.REPO_ROOT / "benchmarks" / f"{name}.py"), "--data", args.data]
    for flag, value in (("--dense-dir", args.dense_dir), ("--work", args.work), ("--results-dir", args.results_dir),
                        ("--dense-epochs", args.dense_epochs)):
        if value is not None:
            argv += [flag, str(value)]
    if args.quick:
        argv.append("--quick")
    if args.allow_dirty:
        argv.append("--allow-dirty")
    for extra in args.extra:
        target, _, rest = extra.partition(":")
        if target == name:
            argv += rest.split()
    return argv


def run_script(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one script; its wall time and exit code."""
    argv = script_argv(name, args)
    common.log(f"running {' '.join(argv[1:])}")
    with common.stopwatch() as t:
        code = subprocess.run(argv, cwd=common.REPO_ROOT, check=False).returncode
    common.log(f"{name}: exit {code} after {t['seconds']:.0f}s")
    return {"script": name, "seconds": round(t["seconds"], 1), "exit_code": code, "argv": argv[1:]}


def main(argv: list[str] | None = None) -> int:
    """Run the selected scripts in order; stop at the first failure."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        common.require_clean_tree(args.quick, args.allow_dirty)  # before any work, not after the last script
    except CstarError as exc:
        print(f"error: {exc.message}\nfix: {exc.hint}", file=sys.stderr)
        return 2
    machine = {**common.machine_info(), "torch_threads": "per script (each sets --torch-threads, default 1)"}
    runs: list[dict[str, Any]] = []
    with common.stopwatch() as total:
        for name in selected_scripts(args):
            runs.append(run_script(name, args))
            if runs[-1]["exit_code"] != 0:
                break
    table = common.markdown_table(["script", "wall seconds", "exit code"],
                           [[r["script"], f"{r['seconds']:.0f}", str(r["exit_code"])] for r in runs])
    markdown = f"## Benchmark run times ({args.data})\n\nTotal {total['seconds']:.0f}s.\n\n" + table
    common.write_results(common.result_name("run_all", args.data), {"machine": machine, "data": args.data, "runs": runs,
                                                      "seconds": round(total["seconds"], 1)},
                  markdown, args.quick, args.results_dir, allow_dirty=args.allow_dirty)
    failed = [r for r in runs if r["exit_code"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
