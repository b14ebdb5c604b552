"""Deployed latency on ONNX Runtime CPU: dense vs CSTAR vs robust pruning, FP32 and INT8.

Per model: export -> build ort-cpu (FP32); calibrate (INT8 Q/DQ) -> build ort-cpu (INT8); then p50
latency at batch 1 and 64 (deploy.bench, median over rounds that interleave the models so load drift
hits every model alike). speedup = dense p50 / model p50 (same precision); the limit is the FLOPs
ratio; measured/limit says how much of the FLOPs saving the runtime turns into time. Also compares
hardware-aware ranks (CSTAR `rank_step` 1 vs 8) at one ratio, for latency and accuracy.

    python benchmarks/deploy_speed.py [--quick] [--from-table-dir benchmarks/work/digits]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import (  # noqa: E402
    StageRun,
    compressed_set,
    ensure_build,
    ensure_calibrate,
    ensure_compress,
    ensure_export,
    resolve_dense,
    timing_of,
)

BENCHMARK = "deploy_speed"
PRECISIONS = ("fp32", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--from-table-dir", default=None,
                        help="work directory of compression_table (its compress/ runs are reused; default: --work)")
    parser.add_argument("--ratios", default=None, help="params ratios (default 4,8,16; quick 8)")
    parser.add_argument("--methods", default="cstar,prune", help="compress methods (default cstar,prune)")
    parser.add_argument("--admm-epochs", type=int, default=None, help="for compress runs made here (quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="for compress runs made here (quick 0)")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes (default 1,64)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per batch size (100; quick 20)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed warm-up iterations")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (3; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1; 0 = ORT's)")
    parser.add_argument("--calib-samples", type=int, default=None, help="INT8 calibration images (256; quick 64)")
    parser.add_argument("--parity-samples", type=int, default=None, help="calibrate's eval images (200; quick 50)")
    parser.add_argument("--rank-step", type=int, default=8, help="hardware-aware rank step compared with 1 (0 = skip)")
    parser.add_argument("--rank-step-ratio", type=float, default=8.0, help="ratio of the rank-step comparison")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/full defaults left as None."""
    quick = args.quick
    args.ratios = args.ratios or ("8" if quick else "4,8,16")
    args.iters = args.iters or (20 if quick else 100)
    args.rounds = args.rounds or (1 if quick else 3)
    args.calib_samples = args.calib_samples or (64 if quick else 256)
    args.parity_samples = args.parity_samples or (50 if quick else 200)
    common.quick_epochs(args)
    args.threads = args.threads or None
    return args


# ------------------------------------------------------------------------------------------- models


def rank_step_supported() -> bool:
    """Whether cstar compress has a rank-rounding option (CompressConfig.rank_step)."""
    from cstar.compress import CompressConfig

    return "rank_step" in {f.name for f in dataclasses.fields(CompressConfig)}


def rank_step_run(dense: StageRun, compress_root: Path, args: argparse.Namespace) -> StageRun | None:
    """CSTAR at --rank-step-ratio with rank_step = --rank-step, otherwise the rank_step-1 run's config."""
    if not args.rank_step or args.rank_step == 1 or not rank_step_supported():
        return None
    config = {**common.own_compress_config(args), "rank_step": args.rank_step}
    return ensure_compress(dense.directory, compress_root, "cstar", args.rank_step_ratio, config)


def model_set(args: argparse.Namespace, root: Path) -> tuple[StageRun, dict[str, StageRun], StageRun | None]:
    """(dense, {key: compress run}, rank-step run or None)."""
    dense = resolve_dense(args, root)
    table_root = Path(args.from_table_dir) if args.from_table_dir else root
    compress_root = table_root / "compress"
    runs = compressed_set(dense.directory, compress_root, common.parse_list(args.methods), common.parse_list(args.ratios, float),
                          common.own_compress_config(args))
    if args.rank_step and args.rank_step != 1 and f"cstar-x{args.rank_step_ratio:g}" not in runs:
        runs.update(compressed_set(dense.directory, compress_root, ["cstar"], [args.rank_step_ratio],
                                   common.own_compress_config(args)))
    return dense, runs, rank_step_run(dense, compress_root, args)


