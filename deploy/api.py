"""The Python API of the whole chain: every stage as a function returning a result object.

Importing it is torch-free: the host stages (train, compress, profile, export, calibrate, attackset) import
torch when called; build, verify and bench need numpy and the runtime only. Stage functions take stage
directories or the results of earlier calls, write the same directories and manifests as the CLI, and
return a StageResult / VerifyResult / BenchResult whose `str()` is the line the CLI prints:

    from deploy import api
    dense = api.train("digits", "runs/dense", model="mypkg.nets:make_net", epochs=5)
    table = api.profile(dense, "runs/table.json")
    small = api.compress(dense, "runs/small", ratio=2, by="latency", latency_table=table)
    onnx = api.export(small, "runs/onnx", latency_table=table)
    int8 = api.calibrate(onnx, "runs/int8", data="digits", target="ort-cpu")
    built = api.build(int8, "runs/build", backend="ort-cpu")
    print(api.verify(built, "runs/verify", reference=small, data="digits"))

`compress_model` (re-exported from cstar.api) compresses an in-memory nn.Module without directories.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.api import (
    CompressResult,
    PathLike,
    StageResult,
    as_dataset,
    compress,
    compress_model,
    import_weights,
    percent,
    read_stage,
    stage_dir,
    train,
)
from cstar.errors import CstarError

__all__ = ["BenchResult", "CompressResult", "StageResult", "VerifyResult", "as_dataset", "attackset", "bench",
           "build", "calibrate", "compress", "compress_model", "export", "import_weights", "profile", "train",
           "verify"]


@dataclass(frozen=True)
class VerifyResult:
    """A verify report: the gate's verdict and the runtime's numbers (report.json holds everything)."""

    directory: Path
    backend: str
    passed: bool
    clean_acc: float
    robust_acc: float | None  # per-example worst case over the transfer set and Square, on the runtime
    reference_clean_acc: float | None
    reference_robust_acc: float | None
    failed_checks: list[str]
    report: dict[str, Any] = field(repr=False)

    def __bool__(self) -> bool:
        return self.passed

    def __str__(self) -> str:
        text = (f"verify {self.backend}: {'PASSED' if self.passed else 'FAILED'}, clean {percent(self.clean_acc)}, "
                f"worst case {percent(self.robust_acc)} on the runtime (PyTorch reference: clean "
                f"{percent(self.reference_clean_acc)}, robust {percent(self.reference_robust_acc)})")
        return text + (f"; failed: {', '.join(self.failed_checks)}" if self.failed_checks else "")


@dataclass(frozen=True)
class BenchResult:
    """Latency of one artifact on one runtime: p50 ms per batch size (and the speedup when compared)."""

    directory: Path
    backend: str
    p50_ms: dict[int, float]
    speedup: dict[int, float] | None
    report: dict[str, Any] = field(repr=False)

    def __str__(self) -> str:
        cells = ", ".join(f"b{b} {ms:.3f} ms" + (f" ({self.speedup[b]:.2f}x)" if self.speedup and b in self.speedup
                                                  else "") for b, ms in self.p50_ms.items())
        return f"bench {self.backend}: p50 {cells}"


# ------------------------------------------------------------------------------------------ host stages


def profile(model_dir: PathLike | StageResult, out: PathLike, backend: str = "ort-cpu", threads: int | None = 1,
            batch_sizes: tuple[int, ...] = (1,)) -> Path:
    """`cstar profile --model-from DIR`: the latency table of the model's layers on `backend`; returns its path."""
    from deploy.profile import ProfileSettings, run_profile

    run_profile(stage_dir(model_dir), Path(out), ProfileSettings(backend=backend, threads=threads,
                                                                 batch_sizes=tuple(batch_sizes)), progress=False)
    return Path(out)


