"""FP32 ExecuTorch lowering for XNNPACK (host side: torch + executorch): an export's checkpoint -> `.pte`.

The export stage's source checkpoint in its deploy form (export.deploy_form.to_deploy, with the
per-layer forms the export recorded, BatchNorms folded) -> `torch.export` -> `to_edge_transform_and_lower`
with the XNNPACK partitioner -> `.pte`, checked against the export's ONNX model (`build_fp32`, which
`cstar build` calls for the executorch-xnnpack backend). The same export/lower/write/run steps serve
calibration.executorch_int8, which quantizes with PT2E in between; this module never imports
calibration. Torch and executorch are imported inside the functions that use them.

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

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, GateFailure, MissingDependencyError
from cstar.manifest import MANIFEST_NAME, atomic_write_bytes

PTE_NAME = "model.pte"
BACKEND = "executorch-xnnpack"
MIN_BATCH_METHOD = "cstar_min_batch"
MAX_BATCH_METHOD = "cstar_max_batch"
# nodes that move values around the delegate calls rather than compute
BOOKKEEPING_OPS = frozenset({"getitem", "sym_size", "sym_size_int", "executorch_call_delegate", "output"})
# below this fraction of compute nodes in XNNPACK the program is flagged as slow
MIN_DELEGATED_FRACTION = 0.9
# ATen's CPU conv picks its backend on `input.size(0) >= 16`: a guard on the traced batch (module docstring)
CONV_GUARD_BATCH = 16


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
    from export.reference import find_reference

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
        """Whether the program takes a batch range (min < max) rather than one static batch."""
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
    """A seeded uniform example input to trace on: the same bytes out for the same model and bounds."""
    import torch

    return torch.rand((batch, *[int(d) for d in input_shape]), generator=torch.Generator().manual_seed(0))


def _dynamic_shapes(low: int, high: int) -> Any:
    """torch.export's dynamic_shapes for the batch (None when static), its upper bound the trace batch."""
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


# ------------------------------------------------------------------------------------------ files


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
    from cstar.ort_cpu import batched_logits, compare_logits, cpu_session

    images = np.random.default_rng(seed).random((n, *[int(d) for d in input_shape]), dtype=np.float32)
    reference = batched_logits(cpu_session(onnx_path), images)
    got = run_pte(pte, images)
    parity = compare_logits(reference, got)
    scale = float(np.abs(reference).max()) if reference.size else 0.0
    return {**parity, "against": "fp32-onnx", "runtime": "ort-cpu", "inputs": "uniform [0,1]", "seed": seed,
            "logit_scale": scale}


def build_fp32(export_dir: Path, export_manifest: dict[str, Any], onnx_path: Path, out_pte: Path,
               input_shape: Sequence[int], low: int, high: int, tolerance: float = 1e-4) -> dict[str, Any]:
    """Lower the export's checkpoint to `out_pte` (FP32) and check it against the ONNX; returns the record.

    Parity gate: max |logit difference| <= tolerance x max(1, logit scale) on 2 x max-batch images.
    """
    from cstar.data import DatasetSpec
    from cstar.manifest import file_entry
    from export.reference import load_reference

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