def build_artifacts(source: StageRun, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """export, calibrate and the two ort-cpu builds of one model; returns dirs and stage seconds."""
    export = ensure_export(source.directory, out / "onnx")
    fp32 = ensure_build(export.directory, out / "fp32-ort-cpu", args.threads)
    int8 = ensure_calibrate(export.directory, out / "int8", args.data, args.calib_samples, args.parity_samples)
    int8_build = ensure_build(int8.directory, out / "int8-ort-cpu", args.threads)
    return {"builds": {"fp32": fp32.directory, "int8": int8_build.directory},
            "stages": {name: run.describe() for name, run in
                       (("export", export), ("build_fp32", fp32), ("calibrate", int8), ("build_int8", int8_build))},
            "int8_metrics": int8.manifest.get("metrics"), "parity": export.manifest.get("parity")}


# ------------------------------------------------------------------------------------------- timing


def bench_rounds(builds: dict[str, dict[str, Path]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Interleaved rounds of deploy.bench over every (model, precision); p50 median over rounds."""
    from deploy.bench import bench_artifact

    sizes = common.parse_list(args.batch_sizes, int)
    samples: dict[str, dict[str, dict[int, list[float]]]] = {}
    for round_index in range(args.rounds):
        common.log(f"bench round {round_index + 1}/{args.rounds}")
        for key, per_precision in builds.items():
            for precision, directory in per_precision.items():
                result = bench_artifact(directory, None, sizes, args.iters, args.warmup, args.threads, args.seed)
                slot = samples.setdefault(key, {}).setdefault(precision, {})
                for row in result["results"]:
                    slot.setdefault(int(row["batch_size"]), []).append(float(row["p50_ms"]))
    return {key: {precision: {str(size): {"p50_ms": statistics.median(values), "rounds_p50_ms": values}
                              for size, values in per_size.items()}
                  for precision, per_size in per_precision.items()}
            for key, per_precision in samples.items()}


# --------------------------------------------------------------------------------------------- rows


def model_info(key: str, run: StageRun, dense: StageRun) -> dict[str, Any]:
    """params, FLOPs, ratios and accuracy of one model (from its train/compress manifest)."""
    manifest = run.manifest
    params, flops = int(manifest["params"]), int(manifest["flops"])
    metrics = manifest.get("metrics") or {}
    config = manifest.get("config") or {}
    return {"model": key, "method": manifest.get("method", "dense"), "dir": str(run.directory),
            "rank_step": int(config.get("rank_step", 1)) if manifest["stage"] == "compress" else None,
            "params": params, "flops": flops, "params_ratio": int(dense.manifest["params"]) / params,
            "flops_ratio": int(dense.manifest["flops"]) / flops, "clean_acc": metrics.get("clean_acc"),
            "pgd_robust_acc": metrics.get("robust_acc"), "accuracy_n": metrics.get("n")}


def speed_rows(infos: dict[str, dict[str, Any]], latency: dict[str, dict[str, Any]],
               sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (model, precision) with p50, speedup vs dense (same precision) and measured/limit."""
    rows = []
    for precision in PRECISIONS:
        dense = latency["dense"][precision]
        for key, info in infos.items():
            row = {**info, "precision": precision, "batch": {}}
            for size in sizes:
                p50 = latency[key][precision][str(size)]["p50_ms"]
                speedup = dense[str(size)]["p50_ms"] / p50
                row["batch"][str(size)] = {"p50_ms": p50, "speedup": speedup,
                                           "of_limit": speedup / info["flops_ratio"],
                                           "rounds_p50_ms": latency[key][precision][str(size)]["rounds_p50_ms"]}
            rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ markdown


def speed_markdown(rows: list[dict[str, Any]], sizes: list[int]) -> str:
    """Latency table: one line per model and precision."""
    headers = ["model", "precision", "params ratio", "FLOPs ratio (limit)"]
    for size in sizes:
        headers += [f"p50 b{size} (ms)", f"speedup b{size}", f"measured/limit b{size}"]
    body = []
    for row in rows:
        line = [row["model"], row["precision"].upper(), f"{row['params_ratio']:.2f}x", f"{row['flops_ratio']:.2f}x"]
        for size in sizes:
            cell = row["batch"][str(size)]
            line += [f"{cell['p50_ms']:.3f}", f"{cell['speedup']:.2f}x", f"{cell['of_limit']:.2f}"]
        body.append(line)
    return common.markdown_table(headers, body)


def rank_step_markdown(block: dict[str, Any], rows: list[dict[str, Any]], sizes: list[int]) -> str:
    """rank_step 1 vs N at one ratio: ranks, FLOPs, accuracy, latency."""
    if not block.get("available"):
        return f"Hardware-aware ranks: {block.get('reason')}\n"
    chosen = [r for r in rows if r["model"] in block["models"]]
    headers = ["model", "rank step", "precision", "params ratio", "FLOPs ratio", "clean %", "robust % (apgd worst case)"]
    headers += [f"p50 b{s} (ms)" for s in sizes]
    body = [[r["model"], str(r["rank_step"]), r["precision"].upper(), f"{r['params_ratio']:.2f}x",
             f"{r['flops_ratio']:.2f}x", common.pct(r["clean_acc"]), common.pct(r["pgd_robust_acc"])]
            + [f"{r['batch'][str(s)]['p50_ms']:.3f}" for s in sizes] for r in chosen]
    return common.markdown_table(headers, body)


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    cfg, sizes = payload["config"], payload["config"]["batch_sizes"]
    head = (f"## Deployed latency, ONNX Runtime CPU ({payload['data']})\n\n"
            f"p50 over {cfg['iters']} timed calls ({cfg['warmup']} warm-up), median of {cfg['rounds']} interleaved "
            f"rounds; ORT intra-op threads {cfg['threads'] or 'default'}. speedup = dense p50 / p50 at the same "
            "precision; limit = FLOPs ratio; measured/limit = speedup / FLOPs ratio.\n\n")
    step = payload["rank_step"]
    title = f"\n### Hardware-aware ranks (CSTAR x{step.get('ratio', 0):g}, rank_step 1 vs {step.get('step')})\n\n"
    return head + speed_markdown(payload["rows"], sizes) + title + rank_step_markdown(step, payload["rows"], sizes)


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, bench and write the results; returns the payload."""
    common.setup_torch(args.torch_threads)
    machine = common.machine_info(args.threads)
    root = common.work_root(args.data, args.quick, args.work)
    with common.stopwatch() as total:
        dense, runs, stepped = model_set(args, root)
        sources = {"dense": dense, **runs, **({f"cstar-x{args.rank_step_ratio:g}-step{args.rank_step}": stepped}
                                               if stepped is not None else {})}
        artifacts = {key: build_artifacts(run, root / "artifacts" / run.directory.name, args)
                     for key, run in sources.items()}
        latency = bench_rounds({key: a["builds"] for key, a in artifacts.items()}, args)
    sizes = common.parse_list(args.batch_sizes, int)
    infos = {key: model_info(key, run, dense) for key, run in sources.items()}
    for key, info in infos.items():
        info["stages"] = artifacts[key]["stages"]
        info["int8_metrics"] = artifacts[key]["int8_metrics"]
        info["compress_seconds"] = timing_of(sources[key].directory)
    rows = speed_rows(infos, latency, sizes)
    step_key = f"cstar-x{args.rank_step_ratio:g}"
    rank_block: dict[str, Any] = {"ratio": args.rank_step_ratio, "step": args.rank_step,
                                  "available": stepped is not None}
    if stepped is not None:
        rank_block["models"] = [step_key, f"{step_key}-step{args.rank_step}"]
        rank_block["how"] = "cstar compress --rank-step N (CompressConfig.rank_step)"
    else:
        rank_block["reason"] = ("not available: cstar compress has no rank-rounding option" if not rank_step_supported()
                                else "skipped (--rank-step 0 or 1)")
    payload = {"machine": machine, "data": args.data, "dense_dir": str(dense.directory),
               "config": {"batch_sizes": sizes, "iters": args.iters, "warmup": args.warmup, "rounds": args.rounds,
                          "threads": args.threads, "calib_samples": args.calib_samples,
                          "parity_samples": args.parity_samples, "backend": "ort-cpu",
                          "torch_threads": args.torch_threads},
               "rows": rows, "rank_step": rank_block, "seconds": round(total["seconds"], 1)}
    return common.publish(common.result_name(BENCHMARK, args.data), payload, render(payload), args, total['seconds'])


main = common.entry_point(__doc__, add_arguments, run, resolve_defaults)


if __name__ == "__main__":
    sys.exit(main())
