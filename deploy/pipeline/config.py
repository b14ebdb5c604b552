"""The pipeline config: one dataclass per TOML/YAML section, unknown keys refused, values validated up
front (before any stage runs), and `quick_config`, the smoke-test sizes of `--quick`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from cstar import validate
from cstar.config import config_from_dict
from cstar.errors import CstarError
from cstar.suites import SUITES


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
