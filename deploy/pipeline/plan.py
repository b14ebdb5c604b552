"""The plan: the ordered stages a pipeline config asks for, each one `cstar <command> ARGV` writing its own
directory under the run directory (names from deploy.run_layout), so the pipeline proves the CLI end to end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from deploy.backends.registry import calibrate_target
from deploy.pipeline.config import PipelineConfig
from deploy.run_layout import ArtifactDir

LATENCY_TABLE_FILE = "latency_table.json"
BENCH_ROUNDS = 5  # interleaved rounds of a compressed artifact and the dense one in each bench stage
STAGE_DIRS = ("train", "profile", "compress", "export-dense", "export", "calibrate", "attackset", "attackset-dense")
Build = tuple[str, str, Path]  # (precision, backend, build directory)


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


@dataclass
class _Planner:
    """What the plan's steps share: the config, the run directory's stage paths, and the stages so far."""

    config: PipelineConfig
    run_dir: Path
    stages: list[Stage] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.d = {name: self.run_dir / name for name in STAGE_DIRS}
        self.data = self.config.data.name
        self.suite = eval_args(self.config)
        self.targets = calibrate_dirs(self.config.verify.backends, self.run_dir)
        self.dense = self.config.export.export_dense

    def add(self, key: str, command: str, argv: list[str], out_dir: Path, title: str) -> None:
        self.stages.append(Stage(key, command, argv, out_dir, title))

    def artifact(self, stage: str, precision: str, backend: str) -> Path:
        return ArtifactDir(stage, precision, backend).path(self.run_dir)


def stage_plan(config: PipelineConfig, run_dir: Path) -> list[Stage]:
    """The ordered list of stages this config asks for."""
    plan = _Planner(config, run_dir)
    _train(plan)
    latency_args = _profile(plan)
    _compress_and_export(plan, latency_args)
    builds = _calibrate_and_build(plan)
    dense_builds = _dense_builds(plan)
    int8_sets = _attacksets(plan)
    _verify(plan, builds + (dense_builds if plan.dense else []), int8_sets)
    _bench(plan, builds + (dense_builds if plan.dense else []))
    return plan.stages


def _train(plan: _Planner) -> None:
    config, d = plan.config, plan.d
    size = ["--image-size", str(config.data.image_size)] if config.data.image_size else []
    argv = ["--data", plan.data, *size, "--method", config.train.method, *plan.suite, "--out", str(d["train"])]
    if config.train.model:
        argv += ["--model", config.train.model]
    if config.train.epochs:
        argv += ["--epochs", str(config.train.epochs)]
    if config.train.eps is not None:
        argv += ["--eps", str(config.train.eps)]
    plan.add("train", "train", argv + config.train.extra_args, d["train"], "dense robust model")


def _profile(plan: _Planner) -> list[str]:
    """The profile stage when the budget is latency; returns the --latency-table/--latency-batch options."""
    config, d = plan.config, plan.d
    if config.compress.by != "latency":
        return []
    backend, batches = config.verify.backends[0], latency_batches(config)
    table = d["profile"] / LATENCY_TABLE_FILE
    threads = ["--threads", str(config.bench.threads)] if config.bench.threads else []
    profiled = ",".join(str(b) for b in sorted({*config.bench.batch_sizes, *batches}))
    plan.add("profile", "profile", [
        "--model-from", str(d["train"]), "--backend", backend, "--batch-sizes", profiled, *threads,
        "--out", str(table), "--quiet"], d["profile"], f"latency table on {backend} (b{profiled})")
    return ["--latency-table", str(table), "--latency-batch", ",".join(map(str, batches))]


def _compress_and_export(plan: _Planner, latency_args: list[str]) -> None:
    config, d = plan.config, plan.d
    plan.add("compress", "compress", [
        "--from", str(d["train"]), "--ratio", str(config.compress.ratio), "--by", config.compress.by,
        "--method", config.compress.method, *latency_args, *plan.suite, "--out", str(d["compress"]),
        *config.compress.extra_args,
    ], d["compress"], f"{config.compress.method} {config.compress.ratio:g}x ({config.compress.by})")
    export_common = ["--opset", str(config.export.opset), "--simplifier", config.export.simplifier]
    if plan.dense:
        plan.add("export-dense", "export", ["--from", str(d["train"]), "--out", str(d["export-dense"]),
                                            *export_common], d["export-dense"], "dense FP32 ONNX")
    plan.add("export", "export", ["--from", str(d["compress"]), "--out", str(d["export"]), *export_common,
                                  *latency_args], d["export"], "compressed FP32 ONNX")


def _calibrate_and_build(plan: _Planner) -> list[Build]:
    """Calibrate per INT8 target, then FP32 (and INT8) builds per backend; returns the compressed builds,
    ordered by backend, FP32 first."""
    config, d, backends = plan.config, plan.d, plan.config.verify.backends
    builds: list[Build] = [("fp32", backend, plan.artifact("build", "fp32", backend)) for backend in backends]
    if config.calibrate.enabled:
        for target, calibrate_dir in plan.targets.items():
            plan.add(calibrate_dir.name, "calibrate", [
                "--from", str(d["export"]), "--data", plan.data, "--samples", str(config.calibrate.samples),
                "--method", config.calibrate.method, "--include-adversarial", str(config.calibrate.include_adversarial),
                "--target", target, "--out", str(calibrate_dir),
            ], calibrate_dir, f"compressed INT8 for {target}")
    for backend in backends:
        sources = {"fp32": d["export"]}
        if config.calibrate.enabled:
            sources["int8"] = plan.targets[calibrate_target(backend)]
            builds.append(("int8", backend, plan.artifact("build", "int8", backend)))
        for precision, source in sources.items():
            out = plan.artifact("build", precision, backend)
            plan.add(out.name, "build", ["--from", str(source), "--backend", backend, "--out", str(out)],
                     out, f"{precision} on {backend}")
    builds.sort(key=lambda b: (backends.index(b[1]), b[0] != "fp32"))
    return builds


def _dense_builds(plan: _Planner) -> list[Build]:
    """The dense reference's FP32 build per backend (the stages only when the config exports the dense model)."""
    dense_builds = [("dense", backend, plan.artifact("build", "dense", backend))
                    for backend in plan.config.verify.backends]
    if plan.dense:
        for _, backend, out in dense_builds:
            plan.add(out.name, "build", ["--from", str(plan.d["export-dense"]), "--backend", backend,
                                         "--out", str(out)], out, f"dense fp32 on {backend}")
    return dense_builds