def export(source: PathLike | StageResult, out: PathLike, **options: Any) -> StageResult:
    """`cstar export`: deploy form (BN folded, 1x1 -> kxk -> 1x1), ONNX, parity checked on clean and PGD inputs.
    Options: run_export's (latency_table, latency_batch, opset, simplifier, parity_samples, tolerance, ...)."""
    from export.exporter import run_export

    progress = bool(options.pop("progress", False))
    run_export(stage_dir(source), out, progress=progress, **options)
    return read_stage("export", Path(out))


def calibrate(source: PathLike | StageResult, out: PathLike, data: str, target: str = "ort-cpu",
              samples: int = 256, **options: Any) -> StageResult:
    """`cstar calibrate`: INT8 in `target`'s format (ort-cpu, openvino, tensorrt, executorch), with its parity and
    robust accuracy (transfer + the fake-quant twin attack) recorded."""
    from calibration.calibrate import run_calibrate

    verbose = bool(options.pop("verbose", False))
    run_calibrate(stage_dir(source), out, data, samples, target=target, verbose=verbose, **options)
    return read_stage("calibrate", Path(out))


def attackset(reference: PathLike | StageResult, data: str, out: PathLike, samples: int = 500,
              **options: Any) -> StageResult:
    """`cstar attackset`: transfer examples crafted on the PyTorch reference with the strong suite."""
    from deploy.attackset import run_attackset

    run_attackset(stage_dir(reference), data, out, samples=samples, **options)
    return read_stage("attackset", Path(out))


# ------------------------------------------------------------------------------------------ device stages


def build(source: PathLike | StageResult, out: PathLike, backend: str = "ort-cpu", **options: Any) -> StageResult:
    """`cstar build`: the runtime artifact of an export or calibrate directory for `backend`."""
    from deploy.build import run_build

    run_build(stage_dir(source), backend, out, **options)
    return read_stage("build", Path(out))


def verify(artifact: PathLike | StageResult, out: PathLike, attack_set: PathLike | StageResult | None = None,
           reference: PathLike | StageResult | None = None, data: str | None = None, samples: int = 500,
           **options: Any) -> VerifyResult:
    """`cstar verify`: accuracy and robustness re-checked ON the runtime (transfer set + Square). With
    `reference` and `data` instead of `attack_set`, the set is crafted first, as `<out>-attackset`. The gate's
    failure is a result (passed False), not an exception; options are run_verify's."""
    from deploy.verify import run_verify

    if attack_set is None:
        if reference is None or data is None:
            raise CstarError("verify needs attack_set=, or reference= and data=",
                             "pass an attackset directory, or the PyTorch reference directory and its data")
        attack_set = attackset(reference, data, Path(f"{out}-attackset"), samples=samples)
    report = run_verify(stage_dir(artifact), stage_dir(attack_set), out, raise_on_fail=False, **options)
    runtime, reference_metrics = report["metrics"]["runtime"], report["metrics"].get("reference") or {}
    return VerifyResult(Path(out), report["backend"], bool(report["passed"]), float(runtime["clean_acc"]),
                        runtime.get("worst_case_robust_acc"), reference_metrics.get("clean_acc"),
                        reference_metrics.get("worst_case_robust_acc", reference_metrics.get("robust_acc")),
                        list(report["failed_checks"]), report)


def bench(artifact: PathLike | StageResult, out: PathLike, batch_sizes: list[int] | None = None,
          compare: PathLike | StageResult | None = None, **options: Any) -> BenchResult:
    """`cstar bench`: p50 latency per batch size on the artifact's runtime; with `compare` (another artifact)
    the speedup over it, measured in one run with rounds interleaved."""
    from deploy.bench import run_bench

    report = run_bench(stage_dir(artifact), out, batch_sizes=batch_sizes,
                       compare=None if compare is None else stage_dir(compare), **options)
    p50 = {int(r["batch_size"]): float(r["p50_ms"]) for r in report["results"]}
    compared = (report.get("compare") or {}).get("speedup_p50")
    speedup = {int(b): float(v) for b, v in compared.items() if v is not None} if compared else None
    return BenchResult(Path(out), str(report["backend"]), p50, speedup, report)
