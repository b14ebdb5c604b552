"""`cstar pipeline`: every stage from one config, skipping stages whose outputs are already valid.

Each stage is run through the same command-line entry point a user would call (`cstar <stage> ...`),
so the pipeline proves the CLI works end to end. A stage is skipped when its directory holds a
manifest whose artifact and recorded inputs still match their sha256 and whose command line is the
one this config asks for. RUN_DIR/report.md and report.html summarize every stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cstar import validate
from cstar.config import config_from_dict, config_to_dict
from cstar.errors import CstarError, GateFailure
from cstar.manifest import MANIFEST_NAME, atomic_write_json, sha256_file
from cstar.suites import SUITES
from deploy.backends.registry import calibrate_target
from deploy.run_layout import ArtifactDir

STATE_DIR = ".pipeline"
LATENCY_TABLE_FILE = "latency_table.json"
BENCH_ROUNDS = 5  # interleaved rounds of a compressed artifact and the dense one in each bench stage



# ------------------------------------------------------------------------------------------ config


@dataclass
class DataSection:
    name: str = "digits"
    image_size: int | None = None


@dataclass
class TrainSection:
    model: str | None = None
    epochs: int | None = None
    eps: float | None = None
    method: str = "pgd-at"
    extra_args: list[str] = field(default_factory=list)


@dataclass
class EvaluateSection:
    """The attack suite of train's and compress's test metrics (the report's PyTorch rows) and of the
    attack sets. Default: aa (APGD-CE, APGD-T over 9 targets, then Square) with Square at 1,000 queries,
    the budget `cstar verify` gives Square on the runtime, so PyTorch and runtime rows face the same
    attacks and the demo stays near 4 minutes; `queries = 5000` is AutoAttack's standard, "apgd" the
    white-box half alone. `steps` overrides the gradient attacks' iterations (recorded)."""

    suite: str = "aa"
    steps: int | None = None
    queries: int | None = 1000


@dataclass
class CompressSection:
    """Default: latency on the first verify backend, measured there by `cstar profile` (a stage of its own)."""

    method: str = "cstar"
    ratio: float = 2.0
    by: str = "latency"
    # batch size whose measured latency the budget is spent at (default: the largest bench batch size; on a
    # model as small as the digits demo batch 1 is mostly the runtime call itself, which no rank changes),
    # or a list ([1, 64]): the budget then holds at each (compress --latency-batch 1,64)
    latency_batch: int | list[int] | None = None
    extra_args: list[str] = field(default_factory=list)


@dataclass
class ExportSection:
    opset: int = 18
    simplifier: str = "onnxslim"
    export_dense: bool = True


@dataclass
class CalibrateSection:
    enabled: bool = True
    samples: int = 256
    method: str = "minmax"
    include_adversarial: float = 0.0


@dataclass
class VerifySection:
    backends: list[str] = field(default_factory=lambda: ["ort-cpu"])
    samples: int = 300
    square_queries: int = 1000
    max_robust_drop: float = 2.0
    extra_args: list[str] = field(default_factory=list)


@dataclass
class BenchSection:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 64])
    iters: int = 50
    threads: int | None = 1  # runtime threads of bench and profile (1: the stable, comparable setting)
    # batch size whose p50 picks the deployed precision per runtime (default: the first of batch_sizes)
    select_batch: int | None = None


@dataclass
class PipelineConfig:
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)
    compress: CompressSection = field(default_factory=CompressSection)
    export: ExportSection = field(default_factory=ExportSection)
    calibrate: CalibrateSection = field(default_factory=CalibrateSection)
    verify: VerifySection = field(default_factory=VerifySection)
    bench: BenchSection = field(default_factory=BenchSection)


_SECTIONS: dict[str, type] = {
    "data": DataSection,
    "train": TrainSection,
    "evaluate": EvaluateSection,
    "compress": CompressSection,
    "export": ExportSection,
    "calibrate": CalibrateSection,
    "verify": VerifySection,
    "bench": BenchSection,
}


