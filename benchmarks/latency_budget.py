"""Latency as the budget (issue 15): `--by latency` compression measured on ONNX Runtime CPU, 1 thread.

Part 1, CIFAR-10 shapes (3x32x32), RANDOM WEIGHTS (latency only, no accuracy): the registry's ResNet-18
(built as cross_runtime's part B builds it) is profiled with `cstar profile` (ort-cpu, --threads, batch
sizes --cifar-batch-sizes), then compressed as STRUCTURE only, no training, to each --cifar-targets
ratio of predicted latency with the compress stage's own allocation under the table's cost model (cstar:
global rank allocation + Tucker-2; prune: channel pruning priced by the table; hybrid: both), once per
budget (--cifar-budget-batches: "1,8,1+8" is one budget at batch 1, one at batch 8, and one that must hold
at both, `--latency-batch 1,8`). Each model is exported with the table (deploy form per layer by
the table) and timed with deploy.bench in rounds interleaved with the dense model. Per row: target,
predicted ms (the manifest's latency record), measured p50, measured speedup vs dense, speedup/target
(the issue wants >= 0.8 at 4x and 8x) and the prediction error (wants within 15%). A target the
runtime cannot reach is a row with the allocator's error text (it names the best reachable ratio).
The --by flops structures cross_runtime makes (--flops-reference x) are timed beside them.

Part 2, digits (the --data set): robust accuracy at equal MEASURED latency. ONE dense model
(resolve_dense), profiled at --batch-sizes; `cstar compress --by latency --latency-batch B` with the
normal recipe for every (method, target, seed) of --methods x --targets x --seeds; each exported with
the table and timed (1 thread, batch B and the others of --batch-sizes, interleaved rounds). Accuracy
is the compress manifest's test metrics (clean, and robust accuracy, the apgd suite's worst case, on the test split: the
stage's own evaluation, not re-run on the runtime). Mean +- std over seeds per (method, target), the
winner per target, and a Pareto plot (robust vs measured p50) written as PNG next to the results.

Default targets: digits' small-resnet keeps its stem and classifier dense, and at batch 1 the runtime
call dominates: no method reaches more than ~1.7x there; at batch 8 (the default --latency-batch) cstar
and lowrank-uniform reach ~2.6x and prune ~2.3x, hence targets 1.25, 1.5, 2 (the reachable ratios are
recorded). hybrid (prune, then Tucker-2 on what remains) joins part 2 in full runs: issue 15 asks it in the
Pareto benchmark once it holds on the runtime (part 1). Wall time on 2 shared cores, 1 thread: part 1 ~8 min
(its profile, calibrated on whole reference models, ~3 min), part 2 ~60 min (48 compress runs of ~75 s;
~25 min with --admm-epochs 2 --finetune-epochs 6), plus the dense model when none is given; --quick ~60 s.

    python benchmarks/latency_budget.py [--quick] [--no-cifar] [--no-accuracy] [--targets 1.25,1.5,2]
                                        [--seeds 0,1,2,3] [--latency-batch 8] [--admm-epochs N --finetune-epochs N]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import (  # noqa: E402
    Expect,
    StageRun,
    StaleWork,
    compress_expect,
    read_json,
    resolve_dense,
    run_or_reuse,
    with_bench_suite,
)
from cstar.errors import CstarError, UnreachableBudget  # noqa: E402

BENCHMARK = "latency_budget"
BACKEND = "ort-cpu"
MIN_SPEEDUP_OF_TARGET = 0.8  # the issue: measured speedup >= 0.8 x the target (4x and 8x, batch 1 and 8)
CHECKED_TARGETS = (4.0, 8.0)
ISSUE_METHODS = ("cstar", "prune")  # the issue asks the speedup and prediction checks of these two
MAX_PREDICTION_ERROR = 0.15  # the issue: predicted whole-model latency within 15% of measured
UNREACHABLE_PROBE = 1e6  # a ratio no model reaches: the allocator's error then names the best reachable one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--threads", type=int, default=1, help="runtime threads of profile and bench (default 1)")
    parser.add_argument("--iters", type=int, default=None, help="part 2 timed calls per batch size and round (30; quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed warm-up calls (10; quick 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="part 2 interleaved bench rounds, median taken (9; quick 1): this shared VM has phases of "
                             "~0.1-1 s where every call runs ~1.4x slower, and three long rounds let one cover a model")
    parser.add_argument("--no-cifar", action="store_true", help="skip part 1 (CIFAR ResNet-18 shapes)")
    parser.add_argument("--cifar-model", default="resnet18",
                        help="part 1's model: a registry name (default resnet18) or package.module:factory, e.g. "
                             "torchvision.models:mobilenet_v2 (its defaults; --cifar-width then unused)")
    parser.add_argument("--tag", default=None,
                        help="suffix of the result files (latency_budget_<data>_<tag>), e.g. for another --cifar-model")
    parser.add_argument("--cifar-width", type=int, default=None, help="its width option (64; quick 8)")
    parser.add_argument("--cifar-targets", default=None,
                        help="latency ratios of part 1 (4,8,16; quick 1.5,16: width 8 reaches ~1.7x)")
    parser.add_argument("--cifar-methods", default=None, help="part 1 methods (cstar,prune,hybrid; quick cstar,prune)")
    parser.add_argument("--cifar-batch-sizes", default="1,8", help="profiled and timed batch sizes (default 1,8)")
    parser.add_argument("--cifar-budget-batches", default=None,
                        help="budgets, one structure each: a batch size whose predicted latency is the budget, or "
                             "several joined by + that it must hold at together (1,8,1+8; quick 1+8)")
    parser.add_argument("--cifar-iters", type=int, default=None,
                        help="part 1 timed calls per batch and round (10; quick 5)")
    parser.add_argument("--cifar-rounds", type=int, default=None,
                        help="part 1 interleaved bench rounds, median taken (9; quick 1): many short rounds drop a "
                             "neighbour's burst on a shared machine")
    parser.add_argument("--cifar-images", type=int, default=2, help="random images per class (export parity data)")
    parser.add_argument("--flops-reference", type=float, default=None,
                        help="also time cross_runtime's --by flops structures at this ratio (8; quick 0 = skip)")
    parser.add_argument("--hybrid-prune-share", type=float, default=0.5, help="hybrid: share of the budget pruned")
    parser.add_argument("--no-accuracy", action="store_true", help="skip part 2 (robust accuracy at equal latency)")
    parser.add_argument("--methods", default=None,
                        help="part 2 methods (cstar,prune,lowrank-uniform,hybrid; quick cstar,prune,lowrank-uniform)")
    parser.add_argument("--targets", default=None,
                        help="part 2 latency ratios at --latency-batch (1.25,1.5,2; quick 1.25); the best reachable "
                             "ratio per method is printed and recorded")
    parser.add_argument("--seeds", default=None, help="compress seeds of part 2 (0,1,2,3; quick 0)")
    parser.add_argument("--batch-sizes", default="1,8", help="part 2 profiled and timed batch sizes (default 1,8)")
    parser.add_argument("--latency-batch", type=int, default=8,
                        help="part 2: the batch size whose latency is the budget and the headline (default 8)")
    parser.add_argument("--admm-epochs", type=int, default=None, help="part 2 compress ADMM epochs (5; quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="part 2 fine-tune epochs (15; quick 0)")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/full defaults left as None."""
    quick = args.quick
    args.iters = args.iters or (10 if quick else 30)
    args.warmup = args.warmup if args.warmup is not None else (2 if quick else 10)
    args.rounds = args.rounds or (1 if quick else 9)
    args.cifar_width = args.cifar_width or (8 if quick else 64)
    args.cifar_targets = args.cifar_targets or ("1.5,16" if quick else "4,8,16")
    args.cifar_methods = args.cifar_methods or ("cstar,prune" if quick else "cstar,prune,hybrid")
    args.cifar_budget_batches = args.cifar_budget_batches or ("1+8" if quick else "1,8,1+8")
    args.cifar_iters = args.cifar_iters or (5 if quick else 10)
    args.cifar_rounds = args.cifar_rounds or (1 if quick else 9)
    args.flops_reference = args.flops_reference if args.flops_reference is not None else (0.0 if quick else 8.0)
    args.methods = args.methods or ("cstar,prune,lowrank-uniform" if quick else "cstar,prune,lowrank-uniform,hybrid")
    args.targets = args.targets or ("1.25" if quick else "1.25,1.5,2")
    args.seeds = args.seeds or ("0" if quick else "0,1,2,3")
    common.quick_epochs(args)
    if args.latency_batch not in common.parse_list(args.batch_sizes, int):
        raise CstarError(f"--latency-batch {args.latency_batch} is not one of --batch-sizes {args.batch_sizes}",
                         f"pass --batch-sizes {args.batch_sizes},{args.latency_batch}")
    if not {b for budget in budget_specs(args.cifar_budget_batches) for b in budget} <= set(
            common.parse_list(args.cifar_batch_sizes, int)):
        raise CstarError(f"--cifar-budget-batches {args.cifar_budget_batches} must be among --cifar-batch-sizes "
                         f"{args.cifar_batch_sizes}", "profile every budget batch size")
    return args