def _attacksets(plan: _Planner) -> dict[str, Path]:
    """The transfer attack sets (compressed reference, dense reference, INT8 twins); returns the twins' dirs."""
    config, d = plan.config, plan.d
    set_args = ["--suite", config.evaluate.suite if config.evaluate.suite != "pgd20" else "apgd",
                *(["--iters", str(config.evaluate.steps)] if config.evaluate.steps is not None else [])]
    common = ["--data", plan.data, "--samples", str(config.verify.samples), *set_args]
    plan.add("attackset", "attackset", ["--reference", str(d["compress"]), *common, "--out", str(d["attackset"])],
             d["attackset"], "transfer attack set (PyTorch reference)")
    if plan.dense:
        plan.add("attackset-dense", "attackset", [
            "--reference", str(d["train"]), *common, "--out", str(d["attackset-dense"]),
        ], d["attackset-dense"], "attack set on the dense reference (the robustness baseline)")
    int8_sets = twin_attacksets(plan.targets, plan.run_dir) if config.calibrate.enabled else {}
    for target, set_dir in int8_sets.items():
        plan.add(set_dir.name, "attackset", [
            "--reference", str(d["compress"]), *common, "--quantized", str(plan.targets[target]), "--out", str(set_dir),
        ], set_dir, f"attack set + fake-quant twin of the {target} INT8 model")
    return int8_sets


def _verify(plan: _Planner, targets: list[Build], int8_sets: dict[str, Path]) -> None:
    verify, d = plan.config.verify, plan.d
    for precision, backend, build_dir in targets:
        attack_set = d["attackset-dense"] if precision == "dense" else d["attackset"]
        if precision == "int8" and calibrate_target(backend) in int8_sets:
            attack_set = int8_sets[calibrate_target(backend)]
        out = plan.artifact("verify", precision, backend)
        plan.add(out.name, "verify", [
            "--artifact", str(build_dir), "--backend", backend, "--set", str(attack_set),
            "--square-queries", str(verify.square_queries),
            "--max-robust-drop", str(verify.max_robust_drop), "--out", str(out), *verify.extra_args,
        ], out, f"verify {precision} on {backend}")


def _bench(plan: _Planner, targets: list[Build]) -> None:
    bench = plan.config.bench
    for precision, backend, build_dir in targets:
        out = plan.artifact("bench", precision, backend)
        argv = ["--artifact", str(build_dir), "--backend", backend, "--batch-sizes",
                ",".join(str(b) for b in bench.batch_sizes), "--iters", str(bench.iters), "--out", str(out)]
        if bench.threads:
            argv += ["--threads", str(bench.threads)]
        if precision != "dense" and plan.dense:  # the speedup: one run, rounds interleaved
            argv += ["--compare", str(plan.artifact("build", "dense", backend)), "--rounds", str(BENCH_ROUNDS)]
        plan.add(out.name, "bench", argv, out, f"latency {precision} on {backend}")


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
