"""CIFAR-10 on a 2-core CPU: CSTAR vs robust pruning vs hybrid vs uniform low-rank at equal MEASURED latency.

The dense model is the shipped reference (benchmarks/models/cifar10-preact18w16-nfgsm: PreAct-ResNet-18 width
16, N-FGSM, 15 epochs, eps 8/255), copied into the work directory with the data path filled in. The table is
built in resumable PARTS of at most ~2 hours each; every part writes its own result file from a clean tree
(cifar10_cpu_<part>.json/.md), so the table can be made over several sessions:

- `profile`: `cstar profile` of the dense model on ort-cpu (1 thread, batch --latency-batch), the best
  reachable latency ratio per method, and the dense model deployed on every --runtimes backend (FP32 and
  the runtime's own INT8), verified on the runtime (transfer set + Square) and timed.
- `x<T>-s<S>` (e.g. x2-s0): each --methods method compressed `--by latency --ratio T --seed S` with the same
  recipe (N-FGSM, --admm-epochs + --finetune-epochs, the baselines fine-tune the sum), evaluated by the
  compress stage on the same --eval-limit stratified test images (apgd suite, PGD-20 beside it), then
  deployed as the pipeline deploys (export with the table's forms -> per-runtime INT8 -> build -> attackset
  crafted with APGD-CE/APGD-T on the model -> verify on the runtime with Square) and timed in rounds
  interleaved with the dense model's builds, so each speedup is a ratio measured in one run.
- `report`: no compute; collects every finished part into cifar10_cpu.json/.md (mean +- std over seeds,
  winner per target and whether its lead exceeds the seed spread) and the Pareto plot cifar10_cpu.png.

`--plan` prints the parts with their estimated wall time (from the dense model's measured seconds per epoch
and the measured per-model deploy cost) against --budget-hours, and runs nothing. With 2 torch threads on an
otherwise idle 2-core machine the table fits 6 hours (~5 h); with 1 thread (the other core busy) ~9 h.

    python benchmarks/cifar10_cpu.py --data ../shared/data/cifar10-jpeg.tar.gz --plan
    python benchmarks/cifar10_cpu.py --data DIR_OR_TARBALL --part profile --torch-threads 2
    python benchmarks/cifar10_cpu.py --data DIR_OR_TARBALL --part x2-s0 --torch-threads 2
    python benchmarks/cifar10_cpu.py --data DIR_OR_TARBALL --part report
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import (  # noqa: E402
    StageRun,
    ensure_attackset,
    ensure_build,
    ensure_calibrate,
    read_json,
    timing_of,
)
from cstar.errors import CstarError  # noqa: E402

BENCHMARK = "cifar10_cpu"
SHIPPED_DENSE = Path(__file__).resolve().parent / "models" / "cifar10-preact18w16-nfgsm"
PLACEHOLDER = "CIFAR10_DIR"
PART_PATTERN = re.compile(r"^x([0-9]+(?:\.[0-9]+)?)-s([0-9]+)$")
# Measured on the first runs (1 thread, Intel Xeon): a compress epoch of a 2x-latency model takes as long as a
# dense N-FGSM epoch (~168 s: the factorized layers train no faster in PyTorch); a compress run costs ~760 s
# more than its epochs (data loading, validation, the apgd evaluation of --eval-limit images); deploying one
# model ~700 s (attack set 140 s, two calibrations with their twin attacks, four verifies, bench); the profile
# part ~25 min.
EPOCH_FACTOR = 1.05
COMPRESS_OVERHEAD_SECONDS = 760.0
DEPLOY_SECONDS_PER_MODEL = 700.0
PROFILE_SECONDS = 1500.0
# speed of 2 torch threads over 1 on the 2 cores (measured: one N-FGSM step of preact-resnet18 w16 at batch 128
# takes 231 ms with 2 threads, 160 s / 391 steps = 409 ms with 1); the dense epoch time was measured with 1
THREAD_SPEEDUP = {1: 1.0, 2: 1.78}
PART_LIMIT_SECONDS = 2 * 3600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--data", required=True, help="CIFAR-10: the python batches or image tree directory, or "
                        "cifar10-jpeg.tar.gz (unpacked once under --work)")
    parser.add_argument("--part", default=None, help="profile, x<TARGET>-s<SEED> (e.g. x2-s0) or report")
    parser.add_argument("--plan", action="store_true", help="print the parts and their estimated time, run nothing")
    parser.add_argument("--dense", default=str(SHIPPED_DENSE), help="train-stage directory of the dense model "
                        "(default: the shipped reference; a data path written as CIFAR10_DIR is filled in)")
    parser.add_argument("--work", default="benchmarks/work/cifar10-cpu", help="working directory (resumable)")
    parser.add_argument("--results-dir", default=None, help="where the result files go (default benchmarks/results)")
    parser.add_argument("--methods", default="cstar,prune,hybrid,lowrank-uniform")
    parser.add_argument("--targets", default="2,2.5", help="latency ratios at --latency-batch (parts "
                        "x<T>-s<S>); 4x is out of reach at batch 1 (profile part: cstar 3.02x, lowrank-uniform "
                        "2.95x, prune and hybrid 3.67x), 3x too for lowrank-uniform")
    parser.add_argument("--seeds", default="0,1", help="compress seeds (parts x<T>-s<S>)")
    parser.add_argument("--runtimes", default="ort-cpu,openvino-cpu", help="deploy backends (FP32 + their INT8)")
    parser.add_argument("--latency-batch", type=int, default=1, help="batch size of the budget (edge: 1)")
    parser.add_argument("--batch-sizes", default="1,16", help="timed batch sizes (the first is --latency-batch)")
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of profile, bench and verify")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads of compress and attacks")
    parser.add_argument("--admm-epochs", type=int, default=1)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--train-method", default="n-fgsm", help="adversarial loss of every compress run")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--eval-limit", type=int, default=2000, help="stratified test images of the strong suite")
    parser.add_argument("--hybrid-prune-share", type=float, default=0.5)
    parser.add_argument("--attack-samples", type=int, default=500, help="transfer set size per model")
    parser.add_argument("--calib-samples", type=int, default=512)
    parser.add_argument("--parity-samples", type=int, default=250,
                        help="calibrate's parity/robust check images (its twin attack is most of its time)")
    parser.add_argument("--square-queries", type=int, default=1000)
    parser.add_argument("--square-samples", type=int, default=200)
    parser.add_argument("--square-p-init", type=float, default=0.05)
    parser.add_argument("--iters", type=int, default=30, help="timed calls per batch size and round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved bench rounds (median taken)")
    parser.add_argument("--budget-hours", type=float, default=6.0, help="--plan: the whole table's budget")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny eval/attack sizes, 0+0 epochs "
                        "(results go to benchmarks/results/quick)")
    parser.add_argument("--seed", type=int, default=0, help="attack set, Square and bench seed")
    common.add_allow_dirty(parser)


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """--quick sizes; the part name checked before any work."""
    if args.quick:
        args.admm_epochs, args.finetune_epochs = 0, 0
        args.eval_limit, args.attack_samples, args.parity_samples, args.calib_samples = 100, 50, 100, 64
        args.square_queries, args.square_samples, args.iters, args.warmup, args.rounds = 50, 20, 5, 2, 1
    if args.plan:
        return args
    if args.part is None:
        raise CstarError("no --part given", f"pass one of: {', '.join(part_names(args))}, report (or --plan)")
    if args.part not in ("profile", "report") and not PART_PATTERN.match(args.part):
        raise CstarError(f"unknown part '{args.part}'", f"pass one of: {', '.join(part_names(args))}, report")
    if common.parse_list(args.batch_sizes, int)[0] != args.latency_batch:
        raise CstarError(f"--batch-sizes {args.batch_sizes} must start with --latency-batch {args.latency_batch}",
                         f"pass --batch-sizes {args.latency_batch},...")
    return args


def part_names(args: argparse.Namespace) -> list[str]:
    """profile, then x<T>-s<S> for every target and seed (seed-major: a finished seed is a whole table)."""
    return ["profile"] + [f"x{t:g}-s{s}" for s in common.parse_list(args.seeds, int)
                          for t in common.parse_list(args.targets, float)]


# ------------------------------------------------------------------------------------------ set-up


def data_directory(data: str, work: Path) -> Path:
    """The CIFAR-10 directory: `data` (a path, or cifar10:PATH) itself, or the tarball unpacked under `work`."""
    from benchmarks.cifar10_gpu import unpack

    path = data.split(":", 1)[1] if data.startswith("cifar10:") else data
    if not Path(path).exists():
        raise CstarError(f"CIFAR-10 data not found: {path}",
                         "pass --data with the CIFAR-10 directory or ../shared/data/cifar10-jpeg.tar.gz")
    root = unpack(path, work).resolve()
    nested = [d for d in root.iterdir() if d.is_dir() and (d / "train").is_dir()] if not (root / "train").is_dir() \
        else []
    return nested[0] if len(nested) == 1 else root


def localized_dense(source: Path, out: Path, data_dir: Path) -> StageRun:
    """A copy of the dense train-stage directory whose manifest names `data_dir` where it says CIFAR10_DIR
    (the shipped reference is written with that placeholder). Weights are copied unchanged (sha256 kept)."""
    from cstar.manifest import atomic_write_text, read_manifest, sha256_file

    text = (source / "manifest.json").read_text(encoding="utf-8")
    localized = text.replace(json.dumps(PLACEHOLDER)[1:-1], json.dumps(str(data_dir))[1:-1])
    weights = json.loads(text)["weights"]["file"]
    if not ((out / "manifest.json").is_file() and (out / "manifest.json").read_text(encoding="utf-8") == localized
            and sha256_file(out / weights) == sha256_file(source / weights)):
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / weights, out / weights)
        atomic_write_text(out / "manifest.json", localized)
    return StageRun(out, read_manifest(out, ["train"]), None, True)


def data_arg(data_dir: Path) -> str:
    return f"cifar10:{data_dir}"


# ------------------------------------------------------------------------------------------ deploy


def deploy_model(run: StageRun, root: Path, table: Path, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline's path for one model: export (forms by the table), per runtime an INT8 calibration in its
    format, FP32 and INT8 builds, an attack set crafted on the model, verify of every build on its runtime."""
    from benchmarks.export_robustness import verify
    from benchmarks.latency_budget import ensure_table_export
    from deploy.backends.registry import calibrate_target

    base = root / "deploy" / run.directory.name
    export = ensure_table_export(run.directory, base / "onnx", table, args.latency_batch)
    attack_set = ensure_attackset(run.directory, data, base / "attackset", args.attack_samples, args.seed)
    builds: dict[str, dict[str, Path]] = {}
    reports: dict[str, Any] = {}
    calibrations: dict[str, Any] = {}
    for backend in common.parse_list(args.runtimes):
        target = calibrate_target(backend)
        int8 = ensure_calibrate(export.directory, base / f"calibrate-{target}", data, args.calib_samples,
                                args.parity_samples, target=target)
        calibrations[target] = {"metrics": int8.manifest.get("metrics"), "seconds": int8.seconds}
        builds[backend] = {"fp32": ensure_build(export.directory, base / f"build-fp32-{backend}", args.threads,
                                                backend=backend).directory,
                           "int8": ensure_build(int8.directory, base / f"build-int8-{backend}", args.threads,
                                                backend=backend).directory}
        for precision, directory in builds[backend].items():
            report = verify(directory, attack_set.directory, base / f"verify-{precision}-{backend}", args, backend)
            reports[f"{backend}/{precision}"] = verify_summary(report)
    return {"builds": builds, "verify": reports, "calibrate": calibrations,
            "parity": export.manifest.get("parity"), "attackset": attackset_summary(attack_set)}


