"""One model set on every CPU runtime: accuracy re-verified per runtime, latency per runtime and precision.

A (the --data set, digits by default): dense, CSTAR and prune at --ratio (the compress runs the other
scripts use, reused when their reuse check passes), each exported once and, per runtime of --backends
(ort-cpu, openvino-cpu, executorch-xnnpack; one that cannot run here is skipped with the registry's
reason), built FP32 and INT8 (`cstar calibrate --target` of that runtime: U8S8 Q/DQ for ort-cpu and
openvino, a PT2E XNNPACK program for executorch). Every build is verified (`cstar verify`) against ONE
attack set per model crafted on its PyTorch reference: clean, PGD-20 and FGSM transfer, Square on the
runtime itself, worst case, agreement with the reference. INT8 ok = clean within 1 point of the same
runtime's FP32 and agreement >= 0.98. p50 latency at each batch size with 1 thread and with every core
(rounds interleave every artifact of one thread setting, deploy_speed.bench_rounds).

B (CIFAR-10 shapes, 3x32x32, random weights: latency only): the registry's ResNet-18, CSTAR and
prune at --cifar-ratio FLOPs as STRUCTURE only (the compress stage's allocation + Tucker-2
factorization and channel pruning, no training), exported, calibrated on random [0,1] images, built
FP32 and INT8 per runtime, p50 at 1 thread. Names the fastest runtime/precision per model and the
headline: the best compressed deployment's speedup over the dense model on the dense model's best
runtime/precision; and ORT CPU INT8 vs FP32 on the dense model (the CPU and its VNNI flags stated).

    python benchmarks/cross_runtime.py [--quick] [--backends ort-cpu,openvino-cpu,executorch-xnnpack]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import (  # noqa: E402
    Expect,
    StageRun,
    check_reusable,
    compressed_set,
    ensure_attackset,
    ensure_build,
    ensure_calibrate,
    ensure_export,
    read_json,
    resolve_dense,
    run_or_reuse,
)
from cstar.errors import CstarError  # noqa: E402

BENCHMARK = "cross_runtime"
PRECISIONS = ("fp32", "int8")
DEFAULT_BACKENDS = "ort-cpu,openvino-cpu,executorch-xnnpack"
QUICK_BACKENDS = "ort-cpu,openvino-cpu"  # executorch's PT2E calibration alone takes ~15 s per model here
TEST_IMAGES_PER_CLASS = 1  # part B's test split: export parity and calibrate's eval run PGD-20 on all of it
INT8_MAX_CLEAN_DROP = 0.01  # the "INT8 within 1 point of FP32 clean accuracy"
INT8_MIN_AGREEMENT = 0.98
REFERENCE = ("ort-cpu", "fp32")  # the "vs dense FP32 ORT" column
VNNI_FLAGS = ("avx512_vnni", "avx_vnni")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--backends", default=None,
                        help=f"runtimes (default {DEFAULT_BACKENDS}; quick {QUICK_BACKENDS}); one that cannot run "
                             "here is skipped with its reason")
    parser.add_argument("--from-table-dir", default=None,
                        help="work directory of compression_table (its compress/ runs are reused; default: --work)")
    parser.add_argument("--ratio", type=float, default=8.0, help="params ratio of the compressed models (default 8)")
    parser.add_argument("--methods", default="cstar,prune", help="compress methods (default cstar,prune)")
    parser.add_argument("--admm-epochs", type=int, default=None, help="for compress runs made here (quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="for compress runs made here (quick 0)")
    parser.add_argument("--samples", type=int, default=None, help="attack set size, stratified (200; quick 50)")
    parser.add_argument("--square-queries", type=int, default=None, help="Square queries (1000; quick 20)")
    parser.add_argument("--square-samples", type=int, default=None, help="examples Square attacks (200; quick 20)")
    parser.add_argument("--square-p-init", type=float, default=0.8, help="Square initial square fraction")
    parser.add_argument("--calib-samples", type=int, default=None, help="INT8 calibration images (256; quick 64)")
    parser.add_argument("--parity-samples", type=int, default=None, help="calibrate's eval images (200; quick 50)")
    parser.add_argument("--batch-sizes", default="1,64", help="batch sizes of the latency columns (default 1,64)")
    parser.add_argument("--iters", type=int, default=None, help="timed iterations per batch size (100; quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up iterations (10; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds, median taken (3; quick 1)")
    parser.add_argument("--threads", type=int, default=1, help="the single-thread setting (default 1)")
    parser.add_argument("--all-threads", type=int, default=None,
                        help="the every-core setting (default: the CPUs this process may use)")
    parser.add_argument("--no-cifar", action="store_true", help="skip part B (CIFAR-shape latency)")
    parser.add_argument("--cifar-model", default="resnet18", help="registry model of part B (default resnet18)")
    parser.add_argument("--cifar-width", type=int, default=None, help="its width option (64; quick 8)")
    parser.add_argument("--cifar-ratio", type=float, default=8.0, help="FLOPs ratio of part B's compressed models")
    parser.add_argument("--cifar-batch-sizes", default="1,8", help="part B batch sizes (default 1,8)")
    parser.add_argument("--cifar-iters", type=int, default=None, help="part B timed iterations (30; quick 5)")
    parser.add_argument("--cifar-images", type=int, default=None,
                        help="random training (calibration) images per class written for part B (4; quick 2)")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/full defaults left as None."""
    quick = args.quick
    args.backends = args.backends or (QUICK_BACKENDS if quick else DEFAULT_BACKENDS)
    args.samples = args.samples or (50 if quick else 200)  # as export_robustness: one attack set
    args.square_queries = args.square_queries if args.square_queries is not None else (20 if quick else 1000)
    args.square_samples = args.square_samples or (20 if quick else 200)
    args.calib_samples = args.calib_samples or (64 if quick else 256)  # as deploy_speed: its int8/ is reused
    args.parity_samples = args.parity_samples or (50 if quick else 200)
    args.iters = args.iters or (10 if quick else 100)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    args.rounds = args.rounds or (1 if quick else 3)
    args.all_threads = args.all_threads or cpus_available()
    args.cifar_width = args.cifar_width or (8 if quick else 64)
    args.cifar_iters = args.cifar_iters or (5 if quick else 30)
    args.cifar_images = args.cifar_images or (2 if quick else 4)
    common.quick_epochs(args)
    return args


