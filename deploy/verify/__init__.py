"""`cstar verify`: re-check accuracy and adversarial robustness ON the deployed runtime (torch-free).

The transfer set (crafted on the PyTorch reference by `cstar attackset`) is replayed on the runtime,
and the score-based Square attack (`cstar.square`, numpy) attacks the runtime itself, so a model
whose robustness was lost (or only hidden, e.g. gradient masking after INT8 quantization) in
deployment is caught. The worst case over every attack is gated against the reference.

Device side: numpy, stdlib, cstar.manifest/errors/square/outdir and deploy.artifact/backends only; torch
is imported (through deploy.attackset) only in the host convenience branch `--reference`.

The package, one concern per module: `options` (Square budget defaults and gate thresholds, checked as
arguments), `attack_set` (loading the set and pairing it with the artifact), `runner` (backend and
runner options; bench and profile use it too), `metrics` (runtime and reference measurements, Square
on the runtime), `gates` (the gate checks and warnings), `report` (the report directory, report.json's
content, the summary line) and `stage` (`run_verify` and the command). Imports go one way:
options, attack_set, runner <- metrics, gates, report <- stage.
"""

from cstar.square import NORMS as SQUARE_NORMS
from deploy.verify.attack_set import (
    SET_KEYS,
    AttackSet,
    check_compatible,
    check_threat_model,
    load_attackset,
    threat_model,
    twin_warnings,
)
from deploy.verify.gates import (
    GRADIENT_MASKING_POINTS,
    GRADIENT_MASKING_WARNING,
    SQUARE_STALL_POINTS,
    SQUARE_STALLED_WARNING,
    failed_checks,
    gate_checks,
    reference_warnings,
    square_warnings,
)
from deploy.verify.metrics import (
    alone_check,
    correct,
    mean_of,
    reference_metrics,
    runtime_metrics,
    square_block,
    stratified_subset,
)
from deploy.verify.options import (
    SQUARE_P_INIT,
    SQUARE_QUERIES,
    SQUARE_SAMPLES_CAP,
    SQUARE_STRICT_CAP,
    SQUARE_STRICT_QUERIES,
    Thresholds,
    add_square_arguments,
    check_square_args,
    square_plan,
)
from deploy.verify.report import assemble_report, report_claim, set_record, summary_line
from deploy.verify.runner import resolve_backend, runner_options
from deploy.verify.stage import add_arguments, main, run_verify

__all__ = [
    "GRADIENT_MASKING_POINTS", "GRADIENT_MASKING_WARNING", "SET_KEYS", "SQUARE_NORMS", "SQUARE_P_INIT",
    "SQUARE_QUERIES", "SQUARE_SAMPLES_CAP", "SQUARE_STALLED_WARNING", "SQUARE_STALL_POINTS", "SQUARE_STRICT_CAP",
    "SQUARE_STRICT_QUERIES", "AttackSet", "Thresholds", "add_arguments", "add_square_arguments", "alone_check", "assemble_report",
    "check_compatible", "check_square_args", "check_threat_model", "correct", "failed_checks", "gate_checks",
    "load_attackset", "main", "mean_of", "reference_metrics", "reference_warnings", "report_claim",
    "resolve_backend", "run_verify", "runner_options", "runtime_metrics", "set_record", "square_block",
    "square_plan", "square_warnings", "stratified_subset", "summary_line", "threat_model", "twin_warnings",
]
