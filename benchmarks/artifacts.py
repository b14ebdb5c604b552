"""Stage runs the benchmarks share, each skipped when its directory already holds a manifest.

A finished stage directory (manifest.json present) is reused, so an interrupted benchmark resumes
where it stopped; but never silently stale. Every reuse (stage directories here, verify reports in
export_robustness, the metric caches) goes through one check, `reuse_problems`: each recorded input
file must still exist and hash as recorded, the record must have been made from the wanted sources,
and its recorded configuration must equal the wanted one. A stage directory failing it stops the
benchmark with StaleWork naming the directory to delete. Wall time of every run made here is kept in
`<dir>.timing.json` beside the directory, so reused runs still report how long they took.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import log, stopwatch
from cstar.errors import CstarError

TIMING_SUFFIX = ".timing.json"
DEFAULT_EPS = {"digits": 0.2, "fashion-mnist": 0.1}
# the attack suite of every stage run a benchmark makes: apgd (APGD-CE + APGD-T over 3 targets, 100 iterations)
# is the CPU-sized white-box suite; a benchmark that wants aa passes eval_suite / --eval-suite itself
BENCH_EVAL_SUITE = "apgd"


def with_bench_suite(config: dict[str, Any]) -> dict[str, Any]:
    """A compress config with the benchmarks' suite unless it names one."""
    return {"eval_suite": BENCH_EVAL_SUITE, **config}


def is_done(directory: Path) -> bool:
    """A stage directory is finished when its manifest.json exists."""
    return (directory / "manifest.json").is_file()


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON file."""
    return json.loads(path.read_text(encoding="utf-8"))


def timing_of(directory: Path) -> float | None:
    """Wall seconds recorded when `directory` was produced here (None if unknown)."""
    path = directory.with_name(directory.name + TIMING_SUFFIX)
    return float(read_json(path)["seconds"]) if path.is_file() else None


def _record_timing(directory: Path, seconds: float) -> None:
    from cstar.manifest import atomic_write_json

    atomic_write_json(directory.with_name(directory.name + TIMING_SUFFIX), {"seconds": round(seconds, 3)})


@dataclass
class StageRun:
    """A stage directory, its manifest, its wall time and whether it was reused."""

    directory: Path
    manifest: dict[str, Any]
    seconds: float | None
    reused: bool

    def describe(self) -> dict[str, Any]:
        return {"dir": str(self.directory), "seconds": self.seconds, "reused": self.reused}


# ------------------------------------------------------------------------------------------- reuse


class StaleWork(CstarError):
    """A finished work directory (or report) that no longer matches what the benchmark asks for."""


_ABSENT = "<absent>"


@dataclass(frozen=True)
class Expect:
    """What a finished directory must match to be reused.

    `config`: dotted path in the record (manifest or report) -> the value wanted now; `legacy`: the
    value a record written before that key existed was made with; `sources`: files that must be among
    the record's inputs (it was made from these, not from some other run).
    """

    config: Mapping[str, Any] = field(default_factory=dict)
    sources: Sequence[Path] = ()
    legacy: Mapping[str, Any] = field(default_factory=dict)


def lookup(record: Mapping[str, Any], dotted: str) -> Any:
    """record['a']['b'] for 'a.b'; _ABSENT when any level is missing."""
    value: Any = record
    for key in dotted.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return _ABSENT
        value = value[key]
    return value


def input_problems(inputs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Recorded input files (path + sha256) that are gone or hash differently now."""
    from cstar.manifest import sha256_file

    problems = []
    for entry in inputs:
        if not entry.get("sha256"):
            continue  # e.g. a dataset name: nothing to hash
        path = Path(str(entry.get("path", "")))
        if not path.is_file():
            problems.append(f"input {path} was deleted")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"input {path} has changed")
    return problems