def load_config(path: str | Path | None, data: str | None = None) -> PipelineConfig:
    """Read a TOML (or YAML) pipeline config; unknown sections or keys are errors. `data` (the CLI's
    --data) replaces [data] name before the config is checked."""
    if path is None:
        config = PipelineConfig()
        if data is not None:
            config.data.name = data
            validate_config(config, "--data")
        return config
    source = Path(path)
    if not source.is_file():
        raise CstarError(f"pipeline config {source} does not exist", "pass an existing .toml or .yaml file")
    try:
        if source.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(source.read_text()) or {}
        else:
            raw = tomllib.loads(source.read_text())
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear message
        raise CstarError(f"cannot parse {source}: {exc}", "fix the TOML/YAML syntax") from exc
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise CstarError(f"unknown section(s) {unknown} in {source}", f"valid sections: {', '.join(_SECTIONS)}")
    sections: dict[str, Any] = {name: config_from_dict(cls, raw.get(name, {}), f"[{name}] of {source}") for name, cls in _SECTIONS.items()}
    config = PipelineConfig(**sections)
    if data is not None:
        config.data.name = data
    validate_config(config, str(source) + (" with --data" if data is not None else ""))
    return config


def quick_config(config: PipelineConfig) -> PipelineConfig:
    """The same stages at smoke-test size (`cstar pipeline --quick`): 1 training epoch, 1 ADMM and no fine-tune
    epoch, Square at 50 queries, 50 verify samples, 64 calibration images, batch 1 only. The numbers it prints
    say nothing about the model; it shows the config runs end to end on the data given."""
    quick = dataclasses.replace
    return quick(
        config,
        train=quick(config.train, epochs=1),
        evaluate=quick(config.evaluate, queries=50 if config.evaluate.queries else config.evaluate.queries),
        compress=quick(config.compress, latency_batch=1,
                       extra_args=[*config.compress.extra_args, "--admm-epochs", "1", "--finetune-epochs", "0"]),
        calibrate=quick(config.calibrate, samples=min(config.calibrate.samples, 64)),
        verify=quick(config.verify, samples=min(config.verify.samples, 50), square_queries=50, max_robust_drop=100.0,
                     extra_args=[*config.verify.extra_args, "--min-agreement", "0", "--max-clean-drop", "100"]),
        bench=quick(config.bench, batch_sizes=[1], iters=5, select_batch=None),
    )


def _check_data(name: str, where: str) -> None:
    """A known dataset, with its path where it needs one and that path present: before any stage runs."""
    from cstar.data import parse_dataset_arg

    try:
        dataset, path = parse_dataset_arg(name)
    except CstarError as exc:
        raise CstarError(f"{where}: {exc.message}", exc.hint) from None
    if path is not None and not Path(path).exists():
        raise CstarError(f"{where}: the data path {path} does not exist",
                         f"pass --data {dataset}:PATH with the dataset's directory")