def budget_specs(text: str) -> list[tuple[int, ...]]:
    """--cifar-budget-batches "1,8,1+8" -> [(1,), (8,), (1, 8)]: each budget's batch sizes, the first the headline."""
    from cstar.latency_table import latency_batches

    return [latency_batches(part.replace("+", ",")) for part in common.parse_list(text)]


def batch_label(batches: tuple[int, ...]) -> str:
    return "+".join(map(str, batches))


def config_batch(batches: tuple[int, ...]) -> int | list[int]:
    """The compress config's `latency_batch` of a budget: one batch size, or the list of them."""
    return batches[0] if len(batches) == 1 else list(batches)


# ------------------------------------------------------------------------------------------ shared stages


def ensure_table(model_dir: Path, out: Path, batch_sizes: list[int], threads: int) -> Path:
    """`cstar profile --model-from MODEL_DIR --backend ort-cpu --threads T --batch-sizes B --out OUT` unless OUT
    is a table of that model (its manifest unchanged) with those settings."""
    from cstar.latency_table import LatencyTable
    from cstar.manifest import sha256_file
    from deploy.profile import ProfileSettings, run_profile

    source_sha = sha256_file(model_dir / "manifest.json")
    marker = out.with_name(out.name + ".source.json")
    wanted = {"source": str(model_dir.resolve()), "source_sha256": source_sha, "backend": BACKEND,
              "threads": threads, "batch_sizes": batch_sizes, "calibrated": True}
    if out.is_file() and marker.is_file() and read_json(marker) == {**wanted, "table_sha256": sha256_file(out)}:
        LatencyTable.load(out)  # still a valid table
        return out
    from cstar.manifest import atomic_write_json

    common.log(f"profile {model_dir.name} on {BACKEND} ({threads} thread(s), batch {batch_sizes}) -> {out}")
    with common.stopwatch() as t:
        run_profile(model_dir, out, ProfileSettings(backend=BACKEND, threads=threads, batch_sizes=tuple(batch_sizes)),
                    progress=False, force=True)
    atomic_write_json(marker, {**wanted, "table_sha256": sha256_file(out)})
    common.log(f"profile done in {t['seconds']:.1f}s")
    return out


def ensure_table_export(source: Path, out: Path, table: Path, batch: int) -> StageRun:
    """`cstar export --latency-table TABLE --latency-batch B` (deploy forms by the table) unless finished from
    the same source, table (sha256) and batch."""
    from cstar.manifest import sha256_file
    from export.exporter import run_export

    expect = Expect(config={"deploy_forms.table.sha256": sha256_file(table), "deploy_forms.table.batch": batch},
                    sources=(source / "manifest.json",))
    return run_or_reuse(out, f"export {source.name} (forms by the table, batch {batch})",
                        lambda: run_export(source, out, progress=False, latency_table=table, latency_batch=batch),
                        expect)


