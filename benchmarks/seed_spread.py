"""Run-to-run spread of compression results: the same dense model compressed with several seeds.

The digits test split has 360 images, so one run's robust accuracy carries about +-2.6 points of
binomial noise alone, and the seed also changes the data order, PGD starts and the validation split
that picks the best epoch. A claim such as "CSTAR beats pruning" needs the mean over seeds and its
spread, which this script measures. Variants are `method[:key=value+key=value]` (CompressConfig
keys), separated by commas.

    python benchmarks/seed_spread.py --dense-dir DIR --variants cstar,cstar:rho=0.5,prune --seeds 0,1,2
    python benchmarks/seed_spread.py --paired --variants cstar,prune --seeds 0,1,2,3,4   # dense per seed
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import StageRun, compress_expect, run_or_reuse, with_bench_suite  # noqa: E402

BENCHMARK = "seed_spread"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--dense-dir", default=None, help="finished train-stage directory shared by every seed")
    parser.add_argument("--paired", action="store_true",
                        help="train one dense model per seed (PGD-AT, the dataset's defaults) instead of --dense-dir")
    parser.add_argument("--data", default="digits", help="with --paired: the dataset")
    parser.add_argument("--versus", default="prune", help="variant the paired differences are taken against")
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--variants", default="cstar,prune", help="method[:key=value+...] separated by commas")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default="benchmarks/work/seed_spread", help="where the compress runs go")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--name", default=None, help="result file stem (default seed_spread_<data>)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="1 ADMM + 0 fine-tune epochs, 100 test images")
    common.add_allow_dirty(parser)


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """'cstar:rho=0.5' -> (label 'cstar-rho0.5', method 'cstar', {'rho': 0.5})."""
    method, _, options = text.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, options.split("+")):
        key, _, value = item.partition("=")
        overrides[key] = _number(value)
    label = method + "".join(f"-{k}{v}" for k, v in overrides.items())
    return label, method, overrides


def _number(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def summarize(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def dense_runs(args: argparse.Namespace, seeds: list[int]) -> dict[int, StageRun]:
    """Seed -> dense model: --dense-dir for every seed, or (--paired) one trained per seed."""
    from benchmarks.artifacts import DEFAULT_EPS, ensure_dense
    from cstar.manifest import read_manifest

    if not args.paired:
        if not args.dense_dir:
            raise SystemExit("error: pass --dense-dir DIR, or --paired to train one dense model per seed")
        shared = StageRun(Path(args.dense_dir), read_manifest(Path(args.dense_dir), ["train"]), None, True)
        return {seed: shared for seed in seeds}
    epochs = 1 if args.quick else None
    eps = DEFAULT_EPS.get(args.data.split(":", 1)[0])
    return {seed: ensure_dense(args.data, Path(args.work) / f"dense-s{seed}", epochs, eps, seed) for seed in seeds}


def compress_row(label: str, method: str, overrides: dict[str, Any], seed: int, dense: StageRun,
                 args: argparse.Namespace) -> dict[str, Any]:
    """Compress `dense` with this variant and seed (reused when finished); one result row."""
    from cstar.compress import run_compress

    quick = {"admm_epochs": 1, "finetune_epochs": 0, "eval_limit": 100} if args.quick else {}
    out = Path(args.work) / f"{label}-x{args.ratio:g}-s{seed}"
    config = with_bench_suite({"ratio": args.ratio, "method": method, "seed": seed, "eval_dense": False, **quick,
                               **overrides})
    done = run_or_reuse(out, f"{label} seed {seed}",
                        functools.partial(run_compress, dense.directory, out, config=config, progress=False),
                        compress_expect(config, dense.directory))
    metrics, ratios = done.manifest["metrics"], done.manifest["compression"]
    common.log(f"{label} seed {seed}: clean {common.pct(metrics['clean_acc'])} robust {common.pct(metrics['robust_acc'])}")
    return {"variant": label, "seed": seed, "clean_acc": metrics["clean_acc"], "robust_acc": metrics["robust_acc"],
            "n": metrics["n"], "params_ratio": ratios["params_ratio"], "flops_ratio": ratios["flops_ratio"],
            "dense_dir": str(dense.directory), "dense_clean_acc": dense.manifest["metrics"]["clean_acc"],
            "dense_robust_acc": dense.manifest["metrics"]["robust_acc"], "dir": str(out), "seconds": done.seconds}


def paired_differences(rows: list[dict[str, Any]], label: str, versus: str) -> dict[str, Any] | None:
    """Per seed, `label` minus `versus` (and minus its dense model), summarized."""
    base = {r["seed"]: r for r in rows if r["variant"] == versus}
    mine = [r for r in rows if r["variant"] == label and r["seed"] in base]
    if label == versus or not mine:
        return None
    return {"versus": versus,
            "clean": summarize([r["clean_acc"] - base[r["seed"]]["clean_acc"] for r in mine]),
            "robust": summarize([r["robust_acc"] - base[r["seed"]]["robust_acc"] for r in mine]),
            "wins": sum(r["robust_acc"] > base[r["seed"]]["robust_acc"] for r in mine), "pairs": len(mine)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compress every (variant, seed) pair (reusing finished runs) and summarize per variant."""
    common.setup_torch(args.torch_threads)
    seeds = common.parse_list(args.seeds, int)
    rows, summary = [], []
    with common.stopwatch() as total:
        dense = dense_runs(args, seeds)
        variants = [parse_variant(text) for text in common.parse_list(args.variants)]
        for label, method, overrides in variants:
            runs = [compress_row(label, method, overrides, seed, dense[seed], args) for seed in seeds]
            rows += runs
            summary.append({"variant": label, "method": method, "overrides": overrides, "seeds": seeds,
                            "clean": summarize([r["clean_acc"] for r in runs]),
                            "robust": summarize([r["robust_acc"] for r in runs]),
                            "robust_minus_dense": summarize([r["robust_acc"] - r["dense_robust_acc"] for r in runs]),
                            "clean_minus_dense": summarize([r["clean_acc"] - r["dense_clean_acc"] for r in runs]),
                            "params_ratio": runs[0]["params_ratio"], "flops_ratio": runs[0]["flops_ratio"]})
        for item in summary:
            item["paired"] = paired_differences(rows, item["variant"], args.versus)
    first = next(iter(dense.values())).manifest
    dense_rows = [{"seed": seed, "dir": str(run.directory), **{k: run.manifest["metrics"][k]
                   for k in ("clean_acc", "robust_acc", "n")}} for seed, run in dense.items()]
    payload = {"machine": common.machine_info(), "data": first["dataset"]["name"], "paired": args.paired,
               "dense": dense_rows, "dense_summary": {"clean": summarize([d["clean_acc"] for d in dense_rows]),
                                                      "robust": summarize([d["robust_acc"] for d in dense_rows])},
               "ratio": args.ratio, "versus": args.versus, "rows": rows, "summary": summary,
               "seconds": round(total["seconds"], 1)}
    name = args.name or f"{BENCHMARK}_{first['dataset']['name']}"
    return common.publish(name, payload, render(payload), args, total['seconds'])