def validate_config(config: PipelineConfig, source: str = "the pipeline config") -> None:
    """Numbers and names of a (typed) config, checked before any stage runs; errors name the key."""
    from deploy.backends.registry import backend_names

    def key(section: str, name: str) -> str:
        return f"[{section}] {name} in {source}"

    if config.train.eps is not None:
        validate.eps(config.train.eps, key("train", "eps"), config.data.name.split(":")[0])
    if config.train.epochs is not None:
        validate.count(key("train", "epochs"), config.train.epochs)
    if config.data.image_size is not None:
        validate.count(key("data", "image_size"), config.data.image_size)
    _check_data(config.data.name, key("data", "name"))
    validate.choice(key("evaluate", "suite"), config.evaluate.suite, SUITES)
    if config.evaluate.steps is not None:
        validate.count(key("evaluate", "steps"), config.evaluate.steps)
    if config.evaluate.queries is not None:
        validate.count(key("evaluate", "queries"), config.evaluate.queries, minimum=0)
    validate.ratio(key("compress", "ratio"), config.compress.ratio)
    validate.count(key("calibrate", "samples"), config.calibrate.samples)
    validate.fraction(key("calibrate", "include_adversarial"), config.calibrate.include_adversarial)
    if not config.verify.backends:
        raise CstarError(f"{key('verify', 'backends')} is empty", 'list at least one, e.g. backends = ["ort-cpu"]')
    for backend in config.verify.backends:
        validate.choice(key("verify", "backends") + " entry", backend, backend_names())
    validate.count(key("verify", "samples"), config.verify.samples)
    validate.count(key("verify", "square_queries"), config.verify.square_queries, minimum=0)
    validate.in_range(key("verify", "max_robust_drop"), config.verify.max_robust_drop, 0.0, 100.0)
    for batch in config.bench.batch_sizes:
        validate.count(key("bench", "batch_sizes") + " entry", batch)
    validate.count(key("bench", "iters"), config.bench.iters)
    if config.bench.threads is not None:
        validate.count(key("bench", "threads"), config.bench.threads)


# ------------------------------------------------------------------------------------------ stages


@dataclass
class Stage:
    """One invocation of a cstar command writing `out_dir`."""

    key: str
    command: str
    argv: list[str]
    out_dir: Path | None
    title: str
    seconds: float = 0.0
    status: str = "pending"  # ran | skipped | failed
    message: str = ""


