"""Shared helpers of the benchmark scripts: machine info, result files, tables, paths, options.

Every benchmark writes `benchmarks/results/NAME.json` (numbers, the command as run, the commit and
whether the tree was dirty, machine, versions) and `NAME.md` (the same numbers as Markdown tables);
`--quick` runs write to `benchmarks/results/quick/` instead so they never clobber full results. Full
results are refused from a working tree with uncommitted changes unless `--allow-dirty`
(benchmarks/check_results.py checks the files). Both files are written atomically (cstar.manifest).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from deploy.report import cpu_model  # torch-free; one definition for bench, verify and benchmarks

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
WORK_DIR = REPO_ROOT / "benchmarks" / "work"
VERSION_PACKAGES = ("torch", "onnx", "onnxruntime", "onnxslim", "numpy")
RESULTS_SCHEMA_VERSION = 1

# The paper's headline claim that compression_table compares against (Phan et al., AAAI 2023).
PAPER_CLAIM: dict[str, Any] = {
    "clean_points": 20.07,
    "robust_points": 11.91,
    "setting": "ResNet-18 on CIFAR-10, CSTAR vs robust structured (channel) pruning",
}


# ------------------------------------------------------------------------------------- environment


def torch_threads() -> int | None:
    """torch intra-op threads of this process (None when torch is not installed)."""
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def machine_info(runtime_threads: int | None = None) -> dict[str, Any]:
    """CPU model, cores, torch/runtime threads and load average of this host."""
    affinity = getattr(os, "sched_getaffinity", None)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_available": len(affinity(0)) if affinity else os.cpu_count(),
        "torch_threads": torch_threads(),
        "runtime_threads": runtime_threads,
        "load_average": [round(v, 2) for v in load] if load else None,
        "platform": platform.platform(),
        "gpu": _gpu_name(),
    }


def _gpu_name() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def versions() -> dict[str, str]:
    """python, torch, onnx, onnxruntime (and friends) versions."""
    from cstar.manifest import library_versions

    return library_versions(VERSION_PACKAGES)


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20, check=False)


def git_revision() -> dict[str, Any]:
    """Commit of the working tree and whether it had local changes; None for both without git history.

    Changes under benchmarks/results/ do not count: a benchmark run writes there itself (run_all's
    second script would otherwise find the tree dirty with the first one's results)."""
    try:
        head = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--", ".", f":(exclude){RESULTS_DIR.relative_to(REPO_ROOT)}")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    if head.returncode != 0 or status.returncode != 0:
        return {"commit": None, "dirty": None}
    changes = [line[3:] for line in status.stdout.splitlines() if line.strip()]
    return {"commit": head.stdout.strip(), "dirty": bool(changes), "changes": changes[:20]}


def command_line() -> str:
    """This process's command line as run (sys.argv), the script path relative to the repository."""
    argv = list(sys.argv)
    if argv:
        script = Path(argv[0]).resolve()
        argv[0] = str(script.relative_to(REPO_ROOT)) if script.is_relative_to(REPO_ROOT) else argv[0]
    return shlex.join(["python", *argv])


class DirtyTreeError(CstarError):
    """Full results asked for from a working tree that no commit describes."""


def require_clean_tree(quick: bool, allow_dirty: bool) -> dict[str, Any]:
    """git_revision(); for full (non --quick) results without --allow-dirty, raise DirtyTreeError unless the
    tree is a clean checkout of a commit (results must say which code made them)."""
    revision = git_revision()
    if quick or allow_dirty:
        return revision
    if revision["commit"] is None:
        raise DirtyTreeError("no git history here: full benchmark results must record the commit that made them",
                             "run from a git checkout, or pass --allow-dirty (the result file then has no commit)")
    if revision["dirty"]:
        shown = ", ".join(revision["changes"][:5]) + (", ..." if len(revision["changes"]) > 5 else "")
        raise DirtyTreeError(f"the working tree has uncommitted changes ({shown}): full benchmark results must "
                             "come from a commit", "commit the changes and run again, or pass --allow-dirty "
                             "(the result file then says dirty: true)")
    return revision


# ------------------------------------------------------------------------------------------ results


def results_dir(quick: bool, override: str | Path | None = None) -> Path:
    """benchmarks/results (full), benchmarks/results/quick (--quick), or an explicit directory."""
    if override is not None:
        return Path(override)
    return RESULTS_DIR / "quick" if quick else RESULTS_DIR


def write_results(name: str, payload: dict[str, Any], markdown: str, quick: bool = False,
                  directory: str | Path | None = None, allow_dirty: bool = False) -> tuple[Path, Path]:
    """Write NAME.json (payload + command, commit, machine, versions) and NAME.md atomically; returns both
    paths. Full results from a dirty tree are refused (DirtyTreeError) unless `allow_dirty`."""
    from cstar.manifest import atomic_write_json, atomic_write_text

    revision = require_clean_tree(quick, allow_dirty)
    out = results_dir(quick, directory)
    payload = dict(payload)
    full = {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "benchmark": name,
        "quick": quick,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git": revision,
        "machine": payload.pop("machine", None) or machine_info(),
        "versions": versions(),
        **payload,
    }
    json_path = atomic_write_json(out / f"{name}.json", full)
    md_path = atomic_write_text(out / f"{name}.md", markdown.rstrip() + "\n\n" + machine_markdown(full))
    return json_path, md_path


def machine_markdown(result: dict[str, Any]) -> str:
    """A one-paragraph description of the machine and versions a result was measured on."""
    machine, vers = result.get("machine") or {}, result.get("versions") or {}
    load = machine.get("load_average")
    parts = [
        f"Machine: {machine.get('cpu_model')}, {machine.get('cpus_available')} CPU cores available "
        f"({machine.get('cpu_count')} online), torch threads {machine.get('torch_threads')}",
        f"runtime intra-op threads {machine.get('runtime_threads') or 'default'}",
        f"GPU: {machine.get('gpu') or 'none'}",
        f"load average at start {load[0]:.2f}" if load else "load average unknown",
    ]
    version_text = ", ".join(f"{k} {v}" for k, v in vers.items())
    when = f"Measured {result.get('created')}" + (" (quick mode)" if result.get("quick") else "")
    revision = result.get("git") or {}
    commit = str(revision.get("commit") or "unknown")[:12]
    state = {True: " with uncommitted changes", False: "", None: ""}.get(revision.get("dirty"), "")
    made = f"Made by `{result['command']}` at commit {commit}{state}. " if result.get("command") else ""
    return f"{when}. {made}" + "; ".join(parts) + f". Versions: {version_text}.\n"


# ------------------------------------------------------------------------------------------- tables


def fmt_cell(value: Any, digits: int = 4) -> str:
    """Markdown cell text: None as '-', floats rounded, pipes escaped."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def pct(value: float | None, digits: int = 1) -> str:
    """A fraction in [0,1] as a percentage string ('95.6'); None as '-'."""
    return "-" if value is None else f"{100.0 * value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells preformatted as strings, or formatted by fmt_cell)."""
    from deploy.markdown import md_table

    return md_table(list(headers), [[v if isinstance(v, str) else fmt_cell(v) for v in row] for row in rows]) + "\n"


# ---------------------------------------------------------------------------------------- data/paths


def data_slug(data: str) -> str:
    """'fashion-mnist:/some/dir' -> 'fashion-mnist' (the registry name, used in file names)."""
    return data.split(":", 1)[0]


def work_root(data: str, quick: bool, override: str | Path | None = None) -> Path:
    """Working directory of a dataset's runs: benchmarks/work/<data>[-quick]."""
    if override is not None:
        return Path(override)
    return WORK_DIR / (f"{data_slug(data)}-quick" if quick else data_slug(data))


def result_name(benchmark: str, data: str) -> str:
    """File stem of a benchmark's results, e.g. compression_table_digits."""
    return f"{benchmark}_{data_slug(data)}"


def parse_list(text: str, kind: type = str) -> list[Any]:
    """'4,8,16' -> [4.0, 8.0, 16.0] with kind=float; empty items dropped."""
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def ratio_label(ratio: float) -> str:
    """8.0 -> '8', 2.5 -> '2.5'."""
    return f"{ratio:g}"


# ------------------------------------------------------------------------------------------- options


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script takes."""
    parser.add_argument("--quick", action="store_true",
                        help="CI-sized run (tiny epochs/samples); results go to benchmarks/results/quick/")
    parser.add_argument("--data", default="digits",
                        help="digits (default) or fashion-mnist:/dir/with/idx/files (eps 0.1)")
    parser.add_argument("--dense-dir", default=None,
                        help="existing train-stage directory to reuse (default: train one in the work directory)")
    parser.add_argument("--dense-epochs", type=int, default=None,
                        help="epochs when training the dense model here (default: the dataset's; quick: 1)")
    parser.add_argument("--work", default=None, help="working directory (default benchmarks/work/<data>[-quick])")
    parser.add_argument("--results-dir", default=None,
                        help="where NAME.json/NAME.md go (default benchmarks/results[/quick])")
    parser.add_argument("--torch-threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: on a shared few-core host more threads oversubscribe "
                             "and run many times slower; 0 = torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    add_allow_dirty(parser)


def add_allow_dirty(parser: argparse.ArgumentParser) -> None:
    """--allow-dirty: write full results from a tree with uncommitted changes (the file says so)."""
    parser.add_argument("--allow-dirty", action="store_true",
                        help="write full (non --quick) results even from a working tree with uncommitted changes "
                             "(refused otherwise; the result file then records dirty: true)")


def quick_epochs(args: argparse.Namespace) -> None:
    """--quick: 1 ADMM + 0 fine-tune epochs unless given (the CI-sized compress runs)."""
    if args.quick:
        args.admm_epochs = 1 if args.admm_epochs is None else args.admm_epochs
        args.finetune_epochs = 0 if args.finetune_epochs is None else args.finetune_epochs


def own_compress_config(args: argparse.Namespace) -> dict[str, Any]:
    """CompressConfig overrides for the compress runs a deploy-side benchmark has to make itself."""
    config: dict[str, Any] = {"eval_dense": False, "seed": args.seed}
    for key in ("admm_epochs", "finetune_epochs"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.quick:
        config["eval_limit"] = 100
    return config


def setup_torch(threads: int | None) -> None:
    """Apply --torch-threads before any work (0 or None: leave torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


@contextmanager
def stopwatch() -> Iterator[dict[str, float]]:
    """`with stopwatch() as t: ...` then t['seconds'] holds the wall time."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def log(message: str) -> None:
    """Progress line on stderr with a timestamp."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def publish(name: str, payload: dict[str, Any], markdown: str, args: argparse.Namespace,
            seconds: float) -> dict[str, Any]:
    """The end of a benchmark's run: write NAME.json/.md (write_results, with the run's --quick,
    --results-dir and --allow-dirty), log where and how long it took; returns the payload."""
    paths = write_results(name, payload, markdown, args.quick, args.results_dir, allow_dirty=args.allow_dirty)
    log(f"wrote {paths[0]} and {paths[1]} ({seconds:.0f}s)")
    return payload


def entry_point(doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
                run: Callable[[argparse.Namespace], Any],
                resolve: Callable[[argparse.Namespace], argparse.Namespace] | None = None
                ) -> Callable[[list[str] | None], int]:
    """A benchmark script's `main(argv=None) -> exit status` (run_cli bound to the script)."""

    def main(argv: list[str] | None = None) -> int:
        return run_cli(doc, add_arguments, run, resolve, argv)

    return main


def run_cli(doc: str | None, add_arguments: Callable[[argparse.ArgumentParser], None],
            run: Callable[[argparse.Namespace], Any],
            resolve: Callable[[argparse.Namespace], argparse.Namespace] | None = None,
            argv: list[str] | None = None) -> int:
    """The shared `main` of a benchmark script: parse, resolve defaults, refuse a dirty tree for full
    results before any work, run; a CstarError is printed as error:/fix: (exit status 2)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        require_clean_tree(bool(getattr(args, "quick", False)), bool(getattr(args, "allow_dirty", False)))
        run(resolve(args) if resolve is not None else args)
    except CstarError as exc:
        print(f"error: {exc.message}" + (f"\nfix: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    return 0