def _cell(stats: dict[str, float], signed: bool = False) -> str:
    sign = "+" if signed else ""
    return (f"{100 * stats['mean']:{sign}.1f} +- {100 * stats['std']:.1f} "
            f"[{100 * stats['min']:{sign}.1f}..{100 * stats['max']:{sign}.1f}]")


def render(payload: dict[str, Any]) -> str:
    """Markdown: the dense model(s), mean +- std per variant, paired differences, every run."""
    dense = payload["dense_summary"]
    kind = ("one dense model trained per seed, each compressed with the same seed (paired)" if payload["paired"]
            else "one dense model, compressed with each seed")
    head = (f"## Seed spread at {payload['ratio']:g}x ({payload['data']}; budget by params unless a variant "
            "says by=flops)\n\n"
            f"Design: {kind}. Dense: clean {_cell(dense['clean'])} %, APGD {_cell(dense['robust'])} % "
            f"over {len(payload['dense'])} model(s) (on {payload['dense'][0]['n']} test images). "
            "Mean +- sample std over seeds; min..max in brackets; points for differences.\n\n")
    table = common.markdown_table(
        ["variant", "params ratio", "FLOPs ratio", "clean %", "APGD %", "APGD minus dense",
         f"APGD minus {payload['versus']} (wins)"],
        [[s["variant"], f"{s['params_ratio']:.2f}x", f"{s['flops_ratio']:.2f}x", _cell(s["clean"]), _cell(s["robust"]),
          _cell(s["robust_minus_dense"], True),
          f"{_cell(s['paired']['robust'], True)} ({s['paired']['wins']}/{s['paired']['pairs']})" if s["paired"] else "-"]
         for s in payload["summary"]])
    runs = common.markdown_table(["variant", "seed", "clean %", "APGD %", "dense APGD %"],
                          [[r["variant"], str(r["seed"]), common.pct(r["clean_acc"]), common.pct(r["robust_acc"]),
                            common.pct(r["dense_robust_acc"])] for r in payload["rows"]])
    return head + table + "\n### Every run\n\n" + runs


main = common.entry_point(__doc__, add_arguments, run, None)


if __name__ == "__main__":
    raise SystemExit(main())