def config_drift(record: Mapping[str, Any], expect: Expect) -> dict[str, tuple[Any, Any]]:
    """{dotted path: (recorded value, wanted value)} for every expectation the record does not meet."""
    drift: dict[str, tuple[Any, Any]] = {}
    for key, wanted in expect.config.items():
        found = lookup(record, key)
        found = expect.legacy.get(key, found) if found is _ABSENT else found
        if found != wanted:
            drift[key] = (found, wanted)
    return drift


def reuse_problems(record: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]], expect: Expect) -> list[str]:
    """Why a finished record cannot stand for what is asked now (empty: it can). The one check every
    reuse of the benchmarks goes through: inputs present and hashing as recorded, made from the wanted
    sources, recorded configuration equal to the wanted one."""
    problems = input_problems(inputs)
    recorded = {str(Path(str(e.get("path", ""))).resolve()) for e in inputs}
    problems += [f"it was not made from {s}" for s in expect.sources if str(Path(s).resolve()) not in recorded]
    problems += [f"{key}={old!r} there, {new!r} wanted" for key, (old, new) in config_drift(record, expect).items()]
    return problems


def check_reusable(directory: Path, record: Mapping[str, Any], inputs: Sequence[Mapping[str, Any]],
                   expect: Expect) -> None:
    """Raise StaleWork naming `directory` when reuse_problems finds anything."""
    problems = reuse_problems(record, inputs, expect)
    if problems:
        raise StaleWork(f"{directory} is a finished run that does not match this benchmark: {'; '.join(problems)}",
                        f"delete {directory} (and the stages made from it), or pass another --work directory, "
                        "then run again")


# what a compress manifest written before a CompressConfig key existed was run with
# (before the attack suites, test metrics were PGD-20: such a run is refused where a suite is wanted)
LEGACY_COMPRESS_VALUES = {"factor_decay": "factors", "distill": 0.0, "distill_temperature": 1.0, "eval_suite": "pgd20"}
# keys that do not change what a run computes (where, how fast, whether the dense model is re-evaluated)
COMPRESS_KEYS_IGNORED = ("device", "workers", "amp", "channels_last", "eval_dense")


def compress_expect(config: dict[str, Any], dense_dir: Path | None = None) -> Expect:
    """What a finished compress run must match: CompressConfig defaults + `config` (keys resolved at
    run time, None, are not compared), made from `dense_dir`'s manifest."""
    from cstar.compress import CompressConfig
    from cstar.config import config_to_dict

    wanted = {**config_to_dict(CompressConfig()), **config}
    moot = ("factor_decay",) if wanted["method"] == "prune" else ()  # pruning leaves no factorized layer
    keys = [k for k, v in wanted.items() if v is not None and k not in COMPRESS_KEYS_IGNORED and k not in moot]
    return Expect(config={f"config.{k}": wanted[k] for k in keys},
                  sources=(dense_dir / "manifest.json",) if dense_dir is not None else (),
                  legacy={f"config.{k}": v for k, v in LEGACY_COMPRESS_VALUES.items()})


def compress_config_drift(stored: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, wanted value)} where a finished compress run's config differs from `config`."""
    drift = config_drift({"config": stored}, compress_expect(config))
    return {key.removeprefix("config."): values for key, values in drift.items()}


