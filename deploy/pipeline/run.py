"""Running a plan: a stage is skipped when it already ran with the same command line and every file it read
and wrote still has the recorded sha256; otherwise it runs through its CLI entry point (with --force over
its own stale output). Gate failures are recorded, not raised, so the report shows them."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any

from cstar.config import config_to_dict
from cstar.errors import CstarError, GateFailure
from cstar.manifest import MANIFEST_NAME, atomic_write_json, sha256_file
from deploy.pipeline.config import PipelineConfig, validate_config
from deploy.pipeline.plan import Stage, stage_plan

STATE_DIR = ".pipeline"


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


def invoke(stage: Stage) -> None:
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
    stages = stage_plan(config, run_dir)
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
            invoke(stage)
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


def stage_manifest(stage: Stage) -> dict[str, Any] | None:
    """The manifest a stage wrote, if any."""
    if stage.out_dir is None or not (stage.out_dir / MANIFEST_NAME).is_file():
        return None
    return json.loads((stage.out_dir / MANIFEST_NAME).read_text())