def bench(exports: dict[str, Path], sizes: list[int], iters: int, args: argparse.Namespace,
          rounds: int | None = None) -> dict[str, Any]:
    """{key: {batch: {p50_ms, rounds_p50_ms}}}: deploy_speed.bench_rounds over every export (rounds interleave
    the models, so load drift hits them alike)."""
    from benchmarks.deploy_speed import bench_rounds

    rounds = rounds or args.rounds
    settings = argparse.Namespace(batch_sizes=",".join(map(str, sizes)), iters=iters, warmup=args.warmup,
                                  threads=args.threads, seed=args.seed, rounds=rounds)
    common.log(f"bench {len(exports)} models on {BACKEND}, {args.threads} thread(s), batch {sizes}, {rounds} round(s)")
    timed = bench_rounds({key: {"fp32": directory} for key, directory in exports.items()}, settings)
    return {key: per["fp32"] for key, per in timed.items()}


def best_reachable(error: CstarError) -> float | None:
    """The best reachable ratio an unreachable budget's error carries, to the two decimals its message shows."""
    return round(error.best_ratio, 2) if isinstance(error, UnreachableBudget) else None


def summarize(values: list[float]) -> dict[str, float]:
    """Mean and sample std (0 for one value)."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


# ------------------------------------------------------------------------------------------ structures


def latency_structure(dense: Any, table: Any, method: str, target: float, batch: int | tuple[int, ...],
                      input_shape: tuple[int, ...], share: float) -> tuple[Any, dict[str, Any]]:
    """(model, ranks) compressed to `target` x the predicted latency at `batch` (at each of several) as `cstar
    compress --by latency` allocates before training: the same Budget and structure path
    (cstar.compress.structure), so the same allocator, pruning and cost function."""
    from cstar.admm import Budget
    from cstar.compress import compress_structure
    from cstar.ranks import first_and_last

    budget = Budget(target, "latency", input_shape, first_and_last(dense), latency_table=table, latency_batch=batch)
    structure = compress_structure(dense, budget, method, share=share)
    return structure.model, structure.ranks(dense)


def reachable_ratios(dense: Any, table: Any, batch: int, input_shape: tuple[int, ...], methods: list[str],
                     share: float) -> dict[str, dict[str, Any]]:
    """{method: {best, message}}: the best latency ratio each method reaches at `batch` (from the error an
    unreachable budget raises)."""
    found: dict[str, dict[str, Any]] = {}
    for method in methods:
        try:
            latency_structure(dense, table, method, UNREACHABLE_PROBE, batch, input_shape, share)
            found[method] = {"best": None, "message": "no limit found"}
        except CstarError as error:
            found[method] = {"best": best_reachable(error), "message": error.message}
    return found


def save_structure(out: Path, dense_dir: Path, table_path: Path, method: str, target: float,
                   batches: tuple[int, ...], share: float) -> None:
    """The structure as a compress-stage directory export reads, with the manifest's latency record (predicted
    ms at the budget's batches) and the prediction at every batch size of the table, each layer in the form
    export picks (fastest at the budget's first batch)."""
    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.compress import compression_ratios
    from cstar.data import DatasetSpec
    from cstar.latency import latency_record, predicted_latency_ms
    from cstar.latency_table import LatencyTable
    from cstar.manifest import file_entry

    dense, manifest = load_checkpoint(dense_dir)
    table = LatencyTable.load(table_path)
    spec = DatasetSpec.from_dict(manifest["dataset"])
    shape = tuple(spec.input_shape)
    model, ranks = latency_structure(dense, table, method, target, batches, shape, share)
    config = {**manifest["config"], "method": method, "ratio": target, "by": "latency",
              "latency_batch": config_batch(batches),
              "latency_table": str(table_path.resolve())}
    body = {"eps": manifest.get("eps", spec.default_eps), "norm": manifest.get("norm", "linf"), "metrics": {},
            "config": config, "method": method, "ranks": ranks,
            "compression": {**compression_ratios(dense, model, shape, table, batches), "target": target,
                            "by": "latency"},
            "latency": latency_record(table, batches, dense, model),
            "latency_by_batch": {str(b): predicted_latency_ms(model, table, b, batches[0]) for b in table.batch_sizes},
            "inputs": [file_entry(dense_dir / "manifest.json"), file_entry(table_path)]}
    save_checkpoint(out, model, "compress", manifest["model"]["name"], manifest["model"].get("options", {}), spec, body)


def ensure_structure(root: Path, dense: StageRun, table: Path, method: str, target: float,
                     batches: tuple[int, ...], share: float) -> StageRun | CstarError:
    """The structure's directory (made or reused), or the error when the target is not reachable."""
    key = structure_key(method, target, batches)
    expect = Expect(config={"config.method": method, "config.ratio": target,
                            "config.latency_batch": config_batch(batches),
                            "config.options": dense.manifest["config"].get("options"),
                            "config.seed": dense.manifest["config"].get("seed")},
                    sources=(dense.directory / "manifest.json", table))
    try:
        return run_or_reuse(root / key, f"structure {key}",
                            functools.partial(save_structure, root / key, dense.directory, table, method, target,
                                              batches, share), expect)
    except CstarError as error:
        if isinstance(error, StaleWork):
            raise
        common.log(f"{key}: {error.message}")
        return error


def structure_key(method: str, target: float, batches: tuple[int, ...]) -> str:
    return f"{method}-x{target:g}lat-b{batch_label(batches)}"


# ------------------------------------------------------------------------------------------ part 1


def cifar_dense(root: Path, args: argparse.Namespace) -> tuple[dict[str, StageRun], str]:
    """cross_runtime's random-weight dense model (and its --by flops structures) on a random image tree."""
    from benchmarks.cross_runtime import cifar_checkpoints, random_image_tree

    tree = random_image_tree(root / "random-images", args.cifar_images, args.seed)
    data = f"cifar10:{tree}"
    options = argparse.Namespace(cifar_model=args.cifar_model, cifar_width=args.cifar_width, seed=args.seed,
                                 cifar_ratio=args.flops_reference or 8.0)
    return cifar_checkpoints(root, data, options), data


def predicted_by_batch(run: StageRun, table: Any, form_batch: int) -> dict[str, float]:
    """{batch: predicted ms}: the manifest's (latency structures), else the table's prediction of the model with
    each layer in the form export picked (fastest at `form_batch`)."""
    if "latency_by_batch" in run.manifest:
        return {str(b): float(v) for b, v in run.manifest["latency_by_batch"].items()}
    from cstar.checkpoint import load_checkpoint
    from cstar.latency import predicted_latency_ms

    model, _ = load_checkpoint(run.directory)
    return {str(b): predicted_latency_ms(model, table, b, form_batch) for b in table.batch_sizes}


def cifar_part(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: profile, latency-budget structures, exports by the table, interleaved bench."""
    from benchmarks.cross_runtime import cifar_options
    from cstar.latency_table import LatencyTable

    sizes = common.parse_list(args.cifar_batch_sizes, int)
    runs, _ = cifar_dense(root, args)
    dense = runs["dense"]
    table_path = ensure_table(dense.directory, root / "table.json", sizes, args.threads)
    table = LatencyTable.load(table_path)
    models: dict[str, dict[str, Any]] = {"dense": {"run": dense, "method": "dense", "target": None, "batches": ()}}
    if args.flops_reference:
        for method in ("cstar", "prune"):
            key = f"{method}-x{args.flops_reference:g}flops"
            models[key] = {"run": runs[key], "method": method, "target": None, "batches": (), "by": "flops"}
    errors = []
    for batches in budget_specs(args.cifar_budget_batches):
        for target in common.parse_list(args.cifar_targets, float):
            for method in common.parse_list(args.cifar_methods):
                made = ensure_structure(root, dense, table_path, method, target, batches, args.hybrid_prune_share)
                if isinstance(made, CstarError):
                    errors.append({"method": method, "target": target, "budget_batch": batch_label(batches),
                                   "budget_batches": list(batches), "error": made.message,
                                   "best_reachable": best_reachable(made)})
                else:
                    models[structure_key(method, target, batches)] = {"run": made, "method": method,
                                                                      "target": target, "batches": batches,
                                                                      "by": "latency"}
    exports = {key: ensure_table_export(m["run"].directory, root / "artifacts" / key / "onnx", table_path,
                                        m["batches"][0] if m.get("batches") else sizes[0]).directory
               for key, m in models.items()}
    latency = bench(exports, sizes, args.cifar_iters, args, args.cifar_rounds)
    rows = cifar_rows(models, latency, table, sizes)
    return {"model": args.cifar_model, "options": cifar_options(args), "random_weights": True,
            "backend": BACKEND, "threads": args.threads, "batch_sizes": sizes, "iters": args.cifar_iters,
            "rounds": args.cifar_rounds,
            "table": {"path": str(table_path), **table.describe(),
                      "dense_model_ms": {str(b): table.model_ms(b) for b in sizes},
                      "dense_reference_ms": {str(b): table.dense_reference_ms(b) for b in sizes},
                      "calibration": _calibration_summary(table)},
            "rows": rows, "errors": errors, "checks": cifar_checks(rows, errors),
            "models": {key: {"dir": str(m["run"].directory), "export": str(exports[key]),
                             "flops_ratio": (m["run"].manifest.get("compression") or {}).get("flops_ratio", 1.0),
                             "params_ratio": (m["run"].manifest.get("compression") or {}).get("params_ratio", 1.0),
                             "deploy_forms": _form_counts(exports[key])}
                       for key, m in models.items()}}


def _form_counts(export_dir: Path) -> dict[str, int]:
    layers = (read_json(export_dir / "manifest.json").get("deploy_forms") or {}).get("layers") or {}
    counts: dict[str, int] = {}
    for entry in layers.values():
        counts[entry["form"]] = counts.get(entry["form"], 0) + 1
    return counts


def cifar_rows(models: dict[str, dict[str, Any]], latency: dict[str, Any], table: Any,
               sizes: list[int]) -> list[dict[str, Any]]:
    """One row per (model, measured batch): predicted ms, measured p50, speedup, speedup/target, error, and the
    error of the prediction anchored on the dense model measured in the same rounds (predicted x dense measured
    now / dense measured at profile time, the reference a ratio divides): what is left once drift of the whole
    machine since the profile is taken out."""
    rows = []
    reference = {str(b): table.dense_reference_ms(b) for b in sizes}
    for key, info in models.items():
        predicted = predicted_by_batch(info["run"], table, info["batches"][0] if info["batches"] else sizes[0])
        for size in sizes:
            cell, dense = latency[key][str(size)], latency["dense"][str(size)]
            speedup = dense["p50_ms"] / cell["p50_ms"]
            target = info["target"]
            rows.append({"model": key, "method": info["method"], "by": info.get("by"), "target": target,
                         "budget_batch": batch_label(info["batches"]) if info["batches"] else None,
                         "budget_batches": list(info["batches"]), "batch": size, "predicted_ms": predicted[str(size)],
                         "p50_ms": cell["p50_ms"], "rounds_p50_ms": cell["rounds_p50_ms"], "speedup": speedup,
                         "of_target": speedup / target if target else None,
                         "prediction_error": (predicted[str(size)] - cell["p50_ms"]) / cell["p50_ms"],
                         "anchored_error": (predicted[str(size)] * dense["p50_ms"] / reference[str(size)]
                                            - cell["p50_ms"]) / cell["p50_ms"]})
    return rows


def cifar_checks(rows: list[dict[str, Any]], errors: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's checks per method: speedup >= 0.8 x target at 4x and 8x (at each row's own budget batches; at
    batch 1 AND 8 for the budgets held at both, `--latency-batch 1,8`; and at every measured batch whatever the
    budget), |prediction error| <= 15% (every target); the dense model's prediction error; the targets not
    reached. `issue_met`: for cstar AND prune, the speedup at batch 1 and 8 (the joint budget's rows where there
    are any, else every row at every batch) and the prediction check hold."""
    latency_rows = [r for r in rows if r["by"] == "latency"]
    methods = list(dict.fromkeys(r["method"] for r in latency_rows))
    per_method = {m: method_checks([r for r in latency_rows if r["method"] == m]) for m in methods}
    required = [per_method[m] for m in ISSUE_METHODS if m in per_method]
    return {"per_method": per_method,
            "issue_met": bool(required) and all(_speedup_at_every_batch(c) is not False and c["prediction_within"]
                                                for c in required),
            "dense_prediction_error": {str(r["batch"]): r["prediction_error"] for r in rows if r["model"] == "dense"},
            "unreachable": [f"{e['method']} x{e['target']:g} (b{e['budget_batch']})" for e in errors]}


def _speedup_at_every_batch(checks: dict[str, Any]) -> bool | None:
    """The speedup check at batch 1 and 8: on the joint budget's rows where measured, else on every row."""
    joint = checks.get("speedup_met_joint")
    return checks["speedup_met_every_batch"] if joint is None else joint


def method_checks(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Speedup/target at 4x and 8x (worst at the own budget batches, on the joint budgets at every batch, and over
    every row and batch) and prediction error."""
    checked = [r for r in rows if r["target"] in CHECKED_TARGETS]
    own = [r["of_target"] for r in checked if r["batch"] in r["budget_batches"]]
    joint = [r["of_target"] for r in checked if len(r["budget_batches"]) > 1]
    every = [r["of_target"] for r in checked]
    worst_error = max((abs(r["prediction_error"]) for r in rows), default=None)
    worst_anchored = max((abs(r["anchored_error"]) for r in rows), default=None)
    return {"speedup_of_target_min_own_batch": min(own, default=None),
            "speedup_met_own_batch": None if not own else min(own) >= MIN_SPEEDUP_OF_TARGET,
            "speedup_of_target_min_joint": min(joint, default=None),
            "speedup_met_joint": None if not joint else min(joint) >= MIN_SPEEDUP_OF_TARGET,
            "speedup_of_target_min": min(every, default=None),
            "speedup_met_every_batch": None if not every else min(every) >= MIN_SPEEDUP_OF_TARGET,
            "prediction_error_max": worst_error,
            "prediction_within": worst_error is not None and worst_error <= MAX_PREDICTION_ERROR,
            "prediction_misses": [f"{r['model']} b{r['batch']} {100 * r['prediction_error']:+.0f}%" for r in rows
                                  if abs(r["prediction_error"]) > MAX_PREDICTION_ERROR],
            "prediction_error_max_b8": max((abs(r["prediction_error"]) for r in rows if r["batch"] != 1), default=None),
            "anchored_error_max": worst_anchored}


# ------------------------------------------------------------------------------------------ part 2


def compress_dir_name(method: str, target: float, batch: int, seed: int, config: dict[str, Any]) -> str:
    from cstar.compress import CompressConfig

    defaults = CompressConfig()
    admm = config.get("admm_epochs", defaults.admm_epochs)
    finetune = config.get("finetune_epochs", defaults.finetune_epochs)
    return f"{method}-x{target:g}lat-b{batch}-e{admm}+{finetune}-s{seed}"


def ensure_latency_compress(dense: StageRun, root: Path, table: Path, method: str, target: float, seed: int,
                            args: argparse.Namespace, extra: dict[str, Any] | None = None) -> StageRun | str:
    """`cstar compress --by latency --latency-table TABLE --latency-batch B --method M --ratio T --seed S` with the
    normal recipe and `extra` CompressConfig overrides (reused when finished with the same config and table), or
    the error text (unreachable)."""
    from cstar.compress import run_compress
    from cstar.manifest import sha256_file

    config = with_bench_suite({**common.own_compress_config(args), **(extra or {}), "seed": seed, "ratio": target, "method": method,
                               "by": "latency", "latency_table": str(table.resolve()),
                               "latency_batch": args.latency_batch, "latency_threads": args.threads})
    out = root / compress_dir_name(method, target, args.latency_batch, seed, config)
    base = compress_expect(config, dense.directory)
    expect = Expect(config={**base.config, "latency.table.sha256": sha256_file(table)}, sources=base.sources,
                    legacy=base.legacy)
    try:
        return run_or_reuse(out, f"compress {method} x{target:g} latency (b{args.latency_batch}) seed {seed}",
                            functools.partial(run_compress, dense.directory, out, config=config, progress=False),
                            expect)
    except CstarError as error:
        if isinstance(error, StaleWork):
            raise
        common.log(f"{out.name}: {error.message}")
        return error.message


def accuracy_part(root: Path, args: argparse.Namespace, plot_path: Path) -> dict[str, Any]:
    """Part 2: one dense model, latency-budget compress runs per (method, target, seed), exports, bench."""
    from cstar.checkpoint import load_checkpoint
    from cstar.data import DatasetSpec
    from cstar.latency_table import LatencyTable

    sizes = common.parse_list(args.batch_sizes, int)
    dense = resolve_dense(args, root)
    work = root / BENCHMARK
    table_path = ensure_table(dense.directory, work / "table.json", sizes, args.threads)
    table = LatencyTable.load(table_path)
    methods, targets = common.parse_list(args.methods), common.parse_list(args.targets, float)
    model, manifest = load_checkpoint(dense.directory)
    shape = tuple(DatasetSpec.from_dict(manifest["dataset"]).input_shape)
    reach = reachable_ratios(model, table, args.latency_batch, shape, methods, args.hybrid_prune_share)
    for method, found in reach.items():
        common.log(f"best reachable latency ratio at batch {args.latency_batch}: {method} {found['best']}x")
    runs: dict[str, dict[str, Any]] = {}
    errors = []
    for target in targets:
        for method in methods:
            for seed in common.parse_list(args.seeds, int):
                made = ensure_latency_compress(dense, work / "compress", table_path, method, target, seed, args)
                if isinstance(made, str):
                    errors.append({"method": method, "target": target, "seed": seed, "error": made})
                else:
                    runs[made.directory.name] = {"run": made, "method": method, "target": target, "seed": seed}
    sources = {"dense": dense.directory, **{key: r["run"].directory for key, r in runs.items()}}
    exports = {key: ensure_table_export(directory, work / "artifacts" / key / "onnx", table_path,
                                        args.latency_batch).directory for key, directory in sources.items()}
    latency = bench(exports, sizes, args.iters, args)
    rows = accuracy_rows(runs, latency, args.latency_batch)
    dense_row = dense_summary(dense, latency["dense"])
    summary = summarize_runs(rows, methods, targets, args.latency_batch, dense_row)
    block = {"dense": dense_row, "dense_dir": str(dense.directory), "methods": methods, "targets": targets,
             "seeds": common.parse_list(args.seeds, int), "latency_batch": args.latency_batch, "batch_sizes": sizes,
             "threads": args.threads, "rounds": args.rounds, "iters": args.iters,
             "table": {"path": str(table_path), **table.describe(),
                       "dense_model_ms": {str(b): table.model_ms(b) for b in sizes},
                       "calibration": _calibration_summary(table)},
             "reachable": reach, "rows": rows, "errors": errors, "summary": summary,
             "winners": winners(summary, targets), "plot": plot_path.name,
             "compress_seconds": [r["seconds"] for r in rows if r["seconds"] is not None]}
    pareto_plot(block, plot_path)
    return block


def dense_summary(dense: StageRun, latency: dict[str, Any]) -> dict[str, Any]:
    metrics = dense.manifest.get("metrics") or {}
    return {"clean_acc": metrics.get("clean_acc"), "robust_acc": metrics.get("robust_acc"), "n": metrics.get("n"),
            "p50_ms": {size: cell["p50_ms"] for size, cell in latency.items()}}


def accuracy_rows(runs: dict[str, dict[str, Any]], latency: dict[str, Any], batch: int) -> list[dict[str, Any]]:
    """One row per compress run: predicted and measured latency, speedups vs dense, clean and APGD accuracy."""
    rows = []
    for key, info in runs.items():
        manifest = info["run"].manifest
        metrics, record = manifest["metrics"], manifest.get("latency") or {}
        p50 = {size: cell["p50_ms"] for size, cell in latency[key].items()}
        speedup = {size: latency["dense"][size]["p50_ms"] / value for size, value in p50.items()}
        predicted = record.get("predicted_ms")
        rows.append({"model": key, "method": info["method"], "target": info["target"], "seed": info["seed"],
                     "predicted_ms": predicted, "predicted_speedup": record.get("predicted_speedup"),
                     "p50_ms": p50, "rounds_p50_ms": {s: c["rounds_p50_ms"] for s, c in latency[key].items()},
                     "speedup": speedup,
                     "prediction_error": (predicted - p50[str(batch)]) / p50[str(batch)] if predicted else None,
                     "clean_acc": metrics["clean_acc"], "robust_acc": metrics["robust_acc"], "n": metrics["n"],
                     "attack": metrics.get("attack"), "params_ratio": manifest["compression"]["params_ratio"],
                     "flops_ratio": manifest["compression"]["flops_ratio"], "dir": str(info["run"].directory),
                     "seconds": info["run"].seconds})
    return rows


def summarize_runs(rows: list[dict[str, Any]], methods: list[str], targets: list[float], batch: int,
                   dense: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (method, target): measured p50 and speedup at `batch`, clean and APGD, mean +- std over seeds."""
    out = []
    for target in targets:
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["target"] == target]
            if not mine:
                continue
            p50 = summarize([r["p50_ms"][str(batch)] for r in mine])
            out.append({"method": method, "target": target, "n": len(mine), "p50_ms": p50,
                        "speedup": dense["p50_ms"][str(batch)] / p50["mean"],
                        "clean": summarize([r["clean_acc"] for r in mine]),
                        "robust": summarize([r["robust_acc"] for r in mine])})
    return out


def winners(summary: list[dict[str, Any]], targets: list[float]) -> list[dict[str, Any]]:
    """Per target: the method with the highest mean APGD, its lead over the runner-up and whether the lead
    exceeds the larger of their seed std."""
    found = []
    for target in targets:
        ranked = sorted((s for s in summary if s["target"] == target), key=lambda s: -s["robust"]["mean"])
        if not ranked:
            continue
        best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
        lead = best["robust"]["mean"] - second["robust"]["mean"] if second else None
        spread = max(best["robust"]["std"], second["robust"]["std"]) if second else None
        found.append({"target": target, "winner": best["method"], "runner_up": second["method"] if second else None,
                      "lead": lead, "std": spread,
                      "exceeds_std": bool(lead is not None and spread is not None and lead > spread)})
    return found


def pareto_plot(block: dict[str, Any], path: Path) -> None:
    """APGD accuracy vs measured p50 at the latency batch: one faint marker per run, the mean +- std per method
    and target joined across targets, the dense model as a star; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = str(block["latency_batch"])
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for index, method in enumerate(block["methods"]):
        color = f"C{index}"
        mine = [r for r in block["rows"] if r["method"] == method]
        ax.scatter([r["p50_ms"][batch] for r in mine], [100 * r["robust_acc"] for r in mine], color=color, alpha=0.35,
                   s=18)
        means = sorted((s for s in block["summary"] if s["method"] == method), key=lambda s: s["p50_ms"]["mean"])
        ax.errorbar([s["p50_ms"]["mean"] for s in means], [100 * s["robust"]["mean"] for s in means],
                    xerr=[s["p50_ms"]["std"] for s in means], yerr=[100 * s["robust"]["std"] for s in means],
                    fmt="o-", color=color, capsize=3, label=f"{method} (mean +- std per target)")
    dense = block["dense"]
    if dense["robust_acc"] is not None:
        ax.scatter([dense["p50_ms"][batch]], [100 * dense["robust_acc"]], marker="*", s=120, color="k", label="dense")
    ax.set_xlabel(f"measured p50 (ms), batch {batch}, {BACKEND} {block['threads']} thread(s)")
    ax.set_ylabel("APGD robust accuracy (%)")
    ax.set_title("Robust accuracy vs measured latency (one marker per run)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".png", dir=path.parent)
    os.close(handle)
    try:
        fig.savefig(temp, dpi=120)
        os.replace(temp, path)
    finally:
        plt.close(fig)
        if os.path.exists(temp):
            os.unlink(temp)


# ------------------------------------------------------------------------------------------ markdown


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _err(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _mean_std(stats: dict[str, float], scale: float = 100.0, digits: int = 1) -> str:
    return f"{scale * stats['mean']:.{digits}f} +- {scale * stats['std']:.{digits}f}"


def _options_label(options: dict[str, Any]) -> str:
    """' (width 64)' for a registry model's options; '' for a model by import path at its defaults."""
    return f" ({', '.join(f'{k} {v}' for k, v in options.items())})" if options else ""


def cifar_markdown(block: dict[str, Any]) -> str:
    """Part 1: one line per (model, measured batch), then the checks and the unreachable targets."""
    headers = ["model", "budget", "budget batch", "batch", "predicted (ms)", "measured p50 (ms)", "speedup vs dense",
               "speedup / target", "prediction error", "dense-anchored error", "deploy forms"]
    body = []
    for r in block["rows"]:
        budget = f"{r['target']:g}x latency" if r["target"] else (f"{r['by']}" if r["by"] else "-")
        forms = ", ".join(f"{k} {v}" for k, v in block["models"][r["model"]]["deploy_forms"].items()) or "-"
        body.append([r["model"], budget, "-" if r["budget_batch"] is None else str(r["budget_batch"]), str(r["batch"]),
                     _ms(r["predicted_ms"]), _ms(r["p50_ms"]), _x(r["speedup"]),
                     "-" if r["of_target"] is None else f"{r['of_target']:.2f}", _err(r["prediction_error"]),
                     _err(r.get("anchored_error")), forms])
    table = block["table"]
    head = (f"## Latency budget on {block['model']}{_options_label(block['options'])}, CIFAR-10 shapes, "
            f"RANDOM WEIGHTS\n\nRANDOM WEIGHTS (latency only, no accuracy). `cstar profile` on {block['backend']} "
            f"({table['runtime'].get('name')} {table['runtime'].get('version')}, {block['threads']} thread, batch "
            f"{', '.join(map(str, block['batch_sizes']))}; its dense model, measured in the calibration rounds: "
            + ", ".join(f"b{b} {v:.3f} ms" for b, v in (table.get("dense_reference_ms") or table["dense_model_ms"]).items())
            + "). Each structure is what `cstar compress --by latency` allocates before training (same Budget, "
            "allocator, pruning and cost function): predicted latency <= that measured dense latency / target at its "
            "budget batch (budget "
            "batch 1+8: `--latency-batch 1,8`, the budget must hold at both); exported with the table (deploy form "
            "per layer, fastest at the first budget batch); measured p50: the median over "
            f"{block.get('rounds', 3)} rounds interleaved with the dense model of each round's p50 over "
            f"{block['iters']} calls. Predicted = the manifest's latency "
            "record (the dense row: the table's additive price of the dense layers); prediction error = (predicted - "
            "measured) / measured; dense-anchored error: the same with the prediction scaled by the dense model's "
            "latency measured in these rounds / at profile time (machine drift since the profile taken out). `flops` rows: the `--by flops` structures of cross_runtime, for contrast."
            + _calibration_text(table) + "\n\n")
    checks = common.markdown_table(
        ["method", "min speedup/target 4x, 8x (own budget batch)", "min speedup/target 4x, 8x (budget at 1+8)",
         "min speedup/target 4x, 8x (any budget, every batch)",
         "max abs prediction error (every target)", "max abs error, batch 8", "max abs dense-anchored error"],
        [[method, f"{_num(c['speedup_of_target_min_own_batch'])} ({_yes(c['speedup_met_own_batch'])})",
          f"{_num(c.get('speedup_of_target_min_joint'))} ({_yes(c.get('speedup_met_joint'))})",
          f"{_num(c['speedup_of_target_min'])} ({_yes(c['speedup_met_every_batch'])})",
          f"{_num(100 * c['prediction_error_max'], 1)}% ({_yes(c['prediction_within'])})"
          + (f": {', '.join(c['prediction_misses'])}" if c["prediction_misses"] else ""),
          f"{_num(100 * c['prediction_error_max_b8'], 1)}%" if c.get("prediction_error_max_b8") is not None else "-",
          f"{_num(100 * c['anchored_error_max'], 1)}%" if c.get("anchored_error_max") is not None else "-"]
         for method, c in block["checks"]["per_method"].items()])
    dense_error = ", ".join(f"b{b} {_err(v)}" for b, v in block["checks"]["dense_prediction_error"].items())
    lines = [f"Checks (the issue: speedup >= {MIN_SPEEDUP_OF_TARGET} x target at 4x and 8x, prediction within "
             f"{100 * MAX_PREDICTION_ERROR:.0f}% of measured, for {' and '.join(ISSUE_METHODS)}): "
             f"**{_yes(block['checks']['issue_met'])}**. Dense model predicted vs measured: {dense_error}.\n",
             checks]
    for error in block["errors"]:
        lines.append(f"- {error['method']} x{error['target']:g} (budget batch {error['budget_batch']}): not reachable, "
                     f"`{error['error']}`")
    return head + common.markdown_table(headers, body) + "\n" + "\n".join(lines) + "\n"


def _calibration_summary(table: Any) -> dict[str, Any]:
    """The table's whole-model calibration without its per-model rows: passes and per-batch fit."""
    calibration = table.calibration or {}
    return {"passes": calibration.get("passes"),
            "by_batch": {b: {k: v for k, v in fit.items() if k != "models"} | {"models": len(fit.get("models", []))}
                         for b, fit in (calibration.get("by_batch") or {}).items()}}


def _calibration_text(table: dict[str, Any]) -> str:
    """One sentence on the table's whole-model calibration (cstar profile), when it has one."""
    calibration = table.get("calibration") or {}
    by_batch = calibration.get("by_batch") or {}
    if not by_batch:
        return ""
    models = next(iter(by_batch.values())).get("models", 0)
    fits = ", ".join(f"b{b} op_scale {v['op_scale']:.2f}, {_spill_text(v)}, max error {100 * v['max_abs_error']:.1f}%"
                     for b, v in by_batch.items())
    return (f" The table is calibrated on {models} whole models timed at profile time (the dense one, uniform "
            f"Tucker-2 and pruned references, the allocator's own picks; {calibration.get('passes', 1)} passes): "
            f"{fits}.")


def _spill_text(fit: dict[str, Any]) -> str:
    """The fitted spill of one batch: rate beyond the shared cache, or that the fit found none."""
    rate = fit.get("spill_ms_per_mb") or 0.0
    if rate <= 0:
        return "no weight spill"
    return f"weights beyond {fit.get('spill_cache_mib', 0.0):.1f} MiB spill at {1000 * rate:.0f} us/MiB"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _yes(value: bool | None) -> str:
    return "n/a" if value is None else ("met" if value else "NOT met")


def accuracy_markdown(block: dict[str, Any]) -> str:
    """Part 2: mean +- std per (method, target), winners, best reachable ratios, the plot, every run."""
    batch = str(block["latency_batch"])
    dense = block["dense"]
    headers = ["method", "target", "n seeds", f"measured p50 b{batch} (ms)", f"speedup b{batch}", "clean %",
               "APGD %"]
    body = [[s["method"], f"{s['target']:g}x", str(s["n"]), _mean_std(s["p50_ms"], 1.0, 3), _x(s["speedup"]),
             _mean_std(s["clean"]), _mean_std(s["robust"])] for s in block["summary"]]
    body.insert(0, ["dense", "1x", "1", _ms(dense["p50_ms"][batch]), "1.00x", common.pct(dense["clean_acc"]),
                    common.pct(dense["robust_acc"])])
    reach = ", ".join(f"{method} {_x(found['best'])}" for method, found in block["reachable"].items())
    n = block["rows"][0]["n"] if block["rows"] else "?"
    head = (f"## Robust accuracy at equal measured latency ({block['data']})\n\n"
            f"ONE dense model ({block['dense_dir']}), profiled on {BACKEND} (1 thread, batch "
            f"{', '.join(map(str, block['batch_sizes']))}); every run is `cstar compress --by latency --latency-batch "
            f"{batch}` with the normal recipe, seeds {', '.join(map(str, block['seeds']))}, exported with the table "
            f"and timed at batch {batch}: {_timing(block)}. Accuracy: the compress manifest's test metrics on {n} "
            "test images (clean; APGD robust accuracy, the stage's own PyTorch evaluation). Mean +- sample std over "
            f"seeds. Best reachable latency ratio at batch {batch} (stem and classifier dense): {reach}.\n\n")
    lines = [_winner_line(w) for w in block["winners"]]
    lines += [f"- {e['method']} x{e['target']:g} seed {e['seed']}: not run, `{e['error']}`" for e in block["errors"]]
    runs = common.markdown_table(["run", "predicted (ms)", f"p50 b{batch} (ms)", "prediction error", "clean %", "APGD %"],
                          [[r["model"], _ms(r["predicted_ms"]), _ms(r["p50_ms"][batch]), _err(r["prediction_error"]),
                            common.pct(r["clean_acc"]), common.pct(r["robust_acc"])] for r in block["rows"]])
    plot = f"\n![APGD vs measured p50]({block['plot']})\n"
    return (head + common.markdown_table(headers, body) + "\n" + "\n".join(lines) + "\n" + plot
            + "\n### Every run\n\n" + runs)


def _winner_line(w: dict[str, Any]) -> str:
    if w["runner_up"] is None:
        return f"- {w['target']:g}x: only {w['winner']} ran."
    verdict = "exceeds" if w["exceeds_std"] else "does NOT exceed"
    return (f"- {w['target']:g}x: **{w['winner']}** has the highest mean APGD, {100 * w['lead']:+.1f} points over "
            f"{w['runner_up']}; the lead {verdict} the larger seed std ({100 * w['std']:.1f} points).")


def _timing(block: dict[str, Any]) -> str:
    """How part 2 timed each model (older result files lack the numbers)."""
    if not block.get("rounds"):
        return "rounds interleaved"
    return (f"the median over {block['rounds']} interleaved rounds (a fresh session each) of each round's p50 over "
            f"{block['iters']} calls")


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    parts = []
    if payload.get("cifar"):
        parts.append(cifar_markdown(payload["cifar"]))
    if payload.get("accuracy"):
        parts.append(accuracy_markdown({**payload["accuracy"], "data": payload["data"]}))
    return "\n".join(parts) or "Nothing ran (--no-cifar and --no-accuracy).\n"


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Part 1 and 2; writes the results (and the Pareto plot) and returns the payload."""
    common.setup_torch(args.torch_threads)
    machine = common.machine_info(args.threads)
    root = common.work_root(args.data, args.quick, args.work)
    name = common.result_name(BENCHMARK, args.data) + (f"_{args.tag}" if args.tag else "")
    plot_path = common.results_dir(args.quick, args.results_dir) / f"{name}_pareto.png"
    with common.stopwatch() as total:
        with common.stopwatch() as first:
            part_dir = root / BENCHMARK / f"cifar-{args.cifar_model.replace(':', '-')}"
            cifar = None if args.no_cifar else cifar_part(part_dir, args)
        accuracy = None if args.no_accuracy else accuracy_part(root, args, plot_path)
    payload = {"machine": machine, "data": args.data, "cifar": cifar, "accuracy": accuracy,
               "config": {key: getattr(args, key) for key in (
                   "threads", "iters", "warmup", "rounds", "cifar_model", "cifar_width", "tag", "cifar_targets",
                   "cifar_methods", "cifar_batch_sizes", "cifar_budget_batches", "cifar_iters", "cifar_rounds",
                   "flops_reference",
                   "hybrid_prune_share", "methods", "targets", "seeds", "batch_sizes", "latency_batch", "admm_epochs",
                   "finetune_epochs", "seed", "torch_threads")},
               "seconds": {"cifar": round(first["seconds"], 1), "total": round(total["seconds"], 1)}}
    return common.publish(name, payload, render(payload), args, total['seconds'])


main = common.entry_point(__doc__, add_arguments, run, resolve_defaults)


if __name__ == "__main__":
    sys.exit(main())
