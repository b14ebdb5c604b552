"""ExecuTorch XNNPACK lowering (host side: torch + executorch): a cstar checkpoint's deploy form -> `.pte`.

FP32: the export stage's source checkpoint in its deploy form (export.deploy_form.to_deploy, with the
per-layer forms the export recorded, BatchNorms folded) -> `torch.export` -> `to_edge_transform_and_lower`
with the XNNPACK partitioner -> `.pte`. INT8: PT2E with `XNNPACKQuantizer`
(`get_symmetric_quantization_config(is_per_channel=True)`: int8 symmetric per-channel weights, int8
per-tensor affine activations, float bias), calibrated on the images `cstar calibrate` uses, then the
same lowering. The format is `xnnpack-pt2e-int8`; only the executorch-xnnpack backend runs it.

Batch: the batch dimension is exported dynamic in [min, max] and the bounds are stored in the program
as the constant methods `cstar_min_batch` / `cstar_max_batch` (deploy.backends.executorch reads them);
min == max exports a static batch. The trace batch matters (torch 2.14.1, executorch 1.5.1): lowering a
conv model adds a guard on batch < 16 or batch >= 16 taken from the example (ATen's CPU conv backend
choice tests `input.size(0) >= 16`), so an example below 16 caps the program at 15 (max 64 refused
batch 64), and example == max == 16 specializes the batch to 16. Tracing at batch `max` (17 when max is
16, the program then holds one spare row of memory) keeps [min, max]; `lower` runs the program at both
bounds before it is written.

Delegation: a node XNNPACK does not take runs on ExecuTorch's portable kernels (slow, single
threaded). `delegation_summary` counts compute nodes inside and outside the delegate (bookkeeping
nodes such as getitem/sym_size left out) and lists the portable ops; builds and calibrations record it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, GateFailure, MissingDependencyError
from cstar.manifest import MANIFEST_NAME, atomic_write_bytes, read_manifest

TARGET = "executorch"
FORMAT = "xnnpack-pt2e-int8"
PTE_NAME = "model.pte"
BACKEND = "executorch-xnnpack"
DEFAULT_MAX_BATCH = 64
MIN_BATCH_METHOD = "cstar_min_batch"
MAX_BATCH_METHOD = "cstar_max_batch"
# nodes that move values around the delegate calls rather than compute
BOOKKEEPING_OPS = frozenset({"getitem", "sym_size", "sym_size_int", "executorch_call_delegate", "output"})
# below this fraction of compute nodes in XNNPACK the program is flagged as slow
MIN_DELEGATED_FRACTION = 0.9
# ATen's CPU conv picks its backend on `input.size(0) >= 16`: a guard on the traced batch (module docstring)
CONV_GUARD_BATCH = 16
# activation observer per `cstar calibrate --method` (weights always per-channel min/max)
OBSERVERS = {"minmax": "MinMaxObserver", "entropy": "HistogramObserver", "percentile": "HistogramObserver"}


def require_executorch(purpose: str) -> None:
    """MissingDependencyError (naming the extra) unless executorch's exir and XNNPACK lowering import."""
    try:
        import executorch.backends.xnnpack.partition.xnnpack_partitioner  # noqa: F401
        import executorch.exir  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError("executorch", "executorch", purpose) from exc


# ------------------------------------------------------------------------------------------ model


def _deploy_forms(export_manifest: dict[str, Any]) -> dict[str, str]:
    """{layer: deploy form} the export recorded (empty when it recorded none)."""
    block = export_manifest.get("deploy_forms")
    layers = block.get("layers", {}) if isinstance(block, dict) else {}
    return {str(name): str(entry["form"]) for name, entry in layers.items()
            if isinstance(entry, dict) and "form" in entry}


def deploy_model(model: Any, export_manifest: dict[str, Any]) -> Any:
    """`model` in the deploy form the export used (its recorded per-layer forms, BatchNorms folded)."""
    from export.deploy_form import to_deploy

    forms = _deploy_forms(export_manifest)
    return to_deploy(model, forms) if forms else to_deploy(model)


def reference_for_export(export_dir: Path, export_manifest: dict[str, Any]) -> Path:
    """The train/compress directory the export was made from (sha256-checked); a CstarError if none."""
    from calibration.measure import find_reference

    reference, why = find_reference(export_manifest)
    if reference is None:
        raise CstarError(
            f"the {BACKEND} backend lowers the PyTorch checkpoint the export was made from, but {why}",
            f"re-run `cstar export` from the train/compress directory (its manifest must stay where "
            f"{export_dir}/{MANIFEST_NAME} records it)",
        )
    return reference


