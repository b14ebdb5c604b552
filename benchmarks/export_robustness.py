"""Does robustness survive deployment? PyTorch vs ONNX FP32 vs INT8 on ONNX Runtime CPU, per method.

Per model (dense and each compress method at one ratio): `cstar attackset` on the PyTorch model
(PGD-20 and FGSM crafted white-box), then `cstar verify` on the FP32 export and on the INT8
calibrate directory (transfer replay + Square attack on the runtime itself). The PyTorch row gets
the same Square attack (same subset, seed, queries) through cstar.attacks.torch_predict_fn.

    python benchmarks/export_robustness.py [--quick] [--ratio 8] [--from-table-dir benchmarks/work/digits]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.artifacts import (  # noqa: E402
    Expect,
    StageRun,
    cached_json,
    check_reusable,
    compressed_set,
    ensure_attackset,
    ensure_calibrate,
    ensure_export,
    read_json,
    resolve_dense,
)

BENCHMARK = "export_robustness"
TIERS = ("pytorch", "onnx-fp32", "int8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of this benchmark."""
    common.add_common_arguments(parser)
    parser.add_argument("--from-table-dir", default=None,
                        help="work directory of compression_table (its compress/ runs are reused; default: --work)")
    parser.add_argument("--ratio", type=float, default=8.0, help="params ratio of the compressed models (default 8)")
    parser.add_argument("--methods", default="cstar,prune,lowrank-uniform", help="compress methods")
    parser.add_argument("--admm-epochs", type=int, default=None, help="for compress runs made here (quick 1)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="for compress runs made here (quick 0)")
    parser.add_argument("--samples", type=int, default=None, help="attack set size, stratified (200; quick 50)")
    parser.add_argument("--square-queries", type=int, default=None, help="Square queries (1000; quick 50)")
    parser.add_argument("--square-samples", type=int, default=None, help="examples attacked by Square (200; quick 50)")
    parser.add_argument("--square-p-init", type=float, default=0.8, help="Square initial square fraction (AutoAttack's 0.8)")
    parser.add_argument("--calib-samples", type=int, default=None, help="INT8 calibration images (256; quick 64)")
    parser.add_argument("--parity-samples", type=int, default=None, help="calibrate's eval images (200; quick 50)")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1; 0 = ORT's)")


def resolve_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the quick/full defaults left as None."""
    quick = args.quick
    args.samples = args.samples or (50 if quick else 200)
    args.square_queries = args.square_queries if args.square_queries is not None else (50 if quick else 1000)
    args.square_samples = args.square_samples or (50 if quick else 200)
    args.calib_samples = args.calib_samples or (64 if quick else 256)
    args.parity_samples = args.parity_samples or (50 if quick else 200)
    common.quick_epochs(args)
    args.threads = args.threads or None
    return args


# ------------------------------------------------------------------------------------------ attacks


def pytorch_square(model_dir: Path, set_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Square on the PyTorch model over the subset verify attacks (same seed, queries, p_init); cached."""
    from deploy.attackset import SET_FILE

    weights = model_dir / read_json(model_dir / "manifest.json")["weights"]["file"]
    config = {"queries": args.square_queries, "samples": args.square_samples, "p_init": args.square_p_init,
              "seed": args.seed, "started_from_transfer": True}
    return cached_json(set_dir.parent / "pytorch_square.json", [set_dir / SET_FILE, weights], config,
                       lambda: _pytorch_square(model_dir, set_dir, args))


def _pytorch_square(model_dir: Path, set_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from cstar.attacks import torch_predict_fn
    from cstar.checkpoint import load_checkpoint
    from cstar.square import square_attack
    from deploy.verify import load_attackset, stratified_subset

    common.log(f"{model_dir.name}: PyTorch Square")
    attack_set = load_attackset(set_dir)
    subset = stratified_subset(attack_set.labels, min(args.square_samples, attack_set.n), args.seed)
    model, _ = load_checkpoint(model_dir)
    starts = [attack_set.adv[a][subset] for a in sorted(attack_set.adv)]  # as verify: from the transfer examples
    result = square_attack(torch_predict_fn(model), attack_set.x[subset], attack_set.labels[subset],
                           float(attack_set.manifest["eps"]), n_queries=args.square_queries,
                           p_init=args.square_p_init, seed=args.seed, x_init=starts or None)
    return {"queries": args.square_queries, "robust_acc": result.robust_acc, "n": int(subset.size),
            "mean_queries": result.mean_queries, "worst_case_robust_acc": worst_case(attack_set, subset, ~result.success)}


def worst_case(attack_set: Any, subset: Any, square_robust: Any) -> float:
    """Fraction of the Square subset that survives every attack (clean, each transfer attack, Square), as verify."""
    labels = attack_set.labels[subset]
    alive = (attack_set.ref_clean[subset].argmax(axis=1) == labels) & square_robust
    for logits in attack_set.ref_adv.values():
        alive &= logits[subset].argmax(axis=1) == labels
    return float(alive.mean()) if alive.size else 0.0


def report_expect(artifact_dir: Path, set_dir: Path, args: argparse.Namespace, backend: str = "ort-cpu") -> Expect:
    """What a verify report must match to be reused: this artifact and attack set on `backend`, this Square budget."""
    set_n = int(read_json(set_dir / "manifest.json")["set"]["n"])
    config: dict[str, Any] = {"backend": backend, "artifact.path": str(artifact_dir.resolve()),
                              "set.path": str(set_dir.resolve())}
    if args.square_queries > 0 and min(args.square_samples, set_n) > 0:
        config.update({"metrics.runtime.square.queries": args.square_queries,
                       "metrics.runtime.square.n": min(args.square_samples, set_n),
                       "metrics.runtime.square.p_init": args.square_p_init,
                       "metrics.runtime.square.seed": args.seed,
                       "metrics.runtime.square.restarts": 1,
                       "metrics.runtime.square.started_from_transfer": True})
    else:
        config["metrics.runtime.square"] = None
    return Expect(config=config)


def report_inputs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The files a verify report was made from, with the sha256 it recorded: the model, the attack set."""
    from deploy.attackset import SET_FILE

    artifact, attack_set = report.get("artifact") or {}, report.get("set") or {}
    return [{"path": str(Path(str(artifact.get("path", ""))) / str(artifact.get("model", ""))),
             "sha256": artifact.get("sha256")},
            {"path": str(Path(str(attack_set.get("path", ""))) / SET_FILE), "sha256": attack_set.get("sha256")}]


def verify(artifact_dir: Path, set_dir: Path, out: Path, args: argparse.Namespace,
           backend: str = "ort-cpu") -> dict[str, Any]:
    """run_verify on `backend`; a finished report is reused only if it passes the same check as a stage
    directory (its artifact and attack set unchanged, the same Square budget), else StaleWork."""
    from deploy.verify import run_verify

    report_path = out / "report.json"
    if report_path.is_file():
        report = read_json(report_path)
        check_reusable(out, report, report_inputs(report), report_expect(artifact_dir, set_dir, args, backend))
        return report
    common.log(f"verify {artifact_dir.parent.name}/{artifact_dir.name} on {backend} (Square {args.square_queries} queries)")
    return run_verify(artifact_dir, set_dir, out, backend=backend, square_queries=args.square_queries,
                      square_samples=args.square_samples, square_p_init=args.square_p_init, seed=args.seed,
                      threads=args.threads, raise_on_fail=False)


def tier_row(model: str, tier: str, metrics: dict[str, Any], square: dict[str, Any] | None,
             report: dict[str, Any] | None) -> dict[str, Any]:
    """One (model, tier) row."""
    transfer = metrics.get("transfer") or {}
    return {"model": model, "tier": tier, "clean_acc": metrics["clean_acc"],
            "apgd_transfer_robust_acc": transfer.get("apgd_t"),
            "pgd_transfer_robust_acc": transfer.get("pgd"), "fgsm_transfer_robust_acc": transfer.get("fgsm"),
            "square_robust_acc": (square or {}).get("robust_acc"), "square": square,
            "agreement": metrics.get("agreement"), "max_abs_diff": metrics.get("max_abs_diff"),
            "worst_case_robust_acc": (square or {}).get("worst_case_robust_acc") if tier == "pytorch"
            else metrics.get("worst_case_robust_acc"),
            "verify_passed": None if report is None else report["passed"],
            "failed_checks": None if report is None else report["failed_checks"],
            "warnings": None if report is None else report.get("warnings")}


def model_rows(key: str, run: StageRun, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """attackset + export + calibrate + two verifies + PyTorch Square for one model."""
    base = root / "artifacts" / run.directory.name
    work = root / "robustness" / run.directory.name
    attack_set = ensure_attackset(run.directory, args.data, work / "attackset", args.samples, args.seed)
    export = ensure_export(run.directory, base / "onnx")
    int8 = ensure_calibrate(export.directory, base / "int8", args.data, args.calib_samples, args.parity_samples)
    reports = {"onnx-fp32": verify(export.directory, attack_set.directory, work / "verify-fp32", args),
               "int8": verify(int8.directory, attack_set.directory, work / "verify-int8", args)}
    square = pytorch_square(run.directory, attack_set.directory, args)
    reference = next(iter(reports.values()))["metrics"]["reference"]
    rows = [tier_row(key, "pytorch", reference, square, None)]
    rows += [tier_row(key, tier, report["metrics"]["runtime"], report["metrics"]["runtime"].get("square"), report)
             for tier, report in reports.items()]
    return rows


# ------------------------------------------------------------------------------------------ markdown


def render(payload: dict[str, Any]) -> str:
    """NAME.md body."""
    cfg = payload["config"]
    head = (f"## Robustness after export ({payload['data']}, x{cfg['ratio']:g} params, eps {payload['eps']:g})\n\n"
            f"Attack set: {cfg['samples']} stratified test images, APGD-CE, APGD-T (the apgd suite; APGD transfer = "
            "the APGD-T set, which carries APGD-CE's example where that already fooled the model), PGD-20 and FGSM "
            "crafted on the PyTorch model and "
            f"replayed (transfer). Square: {cfg['square_queries']} queries on {cfg['square_samples']} of them, run "
            "against each tier itself. worst case = correct under every attack, on the Square subset (for the "
            "PyTorch row computed here the same way `cstar verify` does for the runtimes). Runtime: ONNX Runtime "
            "CPU. verify = the `cstar verify` gate.\n\n")
    headers = ["model", "tier", "clean %", "APGD transfer %", "PGD-20 transfer %", "FGSM transfer %",
               f"Square-{cfg['square_queries']} %",
               "worst case %", "agreement", "verify"]
    body = [[r["model"], r["tier"], common.pct(r["clean_acc"]), common.pct(r["apgd_transfer_robust_acc"]),
             common.pct(r["pgd_transfer_robust_acc"]),
             common.pct(r["fgsm_transfer_robust_acc"]), common.pct(r["square_robust_acc"]), common.pct(r["worst_case_robust_acc"]),
             "(reference)" if r["tier"] == "pytorch" or r["agreement"] is None else f"{r['agreement']:.3f}",
             "-" if r["verify_passed"] is None else ("pass" if r["verify_passed"] else
                                                      "FAIL: " + ", ".join(r["failed_checks"]))]
            for r in payload["rows"]]
    return head + common.markdown_table(headers, body)


# ---------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every model's three tiers; writes the results and returns the payload."""
    common.setup_torch(args.torch_threads)
    machine = common.machine_info(args.threads)
    root = common.work_root(args.data, args.quick, args.work)
    with common.stopwatch() as total:
        dense = resolve_dense(args, root)
        table_root = Path(args.from_table_dir) if args.from_table_dir else root
        runs = {"dense": dense, **compressed_set(dense.directory, table_root / "compress", common.parse_list(args.methods),
                                                 [args.ratio], common.own_compress_config(args))}
        rows = [row for key, run_ in runs.items() for row in model_rows(key, run_, root, args)]
    payload = {"machine": machine, "data": args.data, "eps": float(dense.manifest.get("eps", 0.0)),
               "dense_dir": str(dense.directory),
               "models": {key: str(run_.directory) for key, run_ in runs.items()},
               "config": {"ratio": args.ratio, "samples": args.samples, "square_queries": args.square_queries,
                          "square_samples": args.square_samples, "square_p_init": args.square_p_init,
                          "calib_samples": args.calib_samples, "threads": args.threads, "backend": "ort-cpu",
                          "seed": args.seed, "torch_threads": args.torch_threads},
               "rows": rows, "seconds": round(total["seconds"], 1)}
    return common.publish(common.result_name(BENCHMARK, args.data), payload, render(payload), args, total['seconds'])


main = common.entry_point(__doc__, add_arguments, run, resolve_defaults)


if __name__ == "__main__":
    sys.exit(main())
