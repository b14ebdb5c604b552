"""`cstar pipeline`: every stage from one config, skipping stages whose outputs are already valid.

Each stage is run through the same command-line entry point a user would call (`cstar <stage> ...`),
so the pipeline proves the CLI works end to end. A stage is skipped when its directory holds a
manifest whose artifact and recorded inputs still match their sha256 and whose command line is the
one this config asks for. RUN_DIR/report.md and report.html summarize every stage.

The package, one concept per module: `config` (the TOML/YAML sections, validated, and `--quick`), `plan`
(the ordered stages a config asks for, each a CLI command line), `run` (skip what is fresh, run the rest,
record what each read and wrote) and `command` (`cstar pipeline`).
"""

from deploy.pipeline.command import add_arguments, main
from deploy.pipeline.config import (
    BenchSection,
    CalibrateSection,
    CompressSection,
    DataSection,
    EvaluateSection,
    ExportSection,
    PipelineConfig,
    TrainSection,
    VerifySection,
    load_config,
    quick_config,
    validate_config,
)
from deploy.pipeline.plan import (
    BENCH_ROUNDS,
    LATENCY_TABLE_FILE,
    Stage,
    calibrate_dirs,
    eval_args,
    latency_batches,
    select_batch,
    stage_plan,
    twin_attacksets,
)
from deploy.pipeline.run import FORCE_COMMANDS, STATE_DIR, invoke, run_pipeline, stage_manifest

__all__ = [
    "BENCH_ROUNDS", "FORCE_COMMANDS", "LATENCY_TABLE_FILE", "STATE_DIR", "BenchSection", "CalibrateSection",
    "CompressSection", "DataSection", "EvaluateSection", "ExportSection", "PipelineConfig", "Stage", "TrainSection",
    "VerifySection", "add_arguments", "calibrate_dirs", "eval_args", "invoke", "latency_batches", "load_config",
    "main", "quick_config", "run_pipeline", "select_batch", "stage_manifest", "stage_plan", "twin_attacksets",
    "validate_config",
]