def cpus_available() -> int:
    """CPUs this process may run on."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else int(os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------ runtimes


def backend_plan(names: list[str]) -> dict[str, dict[str, Any]]:
    """{backend: {available, reason}} from the registry (an unknown name is a CstarError)."""
    from deploy.backends.registry import backend_available

    plan = {}
    for name in names:
        available, reason = backend_available(name)
        plan[name] = {"available": available, "reason": reason}
        if not available:
            common.log(f"skipping {name}: {reason}")
    return plan


def calibrate_dir(base: Path, target: str) -> Path:
    """Where the INT8 model for `target` goes; ort-cpu's is the `int8` the other scripts use."""
    return base / ("int8" if target == "ort-cpu" else f"int8-{target}")


def runtime_builds(export: Path, base: Path, backends: list[str], data: str, calib: tuple[int, int],
                   max_batch: int, threads: int) -> tuple[dict[str, dict[str, Path]], dict[str, Any]]:
    """({backend: {fp32: build dir, int8: build dir}}, {backend: INT8 calibrate metrics and format})."""
    from deploy.backends.registry import CALIBRATE_TARGETS

    builds: dict[str, dict[str, Path]] = {}
    calibration: dict[str, Any] = {}
    for backend in backends:
        target = CALIBRATE_TARGETS[backend]
        int8 = ensure_calibrate(export, calibrate_dir(base, target), data, calib[0], calib[1], target)
        fp32_build = ensure_build(export, base / f"fp32-{backend}", threads, max_batch, backend)
        int8_build = ensure_build(int8.directory, base / f"int8-{backend}", threads, max_batch, backend)
        builds[backend] = {"fp32": fp32_build.directory, "int8": int8_build.directory}
        calibration[backend] = {"target": target, "format": (int8.manifest.get("quantization") or {}).get("format"),
                                "metrics": int8.manifest.get("metrics"), "parity": int8.manifest.get("parity")}
    return builds, calibration


# ------------------------------------------------------------------------------------------ verify