def verify_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one verify report the table needs."""
    runtime = report["metrics"]["runtime"]
    square = runtime.get("square") or {}
    return {"passed": report["passed"], "failed_checks": report["failed_checks"],
            "clean_acc": runtime["clean_acc"], "worst_case_robust_acc": runtime.get("worst_case_robust_acc"),
            "square_robust_acc": square.get("robust_acc"), "agreement": runtime.get("agreement"),
            "warnings": report.get("warnings")}


def attackset_summary(run: StageRun) -> dict[str, Any]:
    block = run.manifest.get("set") or {}
    return {"n": block.get("n"), "suite": block.get("suite"), "robust_acc": (run.manifest.get("metrics") or {})
            .get("robust_acc")}


def bench_builds(builds: dict[str, dict[str, dict[str, Path]]], args: argparse.Namespace) -> dict[str, Any]:
    """{model: {backend/precision: {batch: {p50_ms, rounds_p50_ms}}}}: one interleaved run over every build."""
    from benchmarks.deploy_speed import bench_rounds

    flat = {f"{model}|{backend}": per for model, by_backend in builds.items() for backend, per in by_backend.items()}
    timed = bench_rounds(flat, argparse.Namespace(batch_sizes=args.batch_sizes, rounds=args.rounds, iters=args.iters,
                                                  warmup=args.warmup, threads=args.threads, seed=args.seed))
    out: dict[str, dict[str, Any]] = {}
    for key, per_precision in timed.items():
        model, backend = key.split("|", 1)
        for precision, cells in per_precision.items():
            out.setdefault(model, {})[f"{backend}/{precision}"] = cells
    return out


def speedups(latency: dict[str, Any], model: str, batch: str) -> dict[str, Any]:
    """Per build of `model`: speedup vs the dense model's same build, and vs the dense model's fastest build."""
    dense = latency["dense"]
    best_key = min(dense, key=lambda k: dense[k][batch]["p50_ms"])
    best = dense[best_key][batch]["p50_ms"]
    return {"vs_same": {k: dense[k][batch]["p50_ms"] / cells[batch]["p50_ms"] for k, cells in latency[model].items()},
            "vs_dense_best": {k: best / cells[batch]["p50_ms"] for k, cells in latency[model].items()},
            "dense_best": best_key}


# ------------------------------------------------------------------------------------------ parts


def ensure_dense_table(dense: StageRun, work: Path, args: argparse.Namespace) -> Path:
    from benchmarks.latency_budget import ensure_table

    return ensure_table(dense.directory, work / "table.json", [args.latency_batch], args.threads)


def profile_part(dense: StageRun, work: Path, data: str, args: argparse.Namespace) -> dict[str, Any]:
    """Table, reachable ratios, the dense model deployed and timed."""
    from benchmarks.latency_budget import reachable_ratios
    from cstar.checkpoint import load_checkpoint
    from cstar.latency_table import LatencyTable

    with common.stopwatch() as clock:
        table_path = ensure_dense_table(dense, work, args)
        table = LatencyTable.load(table_path)
        model, _ = load_checkpoint(dense.directory)
        reach = reachable_ratios(model, table, args.latency_batch, (3, 32, 32), common.parse_list(args.methods),
                                 args.hybrid_prune_share)
        deployed = deploy_model(dense, work, table_path, data, args)
        latency = bench_builds({"dense": deployed["builds"]}, args)
    return {"dense": dense_row(dense), "table": {**table.describe(), "path": str(table_path),
                                                 "model_ms": table.model_ms(args.latency_batch)},
            "reachable": reach, "deploy": {k: v for k, v in deployed.items() if k != "builds"},
            "latency": latency["dense"], "seconds": clock["seconds"]}


def dense_row(dense: StageRun) -> dict[str, Any]:
    metrics = dense.manifest["metrics"]
    return {"clean_acc": metrics["clean_acc"], "robust_acc": metrics["robust_acc"], "n": metrics["n"],
            "pgd20_robust_acc": metrics.get("pgd20_robust_acc"), "params": dense.manifest["params"],
            "flops": dense.manifest["flops"], "suite": (metrics.get("attack") or {}).get("suite")}


def compress_extra(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe every method gets (CompressConfig overrides)."""
    return {"train_method": args.train_method, "batch_size": args.batch_size, "eval_limit": args.eval_limit,
            "hybrid_prune_share": args.hybrid_prune_share}