# ------------------------------------------------------------------------------------------ lowering


@dataclass
class Lowered:
    """A lowered program: its bytes, batch bounds and how much of it XNNPACK runs."""

    buffer: bytes
    low: int
    high: int
    delegation: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def dynamic_batch(self) -> bool:
        return self.low != self.high

    def record(self) -> dict[str, Any]:
        """The manifest/build.json block describing the program."""
        from cstar.manifest import library_versions

        return {"format": "pte", "delegate": "XnnpackBackend", "dynamic_batch": self.dynamic_batch,
                "batch": {"min": self.low, "max": self.high}, "trace_batch": trace_batch(self.low, self.high),
                "bytes": len(self.buffer), "delegation": self.delegation,
                "versions": library_versions(("torch", "executorch", "torchao"))}


def check_batch_bounds(low: int, high: int) -> None:
    """1 <= low <= high, with the flags to fix it."""
    if not 1 <= low <= high:
        raise CstarError(f"batch range {low}..{high} is not valid for an ExecuTorch program",
                         "pass 1 <= --min-batch <= --max-batch")


def trace_batch(low: int, high: int) -> int:
    """Batch to trace and plan memory for: `high`, or 17 for a dynamic range ending at 16 (see the module)."""
    return high + 1 if low < high == CONV_GUARD_BATCH else high


def _example(input_shape: Sequence[int], batch: int) -> Any:
    import torch

    return torch.rand((batch, *[int(d) for d in input_shape]), generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(low: int, high: int) -> Any:
    from torch.export import Dim

    return None if low == high else ({0: Dim("batch", min=low, max=trace_batch(low, high))},)


def export_program(model: Any, input_shape: Sequence[int], low: int, high: int) -> Any:
    """`torch.export` of `model` (in eval mode; PT2E graphs refuse .eval()) on (batch, *input_shape), batch
    dynamic in [low, high] (static when equal)."""
    import torch

    check_batch_bounds(low, high)
    try:
        return torch.export.export(model, (_example(input_shape, trace_batch(low, high)),),
                                   dynamic_shapes=_dynamic_shapes(low, high))
    except Exception as exc:  # noqa: BLE001 - torch.export raises many types; the user needs the reason
        raise CstarError(
            f"torch.export failed on the deploy-form model: {type(exc).__name__}: {str(exc)[:400]}",
            "report this model; the ExecuTorch backend needs a torch.export-able model",
        ) from exc


def delegation_summary(graph_module: Any) -> dict[str, Any]:
    """Compute nodes inside XNNPACK delegates vs on portable kernels, and which ops fell back."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    delegated, portable = 0, 0
    portable_ops: dict[str, int] = {}
    for op, row in info.delegation_by_operator.items():
        if op in BOOKKEEPING_OPS:
            continue
        delegated += int(row.delegated)
        portable += int(row.non_delegated)
        if row.non_delegated:
            portable_ops[str(op)] = int(row.non_delegated)
    total = delegated + portable
    return {"subgraphs": int(info.num_delegated_subgraphs), "delegated_nodes": delegated,
            "portable_nodes": portable, "delegated_fraction": delegated / total if total else 0.0,
            "portable_ops": portable_ops}


def lower(exported: Any, low: int, high: int) -> Lowered:
    """XNNPACK-partition and serialize an exported program; the batch bounds go in as constant methods."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    try:
        edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()],
                                           constant_methods={MIN_BATCH_METHOD: low, MAX_BATCH_METHOD: high})
        delegation = delegation_summary(edge.exported_program().graph_module)
        buffer = edge.to_executorch().buffer
    except Exception as exc:  # noqa: BLE001 - exir raises many types
        raise CstarError(f"ExecuTorch lowering failed: {type(exc).__name__}: {str(exc)[:400]}",
                         "report this model with the executorch version") from exc
    lowered = Lowered(bytes(buffer), low, high, delegation)
    check_program(lowered.buffer, exported, low, high)
    if delegation["delegated_fraction"] < MIN_DELEGATED_FRACTION:
        lowered.warnings.append(
            f"only {delegation['delegated_fraction']:.0%} of the compute nodes run in XNNPACK; the rest "
            f"({', '.join(sorted(delegation['portable_ops']))}) run on ExecuTorch's slow portable kernels")
    return lowered


