"""The `cstar verify` command: its options, `main`, and `run_verify`, which ties the package together.

`run_verify` claims the report directory, checks the options, loads and pairs the attack set with the
artifact, measures the runtime (deploy.verify.metrics), gates it against the reference
(deploy.verify.gates) and writes report.{json,md,png}. Nothing is measured before every input has been
checked, and the report is written before a failed gate is raised. Only the host convenience branch
`--reference` imports torch (through deploy.attackset), lazily; the artifact and backend registry
are imported when a run starts, so `cstar verify --help` stays light.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from cstar.errors import CstarError, GateFailure
from cstar.square import NORMS as SQUARE_NORMS
from deploy.report import write_report
from deploy.verify.attack_set import check_compatible, load_attackset, threat_model
from deploy.verify.gates import failed_checks, gate_checks, reference_warnings, square_warnings
from deploy.verify.metrics import reference_metrics, runtime_metrics
from deploy.verify.options import (
    SQUARE_P_INIT,
    Thresholds,
    add_square_arguments,
    check_square_args,
    square_plan,
)
from deploy.verify.report import assemble_report, report_claim, summary_line
from deploy.verify.runner import resolve_backend, runner_options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar verify`."""
    parser.add_argument("--artifact", required=True, help="export, calibrate or build directory")
    parser.add_argument("--backend", default=None, help="runtime backend (default: the artifact's build backend or ort-cpu)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--set", dest="set_dir", help="attack set directory written by `cstar attackset`")
    source.add_argument("--reference", help="host convenience: craft the set now from this train/compress directory "
                                            "(needs torch and --data)")
    parser.add_argument("--data", help="dataset for --reference")
    parser.add_argument("--samples", type=int, default=500, help="set size for --reference (default 500; 0 = all)")
    add_square_arguments(parser)
    parser.add_argument("--max-robust-drop", type=float, default=2.0,
                        help="max points reference PGD robust acc - runtime worst-case robust acc (default 2.0)")
    parser.add_argument("--max-clean-drop", type=float, default=1.0, help="max clean accuracy drop in points (default 1.0)")
    parser.add_argument("--min-agreement", type=float, default=0.98,
                        help="min top-1 agreement with the reference on clean inputs (default 0.98)")
    parser.add_argument("--threads", type=int, default=None, help="runtime intra-op threads (ONNX Runtime backends)")
    parser.add_argument("--out", required=True, help="report directory (report.json, report.md, report.png)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing report directory at --out")


def main(args: argparse.Namespace) -> int:
    """CLI entry: verify, print a summary; GateFailure (exit 1) when a check fails."""
    set_dir = args.set_dir
    if args.reference is not None:
        set_dir = _craft_reference_set(args)
    thresholds = Thresholds(args.min_agreement, args.max_clean_drop, args.max_robust_drop)
    report = run_verify(args.artifact, set_dir, args.out, backend=args.backend, thresholds=thresholds,
                        square_queries=args.square_queries, square_samples=args.square_samples,
                        square_p_init=args.square_p_init, square_restarts=args.square_restarts, strict=args.strict,
                        seed=args.seed, threads=args.threads, raise_on_fail=False, force=args.force)
    print(summary_line(report))
    if not report["passed"]:
        raise GateFailure(f"verify on {report['backend']} failed: {', '.join(report['failed_checks'])} "
                          f"(see {Path(args.out) / 'report.md'})",
                          "inspect the report; recalibrate/recompress or relax the thresholds deliberately")
    return 0


def _craft_reference_set(args: argparse.Namespace) -> str:
    """`--reference`: craft the set into OUT/attackset now (host only: torch); returns its directory."""
    if not args.data:
        raise CstarError("--reference needs --data", "pass --data NAME (the reference's dataset)")
    from deploy.attackset import run_attackset  # host only: torch

    report_claim(args.out, args.artifact, None, args.force)  # refuse a wrong --out before crafting
    set_dir = str(Path(args.out) / "attackset")
    run_attackset(args.reference, args.data, set_dir, samples=args.samples, seed=args.seed, force=args.force)
    return set_dir


def run_verify(
    artifact_dir: str | Path, set_dir: str | Path, out: str | Path, backend: str | None = None,
    thresholds: Thresholds | None = None, square_queries: int | None = None, square_samples: int | None = None,
    square_p_init: float = SQUARE_P_INIT, square_restarts: int = 1, strict: bool = False, seed: int = 0,
    threads: int | None = None, raise_on_fail: bool = True, force: bool = False,
) -> dict[str, Any]:
    """Verify an artifact on a runtime against a transfer set; write report.{json,md,png}.

    Square: `square_queries` None = 1000 (5000 with `strict`), on `square_samples` examples (None = the set
    capped at 200, 1000 with `strict`). Raises GateFailure (after writing the report) when a check fails
    and `raise_on_fail`. `out` follows cstar.outdir's rule (`force` overwrites an existing report).
    """
    from deploy.artifact import load_artifact, open_runner

    started = time.perf_counter()
    claim = report_claim(out, artifact_dir, set_dir, force)
    thresholds = thresholds or Thresholds()
    check_square_args(square_queries, square_samples, square_p_init, square_restarts, seed)
    attack_set = load_attackset(set_dir)
    square_queries, square_samples = square_plan(attack_set.n, square_queries, square_samples, strict)
    artifact = load_artifact(artifact_dir)
    warnings = check_compatible(artifact, attack_set)
    backend = resolve_backend(artifact, backend)
    eps, norm = threat_model(artifact, attack_set)
    if norm not in SQUARE_NORMS and square_queries > 0:
        warnings.append(f"the Square attack supports {', '.join(SQUARE_NORMS)}; skipped for norm '{norm}'")
    square_args = {"queries": square_queries, "samples": square_samples, "p_init": square_p_init,
                   "restarts": square_restarts, "seed": seed, "strict": strict}
    with open_runner(artifact, backend, **runner_options(backend, threads)) as runner:
        runtime, masks = runtime_metrics(runner, attack_set, eps, norm, square_args)
        runner_info = runner.describe()
    reference = reference_metrics(attack_set)
    warnings += square_warnings(runtime) + reference_warnings(attack_set.manifest)
    checks = gate_checks(reference, runtime, attack_set, masks["subset"], thresholds)
    failed = failed_checks(checks)
    report = assemble_report(artifact, backend, attack_set, eps, norm, thresholds, checks, failed,
                             {"reference": reference, "runtime": runtime}, warnings, runner_info, started)
    with claim as report_dir:
        write_report(report_dir, report)
    if failed and raise_on_fail:
        raise GateFailure(f"verify on {backend} failed: {', '.join(failed)}", f"see {Path(out) / 'report.md'}")
    return report