def run_or_reuse(directory: Path, what: str, run: Callable[[], object], expect: Expect | None = None) -> StageRun:
    """Run `run()` unless `directory` is finished; a finished one is reused only if check_reusable
    passes (else StaleWork: a stale row is never reported)."""
    from cstar.manifest import read_manifest

    if is_done(directory):
        manifest = read_manifest(directory)
        check_reusable(directory, manifest, manifest.get("inputs") or [], expect or Expect())
        return StageRun(directory, manifest, timing_of(directory), True)
    log(f"{what} -> {directory}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with stopwatch() as t:
        run()
    _record_timing(directory, t["seconds"])
    log(f"{what} done in {t['seconds']:.1f}s")
    return StageRun(directory, read_manifest(directory), t["seconds"], False)


def cached_json(path: Path, inputs: Sequence[Path], config: dict[str, Any],
                compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """compute(), kept in `path` with the inputs' sha256 and `config`; a cache failing the same
    reuse check as a stage directory is computed again (a cache is never reported stale)."""
    from cstar.manifest import atomic_write_json, file_entry

    if path.is_file():
        record = read_json(path)
        expect = Expect(config={f"config.{k}": v for k, v in config.items()}, sources=tuple(inputs))
        problems = reuse_problems(record, record.get("inputs") or [], expect)
        if not problems and "value" in record:
            return dict(record["value"])
        log(f"{path}: computing again ({'; '.join(problems) or 'old format'})")
    value = compute()
    atomic_write_json(path, {"inputs": [file_entry(p) for p in inputs], "config": config, "value": value})
    return value


# -------------------------------------------------------------------------------------------- stages


def dense_expect(data: str, epochs: int | None, eps: float | None, seed: int) -> Expect:
    """What a finished dense run must match: data, epochs (the dataset's default when None), eps, seed."""
    from cstar.train import DEFAULT_EPOCHS

    slug = data.split(":", 1)[0]
    config: dict[str, Any] = {"config.data": data, "config.seed": seed,
                              "config.epochs": epochs if epochs is not None else DEFAULT_EPOCHS.get(slug, 30)}
    if eps is not None:
        config["config.eps"] = eps
    return Expect(config=config)


def ensure_dense(data: str, out: Path, epochs: int | None, eps: float | None = None, seed: int = 0,
                 extra: list[str] | None = None) -> StageRun:
    """`cstar train --data DATA --out OUT [EXTRA...]` (PGD-AT) unless OUT is finished."""
    from cstar import train

    def run() -> None:
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        argv = ["--data", data, "--out", str(out), "--seed", str(seed), "--eval-suite", BENCH_EVAL_SUITE]
        if epochs is not None:
            argv += ["--epochs", str(epochs)]
        if eps is not None:
            argv += ["--eps", str(eps)]
        argv += extra or []
        log_path = out.with_name(out.name + ".log")
        log(f"training progress goes to {log_path}")
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "w", encoding="utf-8") as handle, redirect_stderr(handle), redirect_stdout(handle):
            train.run_train(parser.parse_args(argv))

    return run_or_reuse(out, f"train dense ({data})", run, dense_expect(data, epochs, eps, seed))


def compress_name(method: str, ratio: float, admm_epochs: int, finetune_epochs: int, rank_step: int = 1) -> str:
    """Directory name that pins method, ratio, epochs and rank step (the rest is checked on reuse)."""
    step = f"-step{rank_step}" if rank_step != 1 else ""
    return f"{method}-x{ratio:g}-e{admm_epochs}+{finetune_epochs}{step}"


def ensure_compress(dense_dir: Path, root: Path, method: str, ratio: float, config: dict[str, Any]) -> StageRun:
    """run_compress(dense, root/NAME, config) unless finished; NAME from compress_name."""
    from cstar.compress import CompressConfig, run_compress

    defaults = CompressConfig()
    admm = int(config.get("admm_epochs", defaults.admm_epochs))
    finetune = int(config.get("finetune_epochs", defaults.finetune_epochs))
    step = int(config.get("rank_step", 1))
    out = root / compress_name(method, ratio, admm, finetune, step)
    full = with_bench_suite({**config, "ratio": ratio, "method": method})
    return run_or_reuse(out, f"compress {method} x{ratio:g}",
                        lambda: run_compress(dense_dir, out, config=full, progress=False),
                        compress_expect(full, dense_dir))


def ensure_export(source: Path, out: Path) -> StageRun:
    """run_export(source -> out) unless finished (and made from source)."""
    from export.exporter import run_export

    return run_or_reuse(out, f"export {source.name}", lambda: run_export(source, out, progress=False),
                        Expect(sources=(source / "manifest.json",)))


def ensure_calibrate(export_dir: Path, out: Path, data: str, samples: int, parity_samples: int,
                     target: str = "ort-cpu") -> StageRun:
    """run_calibrate (minmax, per-channel, in the INT8 format of `target`: ort-cpu, openvino, tensorrt,
    executorch) unless finished with the same sample counts and target."""
    from calibration.calibrate import run_calibrate

    sources = (export_dir / "manifest.json",)
    expect = Expect(sources=sources)
    if is_done(out):  # counts are capped by the dataset's splits
        dataset = read_json(out / "manifest.json").get("dataset") or {}
        expect = Expect(config={"calibration.samples": split_take(dataset, "train", samples),
                                "calibration.per_channel": True, "quantization.target": target,
                                "metrics.n": split_take(dataset, "test", parity_samples)}, sources=sources)
    return run_or_reuse(out, f"calibrate {export_dir.parent.name} for {target}", lambda: run_calibrate(
        export_dir, out, data, samples, parity_samples=parity_samples, verbose=False, target=target), expect)


def ensure_build(source: Path, out: Path, threads: int | None, max_batch: int = 64,
                 backend: str = "ort-cpu") -> StageRun:
    """run_build(source, backend, out) unless finished for that backend from the same source."""
    from deploy.build import run_build

    expect = Expect(config={"backend": backend}, sources=(source / "manifest.json",))
    return run_or_reuse(out, f"build {backend} {source.parent.name}/{source.name}", lambda: run_build(
        source, backend, out, batch_sizes=(1, max_batch), threads=threads), expect)


def split_take(dataset: Mapping[str, Any], split: str, count: int) -> int:
    """How many images a stage asked for `count` (0: all) takes from a split of this dataset."""
    from cstar.data import load_dataset_from_spec

    total = len(load_dataset_from_spec(dict(dataset)).labels(split))
    return total if count <= 0 else min(count, total)


def ensure_attackset(reference: Path, data: str, out: Path, samples: int, seed: int) -> StageRun:
    """run_attackset(reference -> out, the benchmarks' suite) unless finished with the same size, seed and suite."""
    from deploy.attackset import run_attackset

    sources = (reference / "manifest.json",)
    expect = Expect(sources=sources)
    if is_done(out):  # the whole test split when it is smaller than --samples
        dataset = read_json(out / "manifest.json").get("dataset") or {}
        expect = Expect(config={"set.seed": seed, "set.n": split_take(dataset, "test", samples),
                                "set.suite": BENCH_EVAL_SUITE}, sources=sources)
    return run_or_reuse(out, f"attackset {reference.name}",
                        lambda: run_attackset(reference, data, out, samples=samples, seed=seed, suite=BENCH_EVAL_SUITE),
                        expect)


# ---------------------------------------------------------------------------------------- model sets


def resolve_dense(args: argparse.Namespace, root: Path) -> StageRun:
    """The dense model: --dense-dir if given (must be finished), else trained in root/dense."""
    if args.dense_dir:
        from cstar.manifest import read_manifest

        directory = Path(args.dense_dir)
        return StageRun(directory, read_manifest(directory, ["train"]), None, True)
    epochs = args.dense_epochs if args.dense_epochs is not None else (1 if args.quick else None)
    return ensure_dense(args.data, root / "dense", epochs, DEFAULT_EPS.get(args.data.split(":", 1)[0]), args.seed)


def compressed_set(dense_dir: Path, compress_root: Path, methods: list[str], ratios: list[float],
                   config: dict[str, Any]) -> dict[str, StageRun]:
    """A compress run per (method, ratio), made or reused (reuse checked like every other stage);
    keys like 'cstar-x8'."""
    return {f"{method}-x{ratio:g}": ensure_compress(dense_dir, compress_root, method, ratio, config)
            for ratio in ratios for method in methods}