def check_program(buffer: bytes, exported: Any, low: int, high: int) -> None:
    """Run the program at batch `low` and `high`: a wrong memory plan fails here, not on a device."""
    import torch
    from executorch.runtime import Runtime

    user_input = exported.graph_signature.user_inputs[0]
    placeholder = next(n for n in exported.graph.nodes if n.op == "placeholder" and n.name == user_input)
    shape = [int(d) for d in placeholder.meta["val"].shape[1:]]
    method = Runtime.get().load_program(buffer).load_method("forward")
    for batch in sorted({low, high}):
        try:
            method.execute([torch.zeros((batch, *shape))])
        except Exception as exc:  # noqa: BLE001 - the pybindings raise RuntimeError with an error code
            raise CstarError(
                f"the lowered ExecuTorch program fails at batch {batch} (built for {low}..{high}): {exc}",
                "pass another --min-batch/--max-batch, and report this model with the executorch version",
            ) from exc


def lower_fp32(model: Any, input_shape: Sequence[int], low: int, high: int) -> Lowered:
    """FP32 `.pte` of a deploy-form model."""
    require_executorch(f"lowering to the {BACKEND} backend")
    return lower(export_program(model.eval(), input_shape, low, high), low, high)


def quantization_config(method: str) -> tuple[Any, str]:
    """(XNNPACK quantization config, activation observer name) for a `cstar calibrate --method`."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import get_symmetric_quantization_config

    if method not in OBSERVERS:
        raise CstarError(f"unknown calibration method '{method}'", f"use one of: {', '.join(OBSERVERS)}")
    config = get_symmetric_quantization_config(is_per_channel=True)
    observer = OBSERVERS[method]
    if observer == "MinMaxObserver":
        from torchao.quantization.pt2e import MinMaxObserver

        observer_ctr = MinMaxObserver.with_args(eps=2**-12)
        spec = replace(config.input_activation, observer_or_fake_quant_ctr=observer_ctr)
        config = replace(config, input_activation=spec, output_activation=spec)
    return config, observer


def quantize(model: Any, images: np.ndarray, input_shape: Sequence[int], low: int, high: int,
             method: str = "minmax") -> tuple[Any, str]:
    """PT2E INT8 (XNNPACKQuantizer) of a deploy-form model calibrated on `images`: (program, observer)."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import XNNPACKQuantizer
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    require_executorch(f"INT8 for the {BACKEND} backend")
    if images.shape[0] == 0:
        raise CstarError("no calibration images", "pass --samples N with N >= 1")
    config, observer = quantization_config(method)
    graph = export_program(model.eval(), input_shape, low, high).module()
    prepared = prepare_pt2e(graph, XNNPACKQuantizer().set_global(config))
    with torch.no_grad():
        for start in range(0, images.shape[0], high):
            chunk = np.ascontiguousarray(images[start : start + high], dtype=np.float32)
            if chunk.shape[0] < low:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - chunk.shape[0], axis=0)])
            prepared(torch.from_numpy(chunk))
    converted = convert_pt2e(prepared)
    return export_program(converted, input_shape, low, high), observer


def quantization_block(observer: str) -> dict[str, Any]:
    """The manifest's `quantization` block of an xnnpack-pt2e-int8 program."""
    return {
        "format": FORMAT,
        "target": TARGET,
        "quant_format": "pt2e",
        "quantizer": "XNNPACKQuantizer get_symmetric_quantization_config(is_per_channel=True)",
        "activations": {"type": "int8", "symmetric": False, "granularity": "per-tensor",
                        "observer": observer},
        "weights": {"type": "int8", "symmetric": True, "granularity": "per-channel", "bits": 8,
                    "range": [-127, 127]},
        "reduce_range": False,
        "per_channel": True,
        "bias": "float",
    }


def write_pte(lowered: Lowered, path: Path) -> Path:
    """Write the program atomically."""
    return atomic_write_bytes(path, bytes(lowered.buffer))


def run_pte(path: Path, images: np.ndarray) -> np.ndarray:
    """Logits of a `.pte` on the ExecuTorch runtime, in chunks within its batch bounds (host-side checks)."""
    import torch
    from executorch.runtime import Runtime

    program = Runtime.get().load_program(path)
    method = program.load_method("forward")
    names = program.method_names
    if MAX_BATCH_METHOD in names:
        low = int(program.load_method(MIN_BATCH_METHOD).execute([])[0])
        high = int(program.load_method(MAX_BATCH_METHOD).execute([])[0])
    else:
        low = high = int(method.metadata.input_tensor_meta(0).sizes()[0])
    outputs = []
    for start in range(0, images.shape[0], high):
        chunk = np.ascontiguousarray(images[start : start + high], dtype=np.float32)
        n = chunk.shape[0]
        if n < low:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], low - n, axis=0)])
        outputs.append(method.execute([torch.from_numpy(chunk)])[0].numpy()[:n])
    return np.concatenate(outputs).astype(np.float32)


