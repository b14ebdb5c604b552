"""Stage runs the benchmarks share, each skipped when its directory already holds a manifest.

A finished stage directory (manifest.json present) is reused, so an interrupted benchmark resumes
where it stopped; but never silently stale: a stage whose recorded input files now hash differently,
or a compress run made with another configuration (a default changed since), stops the benchmark
with an error naming the directory to delete. Wall time of every run made here is kept in
`<dir>.timing.json` beside the directory, so reused runs still report how long they took.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import log, stopwatch

TIMING_SUFFIX = ".timing.json"
DEFAULT_EPS = {"digits": 0.2, "fashion-mnist": 0.1}


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


# what a compress manifest written before a CompressConfig key existed was run with
LEGACY_COMPRESS_VALUES = {"factor_decay": "factors", "distill": 0.0, "distill_temperature": 1.0}
# keys that do not change what a run computes (where, how fast, whether the dense model is re-evaluated)
COMPRESS_KEYS_IGNORED = ("device", "workers", "amp", "channels_last", "eval_dense")


def compress_config_drift(stored: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (stored value, wanted value)} where a finished compress run differs from `config`
    (CompressConfig defaults + these overrides). Keys resolved at run time (None) are not compared."""
    from cstar.compress import CompressConfig
    from cstar.config import config_to_dict

    wanted = {**config_to_dict(CompressConfig()), **config}
    drift: dict[str, tuple[Any, Any]] = {}
    for key, value in wanted.items():
        moot = key == "factor_decay" and wanted["method"] == "prune"  # pruning leaves no factorized layer
        if value is None or key in COMPRESS_KEYS_IGNORED or moot:
            continue
        old = stored.get(key, LEGACY_COMPRESS_VALUES.get(key, value))
        if old != value:
            drift[key] = (old, value)
    return drift


def changed_inputs(manifest: dict[str, Any]) -> list[str]:
    """Input files of a finished stage that still exist but no longer hash as recorded: the stage is
    stale (e.g. an export made from a compress run that has been made again since)."""
    from cstar.manifest import sha256_file

    changed = []
    for entry in manifest.get("inputs") or []:
        path = Path(str(entry.get("path", "")))
        if entry.get("sha256") and path.is_file() and sha256_file(path) != entry["sha256"]:
            changed.append(str(path))
    return changed


def run_or_reuse(directory: Path, what: str, run: Callable[[], object],
                 compress_config: dict[str, Any] | None = None) -> StageRun:
    """Run `run()` unless `directory` is finished; returns the StageRun.

    With `compress_config`, a finished compress run is reused only if it was made with that
    configuration (defaults included): a default that changed since is an error, never a stale row.
    """
    from cstar.manifest import read_manifest

    if is_done(directory):
        manifest = read_manifest(directory)
        changed = changed_inputs(manifest)
        if changed:
            raise SystemExit(f"error: {directory} was made from inputs that have changed since ({', '.join(changed)}); "
                             "delete it (and the stages made from it) to run it again")
        drift = compress_config_drift(manifest.get("config") or {}, compress_config or {}) \
            if compress_config is not None else {}
        if drift:
            changes = ", ".join(f"{k}={old!r} there, {new!r} wanted" for k, (old, new) in drift.items())
            raise SystemExit(f"error: {directory} is a finished run with another configuration ({changes}); "
                             "delete it or pass another --work directory to run it again")
        return StageRun(directory, manifest, timing_of(directory), True)
    log(f"{what} -> {directory}")
    directory.parent.mkdir(parents=True, exist_ok=True)
    with stopwatch() as t:
        run()
    _record_timing(directory, t["seconds"])
    log(f"{what} done in {t['seconds']:.1f}s")
    return StageRun(directory, read_manifest(directory), t["seconds"], False)


# -------------------------------------------------------------------------------------------- stages


def ensure_dense(data: str, out: Path, epochs: int | None, eps: float | None = None, seed: int = 0,
                 extra: list[str] | None = None) -> StageRun:
    """`cstar train --data DATA --out OUT [EXTRA...]` (PGD-AT) unless OUT is finished."""
    from cstar import train

    def run() -> None:
        parser = argparse.ArgumentParser()
        train.add_arguments(parser)
        argv = ["--data", data, "--out", str(out), "--seed", str(seed)]
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

    return run_or_reuse(out, f"train dense ({data})", run)


def compress_name(method: str, ratio: float, admm_epochs: int, finetune_epochs: int, rank_step: int = 1) -> str:
    """Directory name that pins everything that changes the result: method, ratio, epochs, rank step."""
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
    full = {**config, "ratio": ratio, "method": method}
    return run_or_reuse(out, f"compress {method} x{ratio:g}",
                        lambda: run_compress(dense_dir, out, config=full, progress=False), compress_config=full)


def find_compress(root: Path, method: str, ratio: float, rank_step: int = 1) -> Path | None:
    """A finished compress directory under `root` for (method, ratio, rank_step), most epochs first."""
    found: list[tuple[int, Path]] = []
    for manifest_path in sorted(root.glob("*/manifest.json")):
        manifest = read_json(manifest_path)
        cfg = manifest.get("config") or {}
        if (manifest.get("stage") == "compress" and cfg.get("method") == method
                and abs(float(cfg.get("ratio", 0)) - ratio) < 1e-9 and int(cfg.get("rank_step", 1)) == rank_step):
            found.append((int(cfg.get("admm_epochs", 0)) + int(cfg.get("finetune_epochs", 0)), manifest_path.parent))
    return max(found)[1] if found else None


def ensure_export(source: Path, out: Path) -> StageRun:
    """run_export(source -> out) unless finished."""
    from export.exporter import run_export

    return run_or_reuse(out, f"export {source.name}", lambda: run_export(source, out, progress=False))


def ensure_calibrate(export_dir: Path, out: Path, data: str, samples: int, parity_samples: int) -> StageRun:
    """run_calibrate (minmax, per-channel Q/DQ) unless finished."""
    from calibration.calibrate import run_calibrate

    return run_or_reuse(out, f"calibrate {export_dir.parent.name}", lambda: run_calibrate(
        export_dir, out, data, samples, parity_samples=parity_samples, verbose=False))


def ensure_build(source: Path, out: Path, threads: int | None, max_batch: int = 64) -> StageRun:
    """run_build(source, ort-cpu, out) unless finished."""
    from deploy.build import run_build

    return run_or_reuse(out, f"build ort-cpu {source.parent.name}/{source.name}", lambda: run_build(
        source, "ort-cpu", out, batch_sizes=(1, max_batch), threads=threads))


def ensure_attackset(reference: Path, data: str, out: Path, samples: int, seed: int) -> StageRun:
    """run_attackset(reference -> out) unless finished."""
    from deploy.attackset import run_attackset

    return run_or_reuse(out, f"attackset {reference.name}",
                         lambda: run_attackset(reference, data, out, samples=samples, seed=seed))


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
    """Find (any epochs) or make a compress directory per (method, ratio); keys like 'cstar-x8'."""
    from cstar.manifest import read_manifest

    runs: dict[str, StageRun] = {}
    for ratio in ratios:
        for method in methods:
            found = find_compress(compress_root, method, ratio)
            key = f"{method}-x{ratio:g}"
            if found is not None:
                runs[key] = StageRun(found, read_manifest(found), timing_of(found), True)
            else:
                runs[key] = ensure_compress(dense_dir, compress_root, method, ratio, config)
    return runs
