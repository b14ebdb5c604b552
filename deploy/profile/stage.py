"""The `cstar profile` command and stage: options, the dense model of a stage directory exported as deployed,
the table timed and calibrated on whole reference models, written atomically. `run_profile` is the host
side (it builds the model with torch); the rest of the package is torch-free."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.latency_table import TABLE_KIND, LatencyTable
from cstar.stage_log import StageLog
from deploy.profile.specs import LayerSpec, ProfileSettings
from deploy.profile.table import PROGRESS, profile_layers, write_table
from deploy.profile.timer import CALIBRATION_ROUNDS, MicroTimer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar profile`."""
    defaults = ProfileSettings()
    parser.add_argument("--model-from", required=True, help="train or compress stage directory (its dense model)")
    parser.add_argument("--backend", default=defaults.backend, help="runtime backend (default ort-cpu)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="runtime intra-op threads (default 1; 0: the runtime's default)")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--ranks", default=None,
                        help="channel grid points below each full width, e.g. 4,8,16,24,32,48,64 (default: small "
                             "ranks and multiples of 8 and 16; the full width is always included)")
    parser.add_argument("--grid-cap", type=int, default=defaults.grid_cap, help="most grid points per channel dim")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="timed calls per micro-graph (median)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls per micro-graph")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip the calibration on whole reference models (faster; predictions of compressed "
                             "models then run optimistic)")
    parser.add_argument("--out", required=True, help="the table (JSON) to write")
    parser.add_argument("--force", action="store_true", help="replace an existing latency table at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise CstarError(f"{option} '{text}' is not a comma-separated list of integers", f"e.g. {option} 1,8") from exc
    if not values or any(v < 1 for v in values):
        raise CstarError(f"{option} '{text}' needs positive integers", f"e.g. {option} 1,8")
    return values


def settings_from_args(args: argparse.Namespace) -> ProfileSettings:
    """ProfileSettings from parsed options (validated)."""
    settings = ProfileSettings(
        backend=args.backend, threads=None if args.threads == 0 else args.threads,
        batch_sizes=int_list(args.batch_sizes, "--batch-sizes"),
        iters=args.iters, warmup=args.warmup, grid_cap=args.grid_cap,
        ranks=None if args.ranks is None else int_list(args.ranks, "--ranks"),
        calibrate=getattr(args, "calibrate", True),
    )
    settings.validate()
    return settings


def main(args: argparse.Namespace) -> int:
    """CLI entry: profile, write the table, print a one-line summary."""
    started = time.perf_counter()
    settings = settings_from_args(args)
    from deploy.backends import require_backend

    require_backend(settings.backend)
    table = run_profile(args.model_from, args.out, settings, progress=not args.quiet, force=args.force)
    batches = ", ".join(f"b{b} {table.model_ms(b):.3f} ms" for b in table.batch_sizes)
    print(f"profiled {len(table.layers)} layers ({table.settings.get('micro_graphs')} micro-graphs) of "
          f"{table.model.get('name')} on {table.backend} ({table.runtime.get('name')} {table.runtime.get('version')}, "
          f"{table.threads or 'default'} thread(s)): dense model {batches} -> {args.out} "
          f"({time.perf_counter() - started:.0f}s)")
    return 0


def run_profile(model_dir: str | Path, out: str | Path, settings: ProfileSettings,
                progress: bool = True, force: bool = False) -> LatencyTable:
    """Profile the dense model of the stage directory `model_dir` into the table `out` (host side: torch).

    `out` follows cstar.outdir.check_output_file: never inside an input or a stage directory; an existing
    file only with `force`, and only when it is a latency table."""
    from cstar.latency import candidate_geometry
    from cstar.outdir import check_output_file
    from cstar.train import progress_bars

    check_output_file(out, (model_dir,), force=force, kind=TABLE_KIND)

    model, input_shape, info = dense_model(model_dir)
    layers = [LayerSpec.from_geometry(g, settings.grid_cap, settings.ranks)
              for g in candidate_geometry(model, input_shape)]
    log = StageLog(progress)
    with tempfile.TemporaryDirectory(prefix="cstar-profile-model-") as tmp:
        onnx_path = dense_model_onnx(model, input_shape, Path(tmp))
        log(f"profiling {len(layers)} layers of {info['name']} on {settings.backend} "
            f"(batch {','.join(map(str, settings.batch_sizes))}, {settings.threads or 'default'} thread(s))")
        with _bar(progress_bars(progress)) as callback:
            body = profile_layers(layers, onnx_path, input_shape, info, settings, callback)
        if settings.calibrate:
            from deploy.profile.fit import calibrate_table

            log("calibrating on whole reference models (Tucker-2 and pruned)")
            timer = MicroTimer(settings, Path(tmp))
            body = calibrate_table(body, model, input_shape, onnx_path, Path(tmp),
                                   lambda paths: timer.time_files(paths, input_shape, calibration_iters(settings),
                                                                  CALIBRATION_ROUNDS))
    return write_table(body, out)


def calibration_iters(settings: ProfileSettings) -> int:
    """Timed calls per calibration round: a third of --model-iters (at least 5), so nine rounds cost about as much
    as three of --model-iters."""
    return max(5, settings.model_iters // 3)


def dense_model(model_dir: str | Path) -> tuple[Any, tuple[int, ...], dict[str, Any]]:
    """The dense architecture of a train/compress directory's model (registry build, random weights)."""
    from cstar.checkpoint import CHECKPOINT_STAGES
    from cstar.data import DatasetSpec
    from cstar.manifest import read_manifest
    from cstar.models import build_model

    manifest = read_manifest(model_dir, CHECKPOINT_STAGES)
    if "model" not in manifest or "dataset" not in manifest:
        raise CstarError(f"{model_dir}/manifest.json lacks 'model' or 'dataset'", "re-run the stage that wrote it")
    spec = DatasetSpec.from_dict(manifest["dataset"])
    options = manifest["model"].get("options", {})
    model = build_model(manifest["model"]["name"], spec, **options).eval()
    info = {"name": manifest["model"]["name"], "options": options,
            "source": {"path": str(Path(model_dir).resolve()), "stage": manifest.get("stage")}}
    return model, tuple(int(d) for d in spec.input_shape), info


def dense_model_onnx(model: Any, input_shape: tuple[int, ...], directory: Path) -> Path:
    """Export the dense model as `cstar export` deploys it (export.as_deployed)."""
    from export.as_deployed import export_as_deployed

    return export_as_deployed(model, input_shape, directory, "dense")




class _bar:
    """A tqdm bar over the micro-graphs when drawing bars (a TTY), else a no-op callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> PROGRESS | None:
        if not self.enabled:
            return None

        def update(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="profile", unit="graph", leave=False)
            self.bar.n = done
            self.bar.refresh()

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
