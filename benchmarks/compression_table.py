"""Dense robust model vs CSTAR vs robust channel pruning vs uniform low-rank at several params ratios.

Every method gets the same adversarial training budget (`cstar compress` gives the baselines the
ADMM + fine-tune epochs of CSTAR). Per model: clean and PGD-20 robust accuracy (from the compress
manifest), Square robust accuracy (score-based black box, on a class-stratified test subset), params,
FLOPs (MACs) and the params/FLOPs ratios reached. Finished compress directories are reused, so an
interrupted run resumes.

    python benchmarks/compression_table.py [--quick] [--data digits|fashion-mnist:DIR] [--dense-dir DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import StageRun, cached_json, ensure_compress, resolve_dense  # noqa: E402

BENCHMARK = "compression_table"
METHODS = ("cstar", "prune", "lowrank-uniform")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--ratios", default=None, help="params ratios (default 4,8,16; quick 8)")
    parser.add_argument("--methods", default=",".join(METHODS), help="compress methods (default all three)")
    parser.add_argument("--by", default="params", choices=("params", "flops"), help="budget counted in")
    parser.add_argument("--admm-epochs", type=int, default=None, help="CSTAR ADMM epochs (default compress's; quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None,
                        help="fine-tune epochs (default compress's; quick 0); baselines get admm+finetune")
    parser.add_argument("--eval-limit", type=int, default=None,
                        help="stratified test subset of the test metrics (quick 100)")
    parser.add_argument("--eval-suite", default="apgd", choices=("aa", "apgd"),
                        help="attack suite of the test metrics (default apgd: APGD-CE + APGD-T, CPU-sized; aa adds "
                             "Square)")
    parser.add_argument("--eval-steps", type=int, default=None,
                        help="APGD iterations of the test metrics (default: the suite's 100; quick 10)")
    parser.add_argument("--square-queries", type=int, default=None, help="Square query budget (default 1000; quick 50)")
    parser.add_argument("--square-samples", type=int, default=None,
                        help="stratified test images attacked with Square (default 200; quick 50)")
    parser.add_argument("--square-p-init", type=float, default=0.8, help="Square initial square fraction (AutoAttack's 0.8)")
    parser.add_argument("--device", default="auto", help="compress device: auto, cpu, cuda")
    parser.add_argument("--amp", action="store_true", help="compress with CUDA mixed precision")
    parser.add_argument("--channels-last", action="store_true", help="compress with channels_last on CUDA")
    parser.add_argument("--batch-size", type=int, default=None, help="compress training batch (default compress's)")
    parser.add_argument("--workers", type=int, default=0, help="compress data-loader workers")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/full defaults left as None."""
    quick = args.quick
    args.ratios = args.ratios or ("8" if quick else "4,8,16")
    common.quick_epochs(args)
    if quick:
        args.eval_limit = 100 if args.eval_limit is None else args.eval_limit
        args.eval_steps = 10 if args.eval_steps is None else args.eval_steps
    args.square_queries = args.square_queries if args.square_queries is not None else (50 if quick else 1000)
    args.square_samples = args.square_samples if args.square_samples is not None else (50 if quick else 200)
    return args


def compress_config(args: argparse.Namespace) -> dict[str, Any]:
    """The CompressConfig overrides every method shares."""
    config: dict[str, Any] = {"by": args.by, "eval_suite": args.eval_suite, "eval_steps": args.eval_steps,
                              "eval_limit": args.eval_limit,
                              "eval_dense": False, "seed": args.seed, "device": args.device, "amp": args.amp,
                              "channels_last": args.channels_last, "workers": args.workers}
    if args.batch_size is not None:
        config["batch_size"] = args.batch_size
    if args.admm_epochs is not None:
        config["admm_epochs"] = args.admm_epochs
    if args.finetune_epochs is not None:
        config["finetune_epochs"] = args.finetune_epochs
    return config


# ------------------------------------------------------------------------------------------ metrics