def _stage_plan(config: PipelineConfig, run_dir: Path) -> list[Stage]:
    """The ordered list of stages this config asks for."""
    data = config.data.name
    size = ["--image-size", str(config.data.image_size)] if config.data.image_size else []
    d = {name: run_dir / name for name in (
        "train", "profile", "compress", "export-dense", "export", "calibrate", "attackset", "attackset-dense")}
    suite = eval_args(config)
    train_argv = ["--data", data, *size, "--method", config.train.method, *suite, "--out", str(d["train"])]
    if config.train.model:
        train_argv += ["--model", config.train.model]
    if config.train.epochs:
        train_argv += ["--epochs", str(config.train.epochs)]
    if config.train.eps is not None:
        train_argv += ["--eps", str(config.train.eps)]
    stages = [Stage("train", "train", train_argv + config.train.extra_args, d["train"], "dense robust model")]
    latency_args: list[str] = []
    if config.compress.by == "latency":
        backend, batches = config.verify.backends[0], latency_batches(config)
        table = d["profile"] / LATENCY_TABLE_FILE
        threads = ["--threads", str(config.bench.threads)] if config.bench.threads else []
        profiled = ",".join(str(b) for b in sorted({*config.bench.batch_sizes, *batches}))
        stages.append(Stage("profile", "profile", [
            "--model-from", str(d["train"]), "--backend", backend, "--batch-sizes", profiled, *threads,
            "--out", str(table), "--quiet"], d["profile"], f"latency table on {backend} (b{profiled})"))
        latency_args = ["--latency-table", str(table), "--latency-batch", ",".join(map(str, batches))]
    stages.append(Stage("compress", "compress", [
        "--from", str(d["train"]), "--ratio", str(config.compress.ratio), "--by", config.compress.by,
        "--method", config.compress.method, *latency_args, *suite, "--out", str(d["compress"]),
        *config.compress.extra_args,
    ], d["compress"], f"{config.compress.method} {config.compress.ratio:g}x ({config.compress.by})"))
    export_common = ["--opset", str(config.export.opset), "--simplifier", config.export.simplifier]
    if config.export.export_dense:
        stages.append(Stage("export-dense", "export", ["--from", str(d["train"]), "--out", str(d["export-dense"]),
                                                        *export_common], d["export-dense"], "dense FP32 ONNX"))
    stages.append(Stage("export", "export", ["--from", str(d["compress"]), "--out", str(d["export"]), *export_common,
                                             *latency_args],
                        d["export"], "compressed FP32 ONNX"))
    builds: list[tuple[str, str, Path]] = [
        ("fp32", backend, ArtifactDir("build", "fp32", backend).path(run_dir)) for backend in config.verify.backends]
    targets = calibrate_dirs(config.verify.backends, run_dir)
    if config.calibrate.enabled:
        for target, calibrate_dir in targets.items():
            stages.append(Stage(calibrate_dir.name, "calibrate", [
                "--from", str(d["export"]), "--data", data, "--samples", str(config.calibrate.samples),
                "--method", config.calibrate.method, "--include-adversarial", str(config.calibrate.include_adversarial),
                "--target", target, "--out", str(calibrate_dir),
            ], calibrate_dir, f"compressed INT8 for {target}"))
    for backend in config.verify.backends:
        sources = {"fp32": d["export"]}
        if config.calibrate.enabled:
            sources["int8"] = targets[calibrate_target(backend)]
            builds.append(("int8", backend, ArtifactDir("build", "int8", backend).path(run_dir)))
        for precision, source in sources.items():
            out = ArtifactDir("build", precision, backend).path(run_dir)
            stages.append(Stage(out.name, "build",
                                ["--from", str(source), "--backend", backend, "--out", str(out)],
                                out, f"{precision} on {backend}"))
    builds.sort(key=lambda b: (config.verify.backends.index(b[1]), b[0] != "fp32"))
    dense_builds = [("dense", backend, ArtifactDir("build", "dense", backend).path(run_dir)) for backend in config.verify.backends]
    if config.export.export_dense:
        for _, backend, out in dense_builds:
            stages.append(Stage(out.name, "build", ["--from", str(d["export-dense"]), "--backend", backend,
                                                    "--out", str(out)], out, f"dense fp32 on {backend}"))
    set_args = ["--suite", config.evaluate.suite if config.evaluate.suite != "pgd20" else "apgd",
                *(["--iters", str(config.evaluate.steps)] if config.evaluate.steps is not None else [])]
    stages.append(Stage("attackset", "attackset", [
        "--reference", str(d["compress"]), "--data", data, "--samples", str(config.verify.samples),
        *set_args, "--out", str(d["attackset"]),
    ], d["attackset"], "transfer attack set (PyTorch reference)"))
    verify_targets = list(builds)
    if config.export.export_dense:
        stages.append(Stage("attackset-dense", "attackset", [
            "--reference", str(d["train"]), "--data", data, "--samples", str(config.verify.samples),
            *set_args, "--out", str(d["attackset-dense"]),
        ], d["attackset-dense"], "attack set on the dense reference (the robustness baseline)"))
        verify_targets += dense_builds
    int8_sets = twin_attacksets(targets, run_dir) if config.calibrate.enabled else {}
    for target, set_dir in int8_sets.items():
        stages.append(Stage(set_dir.name, "attackset", [
            "--reference", str(d["compress"]), "--data", data, "--samples", str(config.verify.samples),
            *set_args, "--quantized", str(targets[target]), "--out", str(set_dir),
        ], set_dir, f"attack set + fake-quant twin of the {target} INT8 model"))
    for precision, backend, build_dir in verify_targets:
        attack_set = d["attackset-dense"] if precision == "dense" else d["attackset"]
        if precision == "int8" and calibrate_target(backend) in int8_sets:
            attack_set = int8_sets[calibrate_target(backend)]
        out = ArtifactDir("verify", precision, backend).path(run_dir)
        stages.append(Stage(out.name, "verify", [
            "--artifact", str(build_dir), "--backend", backend, "--set", str(attack_set),
            "--square-queries", str(config.verify.square_queries),
            "--max-robust-drop", str(config.verify.max_robust_drop), "--out", str(out), *config.verify.extra_args,
        ], out, f"verify {precision} on {backend}"))
    bench_targets = builds + (dense_builds if config.export.export_dense else [])
    for precision, backend, build_dir in bench_targets:
        out = ArtifactDir("bench", precision, backend).path(run_dir)
        argv = ["--artifact", str(build_dir), "--backend", backend, "--batch-sizes",
                ",".join(str(b) for b in config.bench.batch_sizes), "--iters", str(config.bench.iters), "--out", str(out)]
        if config.bench.threads:
            argv += ["--threads", str(config.bench.threads)]
        if precision != "dense" and config.export.export_dense:  # the speedup: one run, rounds interleaved
            argv += ["--compare", str(ArtifactDir("build", "dense", backend).path(run_dir)), "--rounds", str(BENCH_ROUNDS)]
        stages.append(Stage(out.name, "bench", argv, out, f"latency {precision} on {backend}"))
    return stages