def verify_on(artifact_dir: Path, set_dir: Path, out: Path, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """run_verify of a build on its runtime; a finished report is reused only for the same artifact, attack
    set (sha256), backend and Square budget (export_robustness's check), else StaleWork."""
    from benchmarks.export_robustness import report_expect, report_inputs
    from deploy.verify import run_verify

    report_path = out / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
        expect = report_expect(artifact_dir, set_dir, args)
        check_reusable(out, report, report_inputs(report), Expect(config={**expect.config, "backend": backend}))
        return report
    common.log(f"verify {artifact_dir.parent.name}/{artifact_dir.name} on {backend} (Square {args.square_queries} queries)")
    return run_verify(artifact_dir, set_dir, out, backend=backend, square_queries=args.square_queries,
                      square_samples=args.square_samples, square_p_init=args.square_p_init, seed=args.seed,
                      threads=args.threads, raise_on_fail=False)


def accuracy_of(report: dict[str, Any]) -> dict[str, Any]:
    """The verify report's runtime numbers of one row."""
    runtime = report["metrics"]["runtime"]
    transfer, square = runtime.get("transfer") or {}, runtime.get("square") or {}
    return {"clean_acc": runtime["clean_acc"], "apgd_transfer_robust_acc": transfer.get("apgd_t"),
            "pgd_transfer_robust_acc": transfer.get("pgd"),
            "fgsm_transfer_robust_acc": transfer.get("fgsm"), "square_robust_acc": square.get("robust_acc"),
            "worst_case_robust_acc": runtime.get("worst_case_robust_acc"), "agreement": runtime.get("agreement"),
            "reference_clean_acc": report["metrics"]["reference"]["clean_acc"],
            "verify_passed": report["passed"], "failed_checks": report["failed_checks"],
            "warnings": report.get("warnings")}


def int8_check(fp32: dict[str, Any], int8: dict[str, Any]) -> dict[str, Any]:
    """INT8 ok: clean within 1 point of the same runtime's FP32 and agreement (with the reference) >= 0.98."""
    drop = fp32["clean_acc"] - int8["clean_acc"]
    ok = abs(drop) <= INT8_MAX_CLEAN_DROP + 1e-9 and int8["agreement"] >= INT8_MIN_AGREEMENT
    return {"clean_drop": drop, "ok": bool(ok)}


# ------------------------------------------------------------------------------------------ latency


def timed(builds: dict[str, dict[str, dict[str, Path]]], args: argparse.Namespace, threads: int, sizes: str,
          iters: int) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """{model: {backend: {precision: {batch: {p50_ms, rounds_p50_ms}}}}} at one thread setting, rounds
    interleaved over every artifact (deploy_speed.bench_rounds)."""
    from benchmarks.deploy_speed import bench_rounds

    flat = {f"{model}@{backend}": per for model, by_backend in builds.items() for backend, per in by_backend.items()}
    common.log(f"bench {len(flat) * len(PRECISIONS)} artifacts, {threads} thread(s), batch {sizes}")
    settings = argparse.Namespace(**{**vars(args), "threads": threads, "batch_sizes": sizes, "iters": iters})
    latency = bench_rounds(flat, settings)
    nested: dict[str, dict[str, Any]] = {}
    for key, per_precision in latency.items():
        model, backend = key.split("@", 1)
        nested.setdefault(model, {})[backend] = per_precision
    return nested


def thread_settings(args: argparse.Namespace) -> dict[str, int]:
    """{label: threads}: '1t' and 'all' (the same count when this machine has one CPU)."""
    return {"1t": args.threads, "all": args.all_threads}


# ------------------------------------------------------------------------------------------ part A


def model_artifacts(key: str, run: StageRun, root: Path, args: argparse.Namespace, backends: list[str],
                    max_batch: int) -> dict[str, Any]:
    """Export, attack set, per-runtime builds and their verify reports of one model."""
    base = root / "artifacts" / run.directory.name
    attack_set = ensure_attackset(run.directory, args.data, root / "robustness" / run.directory.name / "attackset",
                                  args.samples, args.seed)
    export = ensure_export(run.directory, base / "onnx")
    builds, calibration = runtime_builds(export.directory, base, backends, args.data,
                                         (args.calib_samples, args.parity_samples), max_batch, args.threads)
    work = root / BENCHMARK / run.directory.name
    reports = {backend: {precision: accuracy_of(verify_on(directory, attack_set.directory,
                                                          work / f"verify-{backend}-{precision}", backend, args))
                         for precision, directory in per.items()}
               for backend, per in builds.items()}
    return {"model": key, "dir": str(run.directory), "params": run.manifest.get("params"),
            "flops": run.manifest.get("flops"), "attackset": str(attack_set.directory), "builds": builds,
            "calibration": calibration, "accuracy": reports}


def speedups(p50: dict[str, dict[str, float]], base: dict[str, dict[str, float]] | None) -> dict[str, Any]:
    """{setting: {batch: base p50 / p50}} (None where there is no base)."""
    return {setting: {size: (base[setting][size] / value if base is not None else None)
                      for size, value in per_size.items()} for setting, per_size in p50.items()}


def p50_table(latency: dict[str, Any], model: str, backend: str, precision: str) -> dict[str, dict[str, float]]:
    """{setting: {batch: p50_ms}} of one artifact from {setting: timed(...)}."""
    return {setting: {size: cell["p50_ms"] for size, cell in by_model[model][backend][precision].items()}
            for setting, by_model in latency.items()}


def accuracy_rows(models: dict[str, dict[str, Any]], latency: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (model, runtime, precision): accuracy, INT8 check, p50 and both speedups."""
    rows = []
    for key, info in models.items():
        for backend, per_precision in info["accuracy"].items():
            for precision, accuracy in per_precision.items():
                p50 = p50_table(latency, key, backend, precision)
                dense_same = p50_table(latency, "dense", backend, precision)
                dense_ort = (p50_table(latency, "dense", *REFERENCE) if REFERENCE[0] in latency["1t"]["dense"]
                             else None)
                check = int8_check(per_precision["fp32"], accuracy) if precision == "int8" else None
                rows.append({"model": key, "backend": backend, "precision": precision, **accuracy,
                             "int8_clean_drop": None if check is None else check["clean_drop"],
                             "int8_ok": None if check is None else check["ok"],
                             "format": info["calibration"][backend]["format"] if precision == "int8" else "fp32",
                             "p50_ms": p50, "rounds_p50_ms": {
                                 setting: {size: cell["rounds_p50_ms"] for size, cell in
                                           by_model[key][backend][precision].items()}
                                 for setting, by_model in latency.items()},
                             "speedup_vs_dense": speedups(p50, dense_same),
                             "speedup_vs_dense_fp32_ort": speedups(p50, dense_ort)})
    return rows


# ------------------------------------------------------------------------------------------ part B


def random_image_tree(directory: Path, per_class: int, seed: int) -> Path:
    """A CIFAR-10 image tree (train/ and test/, 10 class folders) of random RGB images: the data export
    (parity) and calibrate (INT8 ranges from train/) read for part B's random-weight models. Written once."""
    import numpy as np
    from PIL import Image

    marker, wanted = directory / "done.json", {"per_class": per_class, "test_per_class": TEST_IMAGES_PER_CLASS,
                                               "seed": seed}
    if marker.is_file() and read_json(marker) == wanted:
        return directory
    from cstar.manifest import atomic_write_json

    rng = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", TEST_IMAGES_PER_CLASS)):
        for label in range(10):
            folder = directory / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.png"):
                stale.unlink()
            for index in range(count):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{index}.png")
    atomic_write_json(marker, wanted)
    return directory


def structure_models(dense: Any, input_shape: tuple[int, ...], ratio: float) -> dict[str, tuple[Any, dict[str, Any]]]:
    """{key: (model, manifest extras)}: CSTAR (global rank allocation + Tucker-2) and channel pruning to
    `ratio` FLOPs, ends dense, no training: the structures cstar compress would fine-tune
    (cstar.compress.structure)."""
    from cstar.admm import Budget
    from cstar.compress import compress_structure, compression_ratios
    from cstar.ranks import first_and_last

    budget = Budget(ratio, "flops", input_shape, first_and_last(dense))
    made = {method: compress_structure(dense, budget, method) for method in ("cstar", "prune")}
    return {f"{method}-x{ratio:g}flops": (s.model, {"compression": compression_ratios(dense, s.model, input_shape),
                                                     "ranks": s.ranks(dense), "method": method})
            for method, s in made.items()}


def cifar_options(args: argparse.Namespace) -> dict[str, Any]:
    """The part's model options: the registry models' width; none for a model by import path (its defaults,
    num_classes from the data)."""
    from cstar.models import is_import_path

    return {} if is_import_path(args.cifar_model) else {"width": args.cifar_width}


def cifar_checkpoints(root: Path, data: str, args: argparse.Namespace) -> dict[str, StageRun]:
    """dense (random init, seed) and the two structures, as train/compress directories export reads."""
    import torch

    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.data import load_dataset
    from cstar.manifest import file_entry
    from cstar.models import build_model

    spec = load_dataset(data).spec
    options = cifar_options(args)
    config = {"model": args.cifar_model, "options": options, "seed": args.seed, "random_weights": True}
    body = {"eps": spec.default_eps, "norm": "linf", "metrics": {}, "config": config}
    expect = Expect(config={"config.model": args.cifar_model, "config.options": options, "config.seed": args.seed})
    dense_dir = root / "dense"

    def save_dense() -> None:
        torch.manual_seed(args.seed)
        save_checkpoint(dense_dir, build_model(args.cifar_model, spec, **options).eval(), "train", args.cifar_model,
                        options, spec, body)

    runs = {"dense": run_or_reuse(dense_dir, "random-weight dense", save_dense, expect)}
    made: dict[str, tuple[Any, dict[str, Any]]] = {}

    def save(key: str) -> None:
        if not made:  # allocation and pruning only when a structure directory is missing
            made.update(structure_models(load_checkpoint(dense_dir)[0], tuple(spec.input_shape), args.cifar_ratio))
        model, extras = made[key]
        stage_config = {**config, "method": extras["method"], "ratio": args.cifar_ratio, "by": "flops"}
        stage_body = {**body, "compression": extras["compression"], "ranks": extras["ranks"], "config": stage_config,
                      "inputs": [file_entry(dense_dir / "manifest.json")]}
        save_checkpoint(root / key, model, "compress", args.cifar_model, options, spec, stage_body)

    for method in ("cstar", "prune"):
        key = f"{method}-x{args.cifar_ratio:g}flops"
        runs[key] = run_or_reuse(root / key, f"structure {key}", functools.partial(save, key),
                                 Expect(config={**expect.config, "config.ratio": args.cifar_ratio,
                                                "config.method": method}, sources=(dense_dir / "manifest.json",)))
    return runs


def cifar_part(root: Path, args: argparse.Namespace, backends: list[str]) -> dict[str, Any]:
    """Part B: random-weight CIFAR-shape models on every runtime, FP32 and INT8, p50 at 1 thread."""
    tree = random_image_tree(root / "random-images", args.cifar_images, args.seed)
    data = f"cifar10:{tree}"
    runs = cifar_checkpoints(root, data, args)
    sizes = common.parse_list(args.cifar_batch_sizes, int)
    builds, formats = {}, {}
    for key, run in runs.items():
        export = ensure_export(run.directory, root / "artifacts" / key / "onnx")
        calib = (args.cifar_images * 10, TEST_IMAGES_PER_CLASS * 10)
        builds[key], calibration = runtime_builds(export.directory, root / "artifacts" / key, backends, data, calib,
                                                  max(sizes), args.threads)
        formats[key] = {backend: block["format"] for backend, block in calibration.items()}
    latency = timed(builds, args, args.threads, args.cifar_batch_sizes, args.cifar_iters)
    rows = cifar_rows(runs, latency, formats)
    return {"model": args.cifar_model, "options": cifar_options(args), "ratio": args.cifar_ratio,
            "by": "flops", "random_weights": True, "batch_sizes": sizes, "threads": args.threads,
            "iters": args.cifar_iters, "calibration_images": args.cifar_images * 10,
            "models": {key: {"dir": str(run.directory), "params": run.manifest.get("params"),
                             "flops": run.manifest.get("flops"),
                             "flops_ratio": (run.manifest.get("compression") or {}).get("flops_ratio", 1.0)}
                       for key, run in runs.items()},
            "rows": rows, "fastest": fastest_per_model(rows, sizes), "headline": headline(rows, sizes),
            "ort_int8_vs_fp32": ort_int8_ratio(rows, sizes), "cpu": cpu_flags()}


def cifar_rows(runs: dict[str, StageRun], latency: dict[str, Any], formats: dict[str, dict[str, str]]
               ) -> list[dict[str, Any]]:
    """One row per (model, runtime, precision): p50 per batch and the speedup vs dense on the same one."""
    rows = []
    for key in runs:
        for backend, per_precision in latency[key].items():
            for precision, per_size in per_precision.items():
                dense = latency["dense"][backend][precision]
                rows.append({"model": key, "backend": backend, "precision": precision,
                             "format": formats[key][backend] if precision == "int8" else "fp32",
                             "p50_ms": {size: cell["p50_ms"] for size, cell in per_size.items()},
                             "rounds_p50_ms": {size: cell["rounds_p50_ms"] for size, cell in per_size.items()},
                             "speedup_vs_dense": {size: dense[size]["p50_ms"] / cell["p50_ms"]
                                                  for size, cell in per_size.items()}})
    return rows


def _best(rows: list[dict[str, Any]], size: int) -> dict[str, Any]:
    row = min(rows, key=lambda r: r["p50_ms"][str(size)])
    return {"model": row["model"], "backend": row["backend"], "precision": row["precision"],
            "p50_ms": row["p50_ms"][str(size)]}


def fastest_per_model(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, Any]]:
    """{model: {batch: the fastest runtime/precision and its p50}}."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    return {model: {str(size): _best([r for r in rows if r["model"] == model], size) for size in sizes}
            for model in models}


def headline(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, dict[str, Any]]:
    """{batch: best compressed deployment, dense on its best runtime/precision, speedup = dense p50 / best p50}."""
    out = {}
    for size in sizes:
        dense = _best([r for r in rows if r["model"] == "dense"], size)
        best = _best([r for r in rows if r["model"] != "dense"], size)
        out[str(size)] = {"dense": dense, "compressed": best, "speedup": dense["p50_ms"] / best["p50_ms"]}
    return out


def ort_int8_ratio(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, float] | None:
    """{batch: ORT CPU FP32 p50 / ORT CPU INT8 p50} of the dense model (None without ort-cpu)."""
    found = {r["precision"]: r for r in rows if r["model"] == "dense" and r["backend"] == "ort-cpu"}
    if set(found) != set(PRECISIONS):
        return None
    return {str(s): found["fp32"]["p50_ms"][str(s)] / found["int8"]["p50_ms"][str(s)] for s in sizes}


def cpu_flags() -> dict[str, Any]:
    """The CPU model and whether /proc/cpuinfo lists the VNNI flags (int8 dot products in one instruction)."""
    from deploy.report import cpu_model

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            line = next((line for line in handle if line.startswith("flags")), "")
        flags = set(line.partition(":")[2].split())
    except OSError:
        pass
    return {"model": cpu_model(), **{flag: flag in flags for flag in VNNI_FLAGS}}


# ------------------------------------------------------------------------------------------ markdown


def _label(backend: str, precision: str) -> str:
    return f"{backend} {precision.upper()}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def skipped_line(plan: dict[str, dict[str, Any]]) -> str:
    """'Skipped: name (reason); ...' or ''."""
    skipped = [f"{name} ({entry['reason']})" for name, entry in plan.items() if not entry["available"]]
    return f"Skipped (not runnable here): {'; '.join(skipped)}.\n\n" if skipped else ""


def accuracy_markdown(payload: dict[str, Any]) -> str:
    """Part A: one line per model, runtime and precision."""
    cfg, sizes = payload["config"], [str(s) for s in payload["config"]["batch_sizes"]]
    all_t = cfg["all_threads"]
    headers = ["model", "runtime", "precision", "clean %", "APGD transfer %", "PGD-20 transfer %",
               "FGSM transfer %",
               f"Square-{cfg['square_queries']} %", "worst case %", "agreement", "int8 ok"]
    headers += [f"p50 b{s} 1T (ms)" for s in sizes] + [f"p50 b{s} {all_t}T (ms)" for s in sizes]
    headers += [f"vs dense same runtime b{s} 1T" for s in sizes] + [f"vs dense ORT FP32 b{s} 1T" for s in sizes]
    body = []
    for r in payload["rows"]:
        ok = "-" if r["int8_ok"] is None else ("yes" if r["int8_ok"] else f"no ({100 * r['int8_clean_drop']:+.1f} pt)")
        body.append([r["model"], r["backend"], r["precision"].upper(), common.pct(r["clean_acc"]),
                     common.pct(r["apgd_transfer_robust_acc"]), common.pct(r["pgd_transfer_robust_acc"]),
                     common.pct(r["fgsm_transfer_robust_acc"]), common.pct(r["square_robust_acc"]),
                     common.pct(r["worst_case_robust_acc"]), f"{r['agreement']:.3f}", ok]
                    + [_ms(r["p50_ms"]["1t"][s]) for s in sizes] + [_ms(r["p50_ms"]["all"][s]) for s in sizes]
                    + [_x(r["speedup_vs_dense"]["1t"][s]) for s in sizes]
                    + [_x(r["speedup_vs_dense_fp32_ort"]["1t"][s]) for s in sizes])
    head = (f"## Cross-runtime deployment ({payload['data']}, x{cfg['ratio']:g} params, eps {payload['eps']:g})\n\n"
            f"Each model is exported once and built per runtime, FP32 and INT8 (calibrated per runtime: "
            f"{', '.join(f'{b} {f}' for b, f in payload['int8_formats'].items())}). Accuracy: `cstar verify` "
            f"of every build against one attack set per model ({cfg['samples']} stratified test images, APGD-CE / "
            "APGD-T (apgd suite; APGD transfer = the APGD-T set), PGD-20 and FGSM crafted on the PyTorch model, "
            f"replayed), Square ({cfg['square_queries']} queries on "
            f"{cfg['square_samples']}) run against the runtime itself; worst case = correct under every attack on "
            f"the Square subset; agreement = same class as the PyTorch model. int8 ok = clean within "
            f"{100 * INT8_MAX_CLEAN_DROP:g} point of the same runtime's FP32 and agreement >= {INT8_MIN_AGREEMENT}. "
            f"Latency: p50 over {cfg['iters']} calls ({cfg['warmup']} warm-up), median of {cfg['rounds']} rounds "
            f"interleaved over every artifact of one thread setting; 1T = 1 thread, {all_t}T = every core. "
            "vs dense = dense p50 / p50 (same runtime and precision; or dense on ORT FP32).\n\n")
    return head + skipped_line(payload["backends"]) + common.markdown_table(headers, body)


def cifar_markdown(block: dict[str, Any], plan: dict[str, dict[str, Any]]) -> str:
    """Part B: latency table, fastest per model, the headline and ORT INT8 vs FP32."""
    sizes = [str(s) for s in block["batch_sizes"]]
    fastest = block["fastest"]
    headers = ["model", "FLOPs ratio", "runtime", "precision", "INT8 format"]
    headers += [f"p50 b{s} (ms)" for s in sizes] + [f"vs dense same runtime b{s}" for s in sizes] + ["fastest"]
    body = []
    for r in block["rows"]:
        best = [s for s in sizes if (fastest[r["model"]][s]["backend"], fastest[r["model"]][s]["precision"])
                == (r["backend"], r["precision"])]
        body.append([r["model"], f"{block['models'][r['model']]['flops_ratio']:.2f}x", r["backend"],
                     r["precision"].upper(), "-" if r["precision"] == "fp32" else str(r["format"])]
                    + [_ms(r["p50_ms"][s]) for s in sizes] + [_x(r["speedup_vs_dense"][s]) for s in sizes]
                    + [", ".join(f"b{s}" for s in best) or "-"])
    width = block["options"]["width"]
    head = (f"## CIFAR-10 shapes, random weights: {block['model']} (width {width}) on every runtime\n\n"
            f"RANDOM WEIGHTS (latency only, no accuracy): dense, CSTAR and prune at {block['ratio']:g}x FLOPs as "
            "structure only (the compress stage's rank allocation + Tucker-2 factorization and channel pruning, "
            f"ends dense, no training). INT8 calibrated per runtime on {block['calibration_images']} random [0,1] "
            f"images. p50 over {block['iters']} calls at {block['threads']} thread, rounds interleaved.\n\n")
    lines = [f"- Fastest for {model}: " + "; ".join(
        f"b{s} {_label(best['backend'], best['precision'])} {best['p50_ms']:.3f} ms" for s, best in per.items())
        for model, per in fastest.items()]
    for s, item in block["headline"].items():
        dense, best = item["dense"], item["compressed"]
        lines.append(f"- **Headline (b{s})**: the best compressed deployment, {best['model']} on "
                     f"{_label(best['backend'], best['precision'])} ({best['p50_ms']:.3f} ms), is "
                     f"**{item['speedup']:.2f}x** the dense model on its best runtime/precision "
                     f"({_label(dense['backend'], dense['precision'])}, {dense['p50_ms']:.3f} ms).")
    cpu = block["cpu"]
    vnni = ", ".join(f"{flag} {'yes' if cpu[flag] else 'no'}" for flag in VNNI_FLAGS)
    ratio = block["ort_int8_vs_fp32"]
    if ratio is None:
        lines.append("- ORT CPU INT8 vs FP32 (dense): not measured (ort-cpu not run).")
    else:
        met = all(value >= 2.0 for value in ratio.values())
        lines.append("- ORT CPU INT8 (U8S8) vs FP32, dense: " + ", ".join(f"b{s} {v:.2f}x" for s, v in ratio.items())
                     + f" faster (target >= 2x: {'met' if met else 'NOT met'}) on {cpu['model']} ({vnni}).")
    return head + skipped_line(plan) + common.markdown_table(headers, body) + "\n" + "\n".join(lines) + "\n"


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    text = accuracy_markdown(payload)
    if payload.get("cifar"):
        text += "\n" + cifar_markdown(payload["cifar"], payload["backends"]).replace("## ", "### ", 1)
    return text


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Part A and B; writes the results and returns the payload."""
    common.setup_torch(args.torch_threads)
    machine = common.machine_info(args.threads)
    root = common.work_root(args.data, args.quick, args.work)
    plan = backend_plan(common.parse_list(args.backends))
    backends = [name for name, entry in plan.items() if entry["available"]]
    if not backends:
        raise CstarError(f"none of --backends {args.backends} can run here: "
                         + "; ".join(f"{n}: {e['reason']}" for n, e in plan.items()),
                         "install a runtime (pip install 'cstar[openvino]') or pass --backends ort-cpu")
    sizes = common.parse_list(args.batch_sizes, int)
    with common.stopwatch() as total:
        dense = resolve_dense(args, root)
        table_root = Path(args.from_table_dir) if args.from_table_dir else root
        runs = {"dense": dense, **compressed_set(dense.directory, table_root / "compress", common.parse_list(args.methods),
                                                 [args.ratio], common.own_compress_config(args))}
        models = {key: model_artifacts(key, run_, root, args, backends, max(sizes)) for key, run_ in runs.items()}
        builds = {key: info["builds"] for key, info in models.items()}
        latency = {label: timed(builds, args, threads, args.batch_sizes, args.iters)
                   for label, threads in thread_settings(args).items()}
        cifar = None if args.no_cifar else cifar_part(root / "cifar-shapes", args, backends)
    formats = next(iter(models.values()))["calibration"] if models else {}
    payload = {"machine": machine, "data": args.data, "eps": float(dense.manifest.get("eps", 0.0)),
               "dense_dir": str(dense.directory), "backends": plan,
               "int8_formats": {backend: block["format"] for backend, block in formats.items()},
               "models": {key: {k: v for k, v in info.items() if k not in ("builds", "accuracy")}
                          for key, info in models.items()},
               "config": {"ratio": args.ratio, "methods": common.parse_list(args.methods), "samples": args.samples,
                          "square_queries": args.square_queries, "square_samples": args.square_samples,
                          "square_p_init": args.square_p_init, "calib_samples": args.calib_samples,
                          "parity_samples": args.parity_samples, "batch_sizes": sizes, "iters": args.iters,
                          "warmup": args.warmup, "rounds": args.rounds, "threads": args.threads,
                          "all_threads": args.all_threads, "seed": args.seed, "torch_threads": args.torch_threads},
               "rows": accuracy_rows(models, latency), "cifar": cifar, "seconds": round(total["seconds"], 1)}
    return common.publish(common.result_name(BENCHMARK, args.data), payload, render(payload), args, total['seconds'])


main = common.entry_point(__doc__, add_arguments, run, resolve_defaults)


if __name__ == "__main__":
    sys.exit(main())