def test_subset(spec_dict: dict[str, Any], limit: int | None, seed: int) -> tuple[Any, Any]:
    """The test tensors compress evaluates on (all, or its stratified subset)."""
    from cstar.data import load_dataset_from_spec, stratified_indices, to_tensors

    bundle = load_dataset_from_spec(spec_dict)
    if limit is None:
        return to_tensors(bundle.test)
    return to_tensors(bundle.test, stratified_indices(bundle.labels("test"), limit, seed))


def eval_device(args: argparse.Namespace) -> Any:
    """Where the benchmark's own evaluations run: --device resolved (auto = CUDA when present)."""
    from cstar.train import resolve_device

    return resolve_device(args.device)


def weights_file(model_dir: Path, manifest: dict[str, Any]) -> Path:
    """The weights file a train/compress manifest names."""
    return model_dir / str(manifest["weights"]["file"])


def dense_metrics(dense: StageRun, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Clean accuracy, the suite's worst case and PGD-20 of the dense model on compress's test set
    (the manifest's when it ran the same suite on the same images)."""
    manifest = dense.manifest
    metrics = manifest.get("metrics") or {}
    attack = metrics.get("attack") or {}
    images, labels = test_subset(manifest["dataset"], args.eval_limit, args.seed)
    same_suite = attack.get("suite") == args.eval_suite and not attack.get("iterations_overridden") \
        and args.eval_steps is None
    if args.eval_limit is None and metrics.get("n") == len(labels) and same_suite:
        return {**metrics, "source": "dense manifest"}
    config = {"limit": args.eval_limit, "suite": args.eval_suite, "steps": args.eval_steps, "seed": args.seed}
    return cached_json(cache, [weights_file(dense.directory, manifest)], config,
                       lambda: _evaluate_dense(dense, images, labels, args))


def _evaluate_dense(dense: StageRun, images: Any, labels: Any, args: argparse.Namespace) -> dict[str, Any]:
    from cstar.checkpoint import load_checkpoint
    from cstar.stage_metrics import EvalSpec, stage_metrics

    manifest = dense.manifest
    model, _ = load_checkpoint(dense.directory, eval_device(args))
    result = stage_metrics(model, images, labels, float(manifest.get("eps", 0.0)), str(manifest.get("norm", "linf")),
                           EvalSpec(args.eval_suite, args.eval_steps, seed=args.seed))
    return {**result, "source": "evaluated here"}


def square_metrics(model_dir: Path, manifest: dict[str, Any], args: argparse.Namespace,
                   cache_dir: Path) -> dict[str, Any]:
    """Square robust accuracy of the PyTorch model on a stratified test subset (cached per weights)."""
    config = {"queries": args.square_queries, "samples": args.square_samples, "p_init": args.square_p_init,
              "seed": args.seed}
    return cached_json(cache_dir / f"{model_dir.name}.json", [weights_file(model_dir, manifest)], config,
                       lambda: _square(model_dir, manifest, args))


def _square(model_dir: Path, manifest: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from cstar.attacks import torch_predict_fn
    from cstar.checkpoint import load_checkpoint
    from cstar.square import square_attack

    images, labels = test_subset(manifest["dataset"], args.square_samples, args.seed)
    model, _ = load_checkpoint(model_dir, eval_device(args))
    with common.stopwatch() as t:
        result = square_attack(torch_predict_fn(model), images.numpy(), labels.numpy(), float(manifest["eps"]),
                               n_queries=args.square_queries, p_init=args.square_p_init, seed=args.seed)
    return {"robust_acc": result.robust_acc, "queries": args.square_queries, "n": int(labels.shape[0]),
            "mean_queries": result.mean_queries, "p_init": args.square_p_init, "seconds": round(t["seconds"], 2)}


# --------------------------------------------------------------------------------------------- rows


def dense_row(dense: StageRun, metrics: dict[str, Any], square: dict[str, Any]) -> dict[str, Any]:
    """The reference row (ratios 1)."""
    manifest = dense.manifest
    return {"model": "dense", "method": "dense", "target_ratio": 1.0, "params": manifest["params"],
            "flops": manifest["flops"], "params_ratio": 1.0, "flops_ratio": 1.0,
            "clean_acc": metrics["clean_acc"], "robust_acc": metrics["robust_acc"],
            "pgd_robust_acc": metrics.get("pgd20_robust_acc"),
            "square_robust_acc": square["robust_acc"], "square": square, "attack": metrics.get("attack"),
            "n": metrics.get("n"), "dir": str(dense.directory), "seconds": dense.seconds}


def compressed_row(run: StageRun, square: dict[str, Any]) -> dict[str, Any]:
    """One compressed model's row from its compress manifest."""
    manifest, ratios = run.manifest, run.manifest["compression"]
    config = manifest.get("config") or {}
    return {"model": f"{manifest['method']}-x{float(ratios['target']):g}", "method": manifest["method"],
            "target_ratio": float(ratios["target"]), "params": ratios["params"], "flops": ratios["flops"],
            "params_ratio": ratios["params_ratio"], "flops_ratio": ratios["flops_ratio"],
            "clean_acc": manifest["metrics"]["clean_acc"], "robust_acc": manifest["metrics"]["robust_acc"],
            "pgd_robust_acc": manifest["metrics"].get("pgd20_robust_acc"),
            "square_robust_acc": square["robust_acc"], "square": square, "attack": manifest["metrics"].get("attack"),
            "n": manifest["metrics"].get("n"), "epochs": {"admm": config.get("admm_epochs"),
                                                           "finetune": config.get("finetune_epochs")},
            "dir": str(run.directory), "seconds": run.seconds, "reused": run.reused}


def comparison(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """CSTAR minus prune (and minus uniform low-rank) in points, per ratio."""
    by_key = {(r["method"], r["target_ratio"]): r for r in rows}
    out = []
    for ratio in sorted({r["target_ratio"] for r in rows if r["method"] == "cstar"}):
        cstar = by_key[("cstar", ratio)]
        for other in ("prune", "lowrank-uniform"):
            if (other, ratio) in by_key:
                base = by_key[(other, ratio)]
                out.append({"ratio": ratio, "versus": other, **{
                    f"{k}_points": round(100.0 * (cstar[f"{k}_acc"] - base[f"{k}_acc"]), 2)
                    for k in ("clean", "robust", "pgd_robust", "square_robust")}})
    return out


# ------------------------------------------------------------------------------------------ markdown


def table_markdown(rows: list[dict[str, Any]], queries: int, suite: str) -> str:
    """The main table: the suite's worst case is the robust headline; PGD-20 and Square beside it."""
    headers = ["model", "params", "FLOPs (MACs)", "params ratio", "FLOPs ratio", "clean %",
               f"robust % ({suite} worst case)", "PGD-20 % (training-time check)", f"Square-{queries} %"]
    body = [[r["model"], str(r["params"]), str(r["flops"]), f"{r['params_ratio']:.2f}x", f"{r['flops_ratio']:.2f}x",
             common.pct(r["clean_acc"]), common.pct(r["robust_acc"]), common.pct(r["pgd_robust_acc"]), common.pct(r["square_robust_acc"])]
            for r in rows]
    return common.markdown_table(headers, body)


def comparison_markdown(items: list[dict[str, Any]], suite: str) -> str:
    """The CSTAR-minus-baseline paragraph next to the paper's claim."""
    if not items:
        return "No CSTAR/baseline pair to compare.\n"
    lines = []
    for item in items:
        lines.append(f"- {item['ratio']:g}x params, CSTAR minus {item['versus']}: "
                     f"{item['clean_points']:+.1f} clean, {item['robust_points']:+.1f} robust ({suite} worst case), "
                     f"{item['pgd_robust_points']:+.1f} PGD-20, "
                     f"{item['square_robust_points']:+.1f} Square robust points.")
    claim = (f"The paper reports +{common.PAPER_CLAIM['clean_points']} clean / +{common.PAPER_CLAIM['robust_points']} robust "
             f"points for CSTAR over robust structured pruning ({common.PAPER_CLAIM['setting']}).")
    return "\n".join(lines) + "\n\n" + claim + "\n"


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    cfg = payload["config"]
    head = (f"## Compression table ({payload['data']}, eps {payload['eps']:g})\n\n"
            f"Budget by {cfg['by']}; training per method: ADMM {cfg['admm_epochs']} + fine-tune "
            f"{cfg['finetune_epochs']} epochs for CSTAR, the same total for the baselines. Robust: the per-example "
            f"worst case of the `{cfg['eval_suite']}` suite ({_suite_words(cfg)}) on {payload['rows'][0]['n']} test "
            f"images, PGD-20 beside it on the same images; Square ({cfg['square_queries']} queries, p_init "
            f"{cfg['square_p_init']}) on a stratified subset of {cfg['square_samples']}.\n\n")
    return (head + table_markdown(payload["rows"], cfg["square_queries"], cfg["eval_suite"])
            + "\n### CSTAR vs baselines\n\n" + comparison_markdown(payload["comparison"], cfg["eval_suite"]))


def _suite_words(cfg: dict[str, Any]) -> str:
    """'APGD-CE + APGD-T over 3 targets, 100 iterations each' for the method line."""
    iters = cfg.get("eval_steps") or 100
    targets = 9 if cfg["eval_suite"] == "aa" else 3
    square = ", then Square-5000" if cfg["eval_suite"] == "aa" else ""
    return f"APGD-CE + APGD-T over {targets} targets, {iters} iterations each{square}"


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Produce every row and write the results; returns the payload."""
    from cstar.compress import CompressConfig

    common.setup_torch(args.torch_threads)
    machine = common.machine_info()
    root = common.work_root(args.data, args.quick, args.work)
    with common.stopwatch() as total:
        dense = resolve_dense(args, root)
        config = compress_config(args)
        rows = [dense_row(dense, dense_metrics(dense, args, root / "dense_eval.json"),
                          square_metrics(dense.directory, dense.manifest, args, root / "square"))]
        for ratio in common.parse_list(args.ratios, float):
            for method in common.parse_list(args.methods):
                compressed = ensure_compress(dense.directory, root / "compress", method, ratio, config)
                rows.append(compressed_row(compressed, square_metrics(compressed.directory, compressed.manifest,
                                                                      args, root / "square")))
                common.log(f"{rows[-1]['model']}: clean {common.pct(rows[-1]['clean_acc'])} robust {common.pct(rows[-1]['robust_acc'])} "
                    f"pgd {common.pct(rows[-1]['pgd_robust_acc'])} "
                    f"square {common.pct(rows[-1]['square_robust_acc'])}")
    defaults = CompressConfig()
    payload = {
        "machine": machine, "data": args.data, "eps": float(dense.manifest.get("eps", 0.0)),
        "dense": {"dir": str(dense.directory), "config": dense.manifest.get("config"),
                  "model": dense.manifest.get("model")},
        "config": {"by": args.by, "ratios": common.parse_list(args.ratios, float), "methods": common.parse_list(args.methods),
                   "admm_epochs": config.get("admm_epochs", defaults.admm_epochs),
                   "finetune_epochs": config.get("finetune_epochs", defaults.finetune_epochs),
                   "eval_suite": args.eval_suite, "eval_steps": args.eval_steps, "eval_limit": args.eval_limit,
                   "square_queries": args.square_queries, "square_samples": args.square_samples,
                   "square_p_init": args.square_p_init, "seed": args.seed, "torch_threads": args.torch_threads},
        "rows": rows, "comparison": comparison(rows), "paper_claim": common.PAPER_CLAIM,
        "seconds": round(total["seconds"], 1),
    }
    return common.publish(common.result_name(BENCHMARK, args.data), payload, render(payload), args, total['seconds'])


def main_namespace(argv: list[str]) -> dict[str, Any]:
    """Parse `argv` like the command line and run; returns the payload (for driver scripts)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return run(resolve_defaults(parser.parse_args(argv)))


main = common.entry_point(__doc__, add_arguments, run, resolve_defaults)


if __name__ == "__main__":
    sys.exit(main())
