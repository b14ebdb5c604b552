"""Run-to-run spread of compression results: the same dense model compressed with several seeds.

The digits test split has 360 images, so one run's robust accuracy carries about +-2.6 points of
binomial noise alone, and the seed also changes the data order, PGD starts and the validation split
that picks the best epoch. A claim such as "CSTAR beats pruning" needs the mean over seeds and its
spread, which this script measures. Variants are `method[:key=value+key=value]` (CompressConfig
keys), separated by commas.

    python benchmarks/seed_spread.py --dense-dir DIR --variants cstar,cstar:rho=0.5,prune --seeds 0,1,2
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

from benchmarks.artifacts import StageRun, run_or_reuse  # noqa: E402
from benchmarks.common import (  # noqa: E402
    log,
    machine_info,
    markdown_table,
    parse_list,
    pct,
    run_cli,
    setup_torch,
    stopwatch,
    write_results,
)

BENCHMARK = "seed_spread"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    parser.add_argument("--dense-dir", required=True, help="finished train-stage directory")
    parser.add_argument("--ratio", type=float, default=8.0)
    parser.add_argument("--variants", default="cstar,prune", help="method[:key=value+...] separated by commas")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--work", default="benchmarks/work/seed_spread", help="where the compress runs go")
    parser.add_argument("--results-dir", default=None)
    parser.add_argument("--name", default=None, help="result file stem (default seed_spread_<data>)")
    parser.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="1 ADMM + 0 fine-tune epochs, 100 test images")


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


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Compress every (variant, seed) pair (reusing finished runs) and summarize per variant."""
    from cstar.compress import run_compress
    from cstar.manifest import read_manifest

    setup_torch(args.torch_threads)
    dense_dir, work = Path(args.dense_dir), Path(args.work)
    dense = read_manifest(dense_dir, ["train"])
    seeds = parse_list(args.seeds, int)
    quick = {"admm_epochs": 1, "finetune_epochs": 0, "eval_limit": 100} if args.quick else {}
    rows, summary = [], []
    with stopwatch() as total:
        for text in parse_list(args.variants):
            label, method, overrides = parse_variant(text)
            runs = []
            for seed in seeds:
                out = work / f"{label}-x{args.ratio:g}-s{seed}"
                config = {"ratio": args.ratio, "method": method, "seed": seed, "eval_dense": False,
                          **quick, **overrides}
                done: StageRun = run_or_reuse(out, f"{label} seed {seed}",
                                              functools.partial(run_compress, dense_dir, out, config=config,
                                                                progress=False))
                metrics = done.manifest["metrics"]
                runs.append({"variant": label, "seed": seed, "clean_acc": metrics["clean_acc"],
                             "robust_acc": metrics["robust_acc"], "n": metrics["n"],
                             "params_ratio": done.manifest["compression"]["params_ratio"],
                             "flops_ratio": done.manifest["compression"]["flops_ratio"], "dir": str(out),
                             "seconds": done.seconds})
                log(f"{label} seed {seed}: clean {pct(metrics['clean_acc'])} robust {pct(metrics['robust_acc'])}")
            rows += runs
            summary.append({"variant": label, "method": method, "overrides": overrides, "seeds": seeds,
                            "clean": summarize([r["clean_acc"] for r in runs]),
                            "robust": summarize([r["robust_acc"] for r in runs]),
                            "params_ratio": runs[0]["params_ratio"], "flops_ratio": runs[0]["flops_ratio"]})
    payload = {"machine": machine_info(), "data": dense["dataset"]["name"], "dense_dir": str(dense_dir),
               "dense": dense["metrics"], "ratio": args.ratio, "rows": rows, "summary": summary,
               "seconds": round(total["seconds"], 1)}
    name = args.name or f"{BENCHMARK}_{dense['dataset']['name']}"
    paths = write_results(name, payload, render(payload), args.quick, args.results_dir)
    log(f"wrote {paths[0]} and {paths[1]} ({total['seconds']:.0f}s)")
    return payload


def render(payload: dict[str, Any]) -> str:
    """Markdown: the dense reference, then mean +- std per variant and every run."""
    dense = payload["dense"]
    head = (f"## Seed spread at {payload['ratio']:g}x params ({payload['data']})\n\n"
            f"Dense reference: clean {pct(dense['clean_acc'])} %, PGD-20 {pct(dense['robust_acc'])} % "
            f"on {dense['n']} test images. Mean +- sample std over seeds; min..max in brackets.\n\n")

    def cell(stats: dict[str, float]) -> str:
        return (f"{100 * stats['mean']:.1f} +- {100 * stats['std']:.1f} "
                f"[{100 * stats['min']:.1f}..{100 * stats['max']:.1f}]")

    table = markdown_table(["variant", "seeds", "params ratio", "FLOPs ratio", "clean %", "PGD-20 %"],
                           [[s["variant"], ",".join(map(str, s["seeds"])), f"{s['params_ratio']:.2f}x",
                             f"{s['flops_ratio']:.2f}x", cell(s["clean"]), cell(s["robust"])]
                            for s in payload["summary"]])
    runs = markdown_table(["variant", "seed", "clean %", "PGD-20 %"],
                          [[r["variant"], str(r["seed"]), pct(r["clean_acc"]), pct(r["robust_acc"])]
                           for r in payload["rows"]])
    return head + table + "\n### Every run\n\n" + runs


def main(argv: list[str] | None = None) -> int:
    """CLI entry."""
    return run_cli(__doc__, add_arguments, run, None, argv)


if __name__ == "__main__":
    raise SystemExit(main())