# ------------------------------------------------------------------------------------------ build (FP32)


def fp32_parity(pte: Path, onnx_path: Path, input_shape: Sequence[int], n: int,
                seed: int = 0) -> dict[str, Any]:
    """FP32 `.pte` against the export's ONNX model (ONNX Runtime CPU) on `n` seeded uniform [0,1] images."""
    from calibration.measure import parity as _parity
    from calibration.measure import run_logits_of as _run
    from calibration.measure import session as _session

    images = np.random.default_rng(seed).random((n, *[int(d) for d in input_shape]), dtype=np.float32)
    reference = _run(_session(onnx_path), images)
    got = run_pte(pte, images)
    parity = _parity(got, reference)
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return {**parity, "against": "fp32-onnx", "runtime": "ort-cpu", "inputs": "uniform [0,1]", "seed": seed,
            "logit_scale": scale}


def build_fp32(export_dir: Path, export_manifest: dict[str, Any], onnx_path: Path, out_pte: Path,
               input_shape: Sequence[int], low: int, high: int, tolerance: float = 1e-4) -> dict[str, Any]:
    """Lower the export's checkpoint to `out_pte` (FP32) and check it against the ONNX; returns the record.

    Parity gate: max |logit difference| <= tolerance x max(1, logit scale) on 2 x max-batch images.
    """
    from calibration.calib_set import load_reference
    from cstar.data import DatasetSpec
    from cstar.manifest import file_entry

    require_executorch(f"lowering to the {BACKEND} backend")
    reference = reference_for_export(export_dir, export_manifest)
    spec = DatasetSpec.from_dict(export_manifest["dataset"]) if "dataset" in export_manifest else None
    model, ref_manifest = load_reference(reference, spec)
    lowered = lower_fp32(deploy_model(model, export_manifest), input_shape, low, high)
    for line in lowered.warnings:
        print(f"warning: {line}", file=sys.stderr)
    write_pte(lowered, out_pte)
    parity = fp32_parity(out_pte, onnx_path, input_shape, n=min(2 * high, 128))
    bound = tolerance * max(1.0, parity["logit_scale"])
    parity.update({"tolerance": bound, "passed": parity["max_abs_diff"] <= bound})
    if not parity["passed"]:
        raise GateFailure(
            f"the FP32 .pte differs from the export's ONNX model by {parity['max_abs_diff']:.3g} "
            f"(> {bound:.3g}, agreement {parity['agreement']:.4f} on {parity['n']} images)",
            "the checkpoint and the export disagree: re-run `cstar export`, then build again",
        )
    weights = ref_manifest.get("weights", {}).get("file")
    source = [file_entry(reference / MANIFEST_NAME)] + ([file_entry(reference / weights)] if weights else [])
    return {**lowered.record(), "lowered_from": {"path": str(reference.resolve()), "files": source},
            "parity": parity, "warnings": lowered.warnings}


# ------------------------------------------------------------------------------------------ calibrate (INT8)


@dataclass
class CalibrationJob:
    """What `cstar calibrate --target executorch` prepared before quantizing (see calibration.calibrate)."""

    from_dir: Path
    out: Path
    export: dict[str, Any]
    fp32_path: Path
    spec: Any
    eps: float
    norm: str
    reference_dir: Path
    calib: Any
    eval_images: np.ndarray
    eval_labels: np.ndarray
    eval_indices: np.ndarray
    method: str
    seed: int
    include_adversarial: float
    warnings: list[str]
    max_batch: int = DEFAULT_MAX_BATCH
    pgd_steps: int = 20