def compress_part(dense: StageRun, work: Path, data: str, target: float, seed: int,
                  args: argparse.Namespace) -> dict[str, Any]:
    """Every method at `target` with `seed`: compress, deploy, then one interleaved bench with the dense builds."""
    from benchmarks.latency_budget import ensure_latency_compress

    with common.stopwatch() as clock:
        table_path = ensure_dense_table(dense, work, args)
        dense_deploy = deploy_model(dense, work, table_path, data, args)
        rows, errors, builds = [], [], {"dense": dense_deploy["builds"]}
        compress_args = argparse.Namespace(admm_epochs=args.admm_epochs, finetune_epochs=args.finetune_epochs,
                                           seed=seed, quick=False, latency_batch=args.latency_batch,
                                           threads=args.threads)
        for method in common.parse_list(args.methods):
            made = ensure_latency_compress(dense, work / "compress", table_path, method, target, seed, compress_args,
                                           compress_extra(args))
            if isinstance(made, str):
                errors.append({"method": method, "target": target, "seed": seed, "error": made})
                continue
            deployed = deploy_model(made, work, table_path, data, args)
            builds[made.directory.name] = deployed["builds"]
            rows.append({"model": made.directory.name, "method": method, "target": target, "seed": seed,
                         **compress_row(made), "deploy": {k: v for k, v in deployed.items() if k != "builds"}})
        latency = bench_builds(builds, args)
        batch = str(args.latency_batch)
        for row in rows:
            row["latency"] = latency[row["model"]]
            row["speedup"] = speedups(latency, row["model"], batch)
    return {"target": target, "seed": seed, "rows": rows, "errors": errors, "dense_latency": latency["dense"],
            "seconds": clock["seconds"]}