def eval_args(config: PipelineConfig) -> list[str]:
    """--eval-suite (and --eval-steps) of the stages that report PyTorch robust accuracy."""
    steps = ["--eval-steps", str(config.evaluate.steps)] if config.evaluate.steps is not None else []
    queries = (["--eval-queries", str(config.evaluate.queries)]
               if config.evaluate.queries is not None and config.evaluate.suite == "aa" else [])
    return ["--eval-suite", config.evaluate.suite, *steps, *queries]


def select_batch(config: PipelineConfig) -> int:
    """The batch size whose latency picks what ships (and that a latency budget is spent at)."""
    return config.bench.select_batch or (config.bench.batch_sizes or [1])[0]


def latency_batches(config: PipelineConfig) -> tuple[int, ...]:
    """The batch size(s) a latency budget is spent at: [compress] latency_batch, else the largest bench batch."""
    from cstar.latency_table import latency_batches as parse

    chosen = config.compress.latency_batch
    return parse(chosen) if chosen else (max(config.bench.batch_sizes or [1]),)


def twin_attacksets(targets: dict[str, Path], run_dir: Path) -> dict[str, Path]:
    """calibrate target -> the attack set that adds the white-box APGD pair crafted on that INT8 model's
    fake-quant twin (ONNX Q/DQ targets; an ExecuTorch .pte has no twin and replays the reference's set)."""
    return {target: run_dir / f"attackset-int8-{target}" for target in targets if target != "executorch"}


def calibrate_dirs(backends: list[str], run_dir: Path) -> dict[str, Path]:
    """calibrate target -> its directory: `calibrate` for the first backend's target, `calibrate-<target>` else."""
    first_target = calibrate_target(backends[0])
    dirs: dict[str, Path] = {}
    for backend in backends:
        target = calibrate_target(backend)
        dirs[target] = run_dir / ("calibrate" if target == first_target else f"calibrate-{target}")
    return dirs


def _state_path(run_dir: Path, stage: Stage) -> Path:
    return run_dir / STATE_DIR / f"{stage.key}.json"


def _is_fresh(run_dir: Path, stage: Stage) -> bool:
    """True when the stage already ran with this command line and its outputs and inputs still verify."""
    state_file = _state_path(run_dir, stage)
    if stage.out_dir is None or not state_file.is_file():
        return False
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return False
    if state.get("argv") != stage.argv:
        return False
    for path, digest in state.get("files", {}).items():
        if not Path(path).is_file() or sha256_file(path) != digest:
            return False
    return True


def _record(run_dir: Path, stage: Stage, upstream: list[Path]) -> None:
    """Remember the command line and the sha256 of every file the stage read and wrote."""
    files: dict[str, str] = {}
    for directory in [*upstream, stage.out_dir]:
        if directory is None or not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                files[str(path)] = sha256_file(path)
    atomic_write_json(_state_path(run_dir, stage), {"argv": stage.argv, "files": files, "seconds": stage.seconds})


def _upstream_dirs(stage: Stage) -> list[Path]:
    dirs = []
    for flag in ("--from", "--artifact", "--set", "--reference", "--model-from", "--compare"):
        if flag in stage.argv:
            dirs.append(Path(stage.argv[stage.argv.index(flag) + 1]))
    if "--latency-table" in stage.argv:
        dirs.append(Path(stage.argv[stage.argv.index("--latency-table") + 1]).parent)
    return dirs