def _metrics(job: CalibrationJob, pte: Path,
             model: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(metrics, parity vs FP32 ONNX, parity vs PyTorch) of the INT8 program on the TEST subset."""
    import torch

    from calibration.calib_set import craft_apgd
    from calibration.measure import (
        EVAL_APGD_ITERS,
        EVAL_APGD_TARGETS,
        transfer_block,
    )
    from calibration.measure import accuracy as _accuracy
    from calibration.measure import parity as _parity
    from calibration.measure import run_logits_of as _run
    from calibration.measure import session as _session
    from calibration.measure import torch_logits as _torch_logits
    from calibration.measure import worst_case as _worst_case

    fp32 = _session(job.fp32_path)
    int8_logits, fp32_logits = run_pte(pte, job.eval_images), _run(fp32, job.eval_images)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(job.eval_images)).float().numpy()
    sets = craft_apgd(model, job.eval_images, job.eval_labels, job.eps, job.norm, job.seed, EVAL_APGD_ITERS,
                      EVAL_APGD_TARGETS)
    metrics = {
        "clean_acc": _accuracy(int8_logits, job.eval_labels),
        "robust_acc": _worst_case(functools.partial(run_pte, pte), sets, job.eval_labels),
        "fp32_clean_acc": _accuracy(fp32_logits, job.eval_labels),
        "fp32_robust_acc": _worst_case(functools.partial(_run, fp32), sets, job.eval_labels),
        "reference_robust_acc": _worst_case(functools.partial(_torch_logits, model), sets, job.eval_labels),
        "n": int(job.eval_labels.shape[0]),
        "executed_as": BACKEND,  # measured on the ExecuTorch runtime itself
        "attack": transfer_block(job.eps, job.norm, job.seed),
    }
    parity = {**_parity(int8_logits, fp32_logits), "against": "fp32-onnx", "runtime": BACKEND,
              "executed_as": BACKEND}
    parity_torch = {**_parity(int8_logits, torch_logits), "against": "pytorch-reference"}
    return metrics, parity, parity_torch


def calibrate_executorch(job: CalibrationJob, verbose: bool = True) -> dict[str, Any]:
    """INT8 `.pte` (xnnpack-pt2e-int8) of the export's checkpoint into job.out; returns the manifest."""
    from calibration.calib_set import load_reference
    from cstar.manifest import file_entry, sha256_file, write_manifest

    require_executorch(f"`cstar calibrate --target {TARGET}`")
    model, _ = load_reference(job.reference_dir, job.spec)
    shape = tuple(int(d) for d in job.spec.input_shape)
    exported, observer = quantize(deploy_model(model, job.export), job.calib.images, shape, 1, job.max_batch,
                                  job.method)
    lowered = lower(exported, 1, job.max_batch)
    job.warnings.extend(lowered.warnings)
    for line in lowered.warnings:
        if verbose:
            print(f"warning: {line}", file=sys.stderr)
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / MANIFEST_NAME).unlink(missing_ok=True)  # unfinished until the new manifest lands
    final = job.out / PTE_NAME
    try:
        write_pte(lowered, final)
        metrics, parity, parity_torch = _metrics(job, final, model)
        body: dict[str, Any] = {
            "inputs": [file_entry(job.fp32_path), file_entry(job.from_dir / MANIFEST_NAME),
                       file_entry(job.reference_dir / MANIFEST_NAME)],
            "dataset": job.export["dataset"],
            "model": job.export.get("model"),
            "eps": job.eps,
            "norm": job.norm,
            "metrics": metrics,
        }
        for key in ("params", "flops", "compression", "ranks", "classes", "input", "deploy_forms"):
            if key in job.export:
                body[key] = job.export[key]
        body["parity"] = parity
        body["parity_torch"] = parity_torch
        body["artifact"] = {"file": PTE_NAME, "sha256": sha256_file(final), "format": "pte",
                            "backend": BACKEND}
        body["executorch"] = lowered.record()
        body["precision"] = "int8"
        body["quantization"] = quantization_block(observer)
        body["calibration"] = _calibration_record(job, observer)
        body["warnings"] = job.warnings
        write_manifest(job.out, "calibrate", body)
    except BaseException:
        final.unlink(missing_ok=True)
        raise
    return read_manifest(job.out, ("calibrate",))


def _calibration_record(job: CalibrationJob, observer: str) -> dict[str, Any]:
    calib = job.calib
    return {
        "samples": int(len(calib)),
        "method": job.method,
        "observer": observer,
        "split": calib.split,
        "indices": [int(i) for i in calib.indices],
        "adversarial_fraction": float(job.include_adversarial),
        "n_adversarial": int(calib.n_adversarial),
        "adversarial_attack": calib.attack,
        "seed": job.seed,
        "per_channel": True,
        "symmetric": False,
        "activation_type": "int8",
        "weight_type": "int8",
        "quantize_bias": False,
        "eval_indices": [int(i) for i in job.eval_indices],
    }