def compress_row(run: StageRun) -> dict[str, Any]:
    """Accuracy, ratios and predicted latency of one compress run (its manifest's test metrics)."""
    manifest = run.manifest
    metrics, record = manifest["metrics"], manifest.get("latency") or {}
    return {"clean_acc": metrics["clean_acc"], "robust_acc": metrics["robust_acc"], "n": metrics["n"],
            "pgd20_robust_acc": metrics.get("pgd20_robust_acc"), "suite": (metrics.get("attack") or {}).get("suite"),
            "params_ratio": manifest["compression"]["params_ratio"],
            "flops_ratio": manifest["compression"]["flops_ratio"], "predicted_ms": record.get("predicted_ms"),
            "predicted_speedup": record.get("predicted_speedup"), "compress_seconds": run.seconds or timing_of(
                run.directory)}


# ------------------------------------------------------------------------------------------ report


def part_files(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every finished part's result payload, by part name."""
    found = {}
    for name in part_names(args):
        path = common.results_dir(args.quick, args.results_dir) / f"{BENCHMARK}_{name}.json"
        if path.is_file():
            found[name] = read_json(path)
    return found


def summary_rows(parts: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per (target, method): mean +- std over the finished seeds of clean, robust, PGD-20, p50 and speedups."""
    from benchmarks.latency_budget import summarize as mean_std

    batch = str(args.latency_batch)
    rows = [r for p in parts.values() for r in p.get("rows", [])]
    out = []
    for target in common.parse_list(args.targets, float):
        for method in common.parse_list(args.methods):
            mine = [r for r in rows if r["method"] == method and r["target"] == target]
            if not mine:
                continue
            keys = sorted(mine[0]["latency"])
            out.append({"method": method, "target": target, "n_seeds": len(mine), "suite": mine[0].get("suite"),
                        "seeds": sorted(r["seed"] for r in mine),
                        "clean": mean_std([r["clean_acc"] for r in mine]),
                        "robust": mean_std([r["robust_acc"] for r in mine]),
                        "pgd20": mean_std([r["pgd20_robust_acc"] for r in mine if r["pgd20_robust_acc"] is not None]
                                          or [float("nan")]),
                        "p50_ms": {k: mean_std([r["latency"][k][batch]["p50_ms"] for r in mine]) for k in keys},
                        "speedup_vs_same": {k: mean_std([r["speedup"]["vs_same"][k] for r in mine]) for k in keys},
                        "speedup_vs_dense_best": {k: mean_std([r["speedup"]["vs_dense_best"][k] for r in mine])
                                                  for k in keys},
                        "runtime_worst_case": {k: mean_std([r["deploy"]["verify"][k]["worst_case_robust_acc"]
                                                            for r in mine]) for k in keys}})
    return out


def report_part(args: argparse.Namespace, plot_path: Path) -> dict[str, Any]:
    """Collect the finished parts; winners per target; the Pareto plot."""
    from benchmarks.latency_budget import pareto_plot, winners

    parts = part_files(args)
    missing = [name for name in part_names(args) if name not in parts]
    summary = summary_rows(parts, args)
    targets = common.parse_list(args.targets, float)
    wins = winners(summary, targets)
    profile = parts.get("profile")
    batch = str(args.latency_batch)
    headline = common.parse_list(args.runtimes)[0] + "/fp32"
    dense = {**(profile or {}).get("dense", {}), "p50_ms": {batch: profile["latency"][headline][batch]["p50_ms"]}} \
        if profile else None
    rows = [{**r, "p50_ms": {batch: r["latency"][headline][batch]["p50_ms"]}} for p in parts.values()
            for r in p.get("rows", [])]
    plot_rows = [{**s, "p50_ms": s["p50_ms"][headline]} for s in summary]
    if dense and rows:
        pareto_plot({"methods": common.parse_list(args.methods), "rows": rows, "summary": plot_rows, "dense": dense,
                     "latency_batch": args.latency_batch, "threads": args.threads}, plot_path)
    return {"parts_done": sorted(parts), "parts_missing": missing, "summary": summary, "winners": wins,
            "dense": dense, "profile": profile and {k: profile[k] for k in ("table", "reachable", "latency")},
            "headline_build": headline, "plot": plot_path.name if dense and rows else None,
            "part_commits": {name: p.get("git", {}).get("commit") for name, p in parts.items()},
            "paper_claim": "Phan et al. (AAAI 2023), CIFAR-10 ResNet-18 width 64, GPU regime: CSTAR keeps 11.91 "
                           "robust points more than robust structured pruning at the same compression (the "
                           "paper's number, not measured here)"}


# ------------------------------------------------------------------------------------------ plan


def plan(args: argparse.Namespace, dense_manifest: dict[str, Any]) -> dict[str, Any]:
    """Estimated seconds per part: epochs x the dense model's measured seconds per epoch (1 thread), plus the
    fixed per-model cost, scaled by --torch-threads."""
    speed = THREAD_SPEEDUP.get(args.torch_threads, THREAD_SPEEDUP[2])
    epoch = float(dense_manifest.get("train_seconds") or 0) / max(1, int(dense_manifest["config"]["epochs"]))
    per_model = ((args.admm_epochs + args.finetune_epochs) * epoch * EPOCH_FACTOR + COMPRESS_OVERHEAD_SECONDS
                 + DEPLOY_SECONDS_PER_MODEL) / speed
    parts = {"profile": PROFILE_SECONDS / speed}
    methods = len(common.parse_list(args.methods))
    for name in part_names(args)[1:]:
        parts[name] = methods * per_model
    total = sum(parts.values())
    return {"dense_epoch_seconds": epoch, "torch_threads": args.torch_threads, "per_model_seconds": per_model, "parts": parts, "total_seconds": total,
            "budget_seconds": args.budget_hours * 3600, "fits": total <= args.budget_hours * 3600
            and max(parts.values()) <= PART_LIMIT_SECONDS}


# ------------------------------------------------------------------------------------------ markdown


def _ms(cell: dict[str, float]) -> str:
    return f"{cell['mean']:.2f} +- {cell['std']:.2f}"


def _pm(cell: dict[str, float]) -> str:
    return f"{100 * cell['mean']:.1f} +- {100 * cell['std']:.1f}"


def render_part(payload: dict[str, Any]) -> str:
    """Markdown of one part."""
    lines = [f"# CIFAR-10 on CPU: part {payload['part']}", ""]
    if payload["part"] == "profile":
        dense = payload["dense"]
        lines += [f"Dense: clean {common.pct(dense['clean_acc'])}, {dense['suite']} robust {common.pct(dense['robust_acc'])}, "
                  f"PGD-20 {common.pct(dense['pgd20_robust_acc'])} on {dense['n']} test images.", ""]
        lines += ["Best reachable latency ratio: " + ", ".join(
            f"{m} {r['best']}x" for m, r in payload["reachable"].items()), ""]
        lines.append(common.markdown_table(["build", "p50 ms per batch", "verify", "runtime worst case"], [
            [k, ", ".join(f"b{b}: {c['p50_ms']:.3f}" for b, c in cells.items()),
             "PASS" if payload["deploy"]["verify"][k]["passed"] else "FAIL",
             common.pct(payload["deploy"]["verify"][k]["worst_case_robust_acc"])] for k, cells in payload["latency"].items()]))
        return "\n".join(lines)
    batch = str(payload["latency_batch"])
    rows = []
    for r in payload["rows"]:
        for k in sorted(r["latency"]):
            rows.append([r["method"], k, common.pct(r["clean_acc"]), common.pct(r["robust_acc"]), common.pct(r["pgd20_robust_acc"]),
                         common.pct(r["deploy"]["verify"][k]["worst_case_robust_acc"]),
                         f"{r['latency'][k][batch]['p50_ms']:.3f}", f"{r['speedup']['vs_same'][k]:.2f}x",
                         f"{r['speedup']['vs_dense_best'][k]:.2f}x",
                         "PASS" if r["deploy"]["verify"][k]["passed"] else "FAIL"])
    suite = next((r["suite"] for r in payload["rows"] if r.get("suite")), "attack suite")
    lines.append(common.markdown_table(["method", "build", "clean", f"robust ({suite}, PyTorch)", "PGD-20 (PyTorch)",
                                 "runtime worst case (transfer + Square)",
                                 f"p50 ms b{batch}", "speedup vs dense same build", "vs dense best", "verify"], rows))
    for error in payload["errors"]:
        lines += ["", f"- {error['method']}: {error['error']}"]
    return "\n".join(lines)


def render_report(payload: dict[str, Any]) -> str:
    """Markdown of the collected table."""
    headline = payload["headline_build"]
    lines = ["# CIFAR-10 on CPU: CSTAR vs pruning at equal measured latency", "",
             f"Parts done: {', '.join(payload['parts_done']) or 'none'}; missing: "
             f"{', '.join(payload['parts_missing']) or 'none'}.", ""]
    if payload["dense"]:
        d = payload["dense"]
        lines += [f"Dense PreAct-ResNet-18 w16: clean {common.pct(d['clean_acc'])}, robust {common.pct(d['robust_acc'])} "
                  f"({d['suite']}), PGD-20 {common.pct(d['pgd20_robust_acc'])}, {headline} p50 "
                  f"{next(iter(d['p50_ms'].values())):.3f} ms.", ""]
    rows = []
    for s in payload["summary"]:
        for k in sorted(s["p50_ms"]):
            rows.append([f"{s['target']:g}x", s["method"], s["n_seeds"], _pm(s["clean"]), _pm(s["robust"]),
                         _pm(s["pgd20"]), _pm(s["runtime_worst_case"][k]), k, _ms(s["p50_ms"][k]),
                         f"{s['speedup_vs_same'][k]['mean']:.2f}x", f"{s['speedup_vs_dense_best'][k]['mean']:.2f}x"])
    suite = next((s["suite"] for s in payload["summary"] if s.get("suite")), "attack suite")
    lines.append(common.markdown_table(["target", "method", "seeds", "clean", f"robust ({suite}, PyTorch)", "PGD-20",
                                 "runtime worst case (transfer + Square)", "build", "p50 ms", "speedup vs dense same build",
                                 "vs dense best"], rows))
    lines.append("")
    for w in payload["winners"]:
        lead = "" if w["lead"] is None else (f" by {100 * w['lead']:.1f} points over {w['runner_up']}; "
                                             f"{'exceeds' if w['exceeds_std'] else 'within'} the seed spread "
                                             f"({100 * w['std']:.1f})")
        lines.append(f"- {w['target']:g}x: {w['winner']} leads{lead}")
    lines += ["", f"Paper's claim (not measured here): {payload['paper_claim']}."]
    if payload["plot"]:
        lines += ["", f"![Pareto]({payload['plot']})"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run one part (or the plan, or the report) and write its result files."""
    common.setup_torch(args.torch_threads)
    if args.plan:
        estimate = plan(args, read_json(Path(args.dense) / "manifest.json"))
        for name, seconds in estimate["parts"].items():
            print(f"{name:12s} ~{seconds / 60:5.0f} min")
        print(f"total ~{estimate['total_seconds'] / 3600:.1f} h of {args.budget_hours:g} h with "
              f"{args.torch_threads} torch thread(s) "
              f"({'fits' if estimate['fits'] else 'does NOT fit'}; parts <= 2 h)")
        return estimate
    work = Path(args.work) / ("quick" if args.quick else "full")
    stem = f"{BENCHMARK}_{args.part}" if args.part != "report" else BENCHMARK
    if args.part == "report":
        payload = report_part(args, common.results_dir(args.quick, args.results_dir) / f"{BENCHMARK}.png")
        common.write_results(stem, payload, render_report(payload), args.quick, args.results_dir, args.allow_dirty)
        return payload
    data_dir = data_directory(args.data, Path(args.work))
    dense = localized_dense(Path(args.dense), work / "dense", data_dir)
    settings = {k: getattr(args, k) for k in ("methods", "runtimes", "latency_batch", "batch_sizes", "threads",
                                              "admm_epochs", "finetune_epochs", "train_method", "batch_size",
                                              "eval_limit", "attack_samples", "calib_samples", "parity_samples",
                                              "square_queries", "square_samples", "iters", "rounds")}
    dense_info = {"dir": "benchmarks/models/" + Path(args.dense).name if Path(args.dense).resolve() == SHIPPED_DENSE
                  else Path(args.dense).name, "weights_sha256": dense.manifest["weights"]["sha256"]}
    if args.part == "profile":
        body = profile_part(dense, work, data_arg(data_dir), args)
    else:
        found = PART_PATTERN.match(args.part)
        assert found is not None
        body = compress_part(dense, work, data_arg(data_dir), float(found.group(1)), int(found.group(2)), args)
    payload = {"part": args.part, "settings": settings, "dense_model": dense_info,
               "data": "CIFAR-10 (JPEG copy)" if "jpeg" in args.data.lower() else "CIFAR-10",
               "latency_batch": args.latency_batch, "machine": common.machine_info(args.threads), **body}
    json_path, _ = common.write_results(stem, payload, render_part(payload), args.quick, args.results_dir, args.allow_dirty)
    common.log(f"part {args.part} done in {body['seconds'] / 60:.1f} min -> {json_path}")
    return payload


def main(argv: list[str] | None = None) -> int:
    """Entry point (--plan reads no results and writes none, so it runs from any tree)."""
    argv = sys.argv[1:] if argv is None else argv
    argv = [*argv, "--allow-dirty"] if "--plan" in argv and "--allow-dirty" not in argv else argv
    return common.run_cli(__doc__, add_arguments, run, resolve_defaults, argv)


if __name__ == "__main__":
    raise SystemExit(main())