# stages whose --out needs --force to be replaced (cstar.outdir); the pipeline re-runs a stale one in place
FORCE_COMMANDS = frozenset({"profile", "compress", "export", "calibrate", "build", "attackset", "verify"})


def _invoke(stage: Stage) -> None:
    """Run one stage through its CLI entry point (with --force over its own earlier, stale output)."""
    from cstar.cli import build_command_parser

    parser, module = build_command_parser(stage.command)
    replace = stage.command in FORCE_COMMANDS and stage.out_dir is not None and stage.out_dir.exists()
    args = parser.parse_args([*stage.argv, "--force"] if replace else stage.argv)
    code = int(module.main(args) or 0)  # type: ignore[attr-defined]
    if code != 0:
        raise CstarError(f"stage '{stage.key}' exited with status {code}", f"run: cstar {stage.command} "
                         + " ".join(shlex.quote(a) for a in stage.argv))


def run_pipeline(config: PipelineConfig, run_dir: Path, force: bool = False) -> list[Stage]:
    """Run (or skip) every stage in order; returns the stages with their status and timings."""
    validate_config(config)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = _stage_plan(config, run_dir)
    atomic_write_json(run_dir / STATE_DIR / "config.json", config_to_dict(config))
    for index, stage in enumerate(stages, start=1):
        prefix = f"[{index}/{len(stages)}] {stage.key}"
        if not force and _is_fresh(run_dir, stage):
            stage.status = "skipped"
            print(f"{prefix}: up to date, skipped", flush=True)
            continue
        print(f"{prefix}: cstar {stage.command} {' '.join(shlex.quote(a) for a in stage.argv)}", flush=True)
        started = time.perf_counter()
        try:
            _invoke(stage)
            stage.status = "ran"
        except GateFailure as exc:
            stage.status = "failed"
            stage.message = exc.message
        finally:
            stage.seconds = time.perf_counter() - started
        if stage.status == "ran":
            _record(run_dir, stage, _upstream_dirs(stage))
        print(f"{prefix}: {stage.status} in {stage.seconds:.1f}s {stage.message}".rstrip(), flush=True)
    return stages


# --------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="TOML or YAML config (default: digits demo)")
    parser.add_argument("--out", type=Path, required=True, help="run directory")
    parser.add_argument("--force", action="store_true", help="re-run every stage even if its outputs are valid")
    parser.add_argument("--data", default=None, metavar="NAME[:PATH]",
                        help="dataset, overriding the config's [data] name (e.g. cifar10:/data/cifar-10-images)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-test sizes (1 epoch, few samples and queries): checks the config runs end to end")


def main(args: argparse.Namespace) -> int:
    from cstar.outdir import OutputDir
    from deploy.pipeline_report import summary_table, write_pipeline_report
    from deploy.selection import materialize

    config = load_config(args.config, getattr(args, "data", None))
    if getattr(args, "quick", False):
        config = quick_config(config)
    started = time.perf_counter()
    with OutputDir(args.out, "pipeline", (args.config,), resumable=True):  # checked and locked while it runs
        stages = run_pipeline(config, args.out, force=args.force)
        summary = write_pipeline_report(args.out, config, stages)
        materialize(args.out, summary.deployed)
    print()
    print(summary_table(summary))
    failed = [s.key for s in stages if s.status == "failed"]
    total = time.perf_counter() - started
    print(f"\npipeline: {len(stages)} stages ({sum(s.status == 'skipped' for s in stages)} skipped) in {total:.0f}s; "
          f"report: {args.out / 'report.md'} and report.html" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def stage_manifest(stage: Stage) -> dict[str, Any] | None:
    """The manifest a stage wrote, if any."""
    if stage.out_dir is None or not (stage.out_dir / MANIFEST_NAME).is_file():
        return None
    return json.loads((stage.out_dir / MANIFEST_NAME).read_text())
