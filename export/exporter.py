"""CLI stage `cstar export`: checkpoint -> deploy form -> ONNX -> simplified -> parity-checked.

Everything is written into a staged sibling of `out_dir` (cstar.outdir's rule): `model.onnx` is moved
into it only after parity passed, `manifest.json` is written last, and the sibling is renamed into
place at the end. A failed export leaves neither.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cstar.errors import CstarError, GateFailure
from cstar.manifest import MANIFEST_NAME
from cstar.stage_log import StageLog

MODEL_FILE = "model.onnx"
DEFAULT_PARITY_SAMPLES = 256
DEFAULT_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar export`."""
    from export.onnx_export import DEFAULT_OPSET, SIMPLIFIERS

    parser.add_argument("--from", dest="from_dir", required=True, help="train or compress directory")
    parser.add_argument("--out", required=True, help="output directory (model.onnx + manifest.json)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 17, default {DEFAULT_OPSET})")
    parser.add_argument("--simplifier", choices=SIMPLIFIERS, default="onnxslim",
                        help="graph simplifier (default onnxslim)")
    batch = parser.add_mutually_exclusive_group()
    batch.add_argument("--dynamic-batch", action="store_true", default=True,
                       help="symbolic batch dimension (default)")
    batch.add_argument("--static-batch", type=int, default=None, metavar="N", help="fix the batch dimension to N")
    parser.add_argument("--parity-samples", type=int, default=DEFAULT_PARITY_SAMPLES,
                        help=f"test images for the parity check, class-stratified (default {DEFAULT_PARITY_SAMPLES})")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max |logit difference| allowed against PyTorch (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--latency-table", default=None, metavar="TABLE",
                        help="latency table (cstar profile) choosing each factorized layer's deploy form "
                             "(default: fewest MACs)")
    parser.add_argument("--latency-batch", default=None, metavar="N[,M...]",
                        help="batch size whose latencies decide (default: the table's first); of a list (a "
                             "compress budget at several batch sizes) the first decides, as in compress")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    parser.add_argument("--force", action="store_true", help="replace an existing export directory at --out")


def main(args: argparse.Namespace) -> int:
    """Run the stage from parsed arguments; prints a one-line summary."""
    manifest = run_export(
        args.from_dir, args.out, opset=args.opset, simplifier=args.simplifier, force=args.force,
        dynamic_batch=args.static_batch is None, static_batch=args.static_batch,
        parity_samples=args.parity_samples, tolerance=args.tolerance, progress=not args.quiet,
        latency_table=args.latency_table, latency_batch=args.latency_batch,
    )
    parity = manifest["parity"]
    print(f"exported {Path(args.out) / MODEL_FILE}: opset {manifest['onnx']['opset']}, "
          f"{sum(manifest['onnx']['nodes'].values())} nodes, parity max|diff| {parity['max_abs_diff']:.2e}, "
          f"agreement {parity['agreement']:.4f} on {parity['n']} inputs")
    return 0




def _validate(from_dir: Path, out_dir: Path, simplifier: str, opset: int, static_batch: int | None,
              parity_samples: int, tolerance: float) -> None:
    from export.onnx_export import check_opset, require_simplifier

    check_opset(opset)
    require_simplifier(simplifier)
    if static_batch is not None and static_batch < 1:
        raise CstarError(f"--static-batch must be >= 1, got {static_batch}", "pass a positive batch size")
    if parity_samples < 1:
        raise CstarError(f"--parity-samples must be >= 1, got {parity_samples}", "pass a positive sample count")
    if not tolerance > 0:
        raise CstarError(f"--tolerance must be > 0, got {tolerance}", "pass e.g. --tolerance 1e-4")


def run_export(
    from_dir: str | Path,
    out_dir: str | Path,
    opset: int = 20,
    simplifier: str = "onnxslim",
    dynamic_batch: bool = True,
    static_batch: int | None = None,
    parity_samples: int = DEFAULT_PARITY_SAMPLES,
    tolerance: float = DEFAULT_TOLERANCE,
    progress: bool = True,
    parity_data: tuple[Any, Any] | None = None,
    latency_table: str | Path | None = None,
    latency_batch: int | str | Sequence[int] | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Export the checkpoint in `from_dir` to `out_dir/model.onnx` + manifest; returns the manifest.

    `parity_data` = (images, labels) replaces the checkpoint's test set for the parity check (used
    for datasets that cannot be reloaded here, e.g. synthetic specs in tests). `latency_table` (a
    `cstar profile` table) picks each factorized layer's deploy form at `latency_batch`.
    `out_dir` follows cstar.outdir's rule (`force` replaces an existing export directory).
    """
    from cstar.outdir import OutputDir

    from_path, out_path = Path(from_dir), Path(out_dir)
    _validate(from_path, out_path, simplifier, opset, static_batch, parity_samples, tolerance)
    claim = OutputDir(out_path, "export", (from_path, latency_table), force=force)
    table = _load_table(latency_table, latency_batch)
    log = StageLog(progress, prefix="[export] ")
    from cstar.checkpoint import load_checkpoint

    model, source = load_checkpoint(from_path)
    log(f"loaded {source['model']['name']} ({source['stage']}) from {from_path}")
    with claim as staged:  # the whole directory is renamed into place once complete
        work = Path(tempfile.mkdtemp(prefix=".export-", dir=staged))
        try:
            body = _export_into(work, model, source, from_path, opset, simplifier, dynamic_batch, static_batch,
                                parity_samples, tolerance, parity_data, log, table)
            _publish(work, staged, body)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    log(f"wrote {out_path / MODEL_FILE} and {out_path / MANIFEST_NAME}")
    from cstar.manifest import read_manifest

    return read_manifest(out_path, ("export",))


@dataclass
class _Table:
    """A loaded latency table, where it came from, and the batch size whose latencies decide."""

    table: Any
    path: Path
    batch: int


def _load_table(path: str | Path | None, batch: int | str | Sequence[int] | None) -> _Table | None:
    """Load `--latency-table` up front (before any long work); check `--latency-batch` (of a list, the first:
    the headline batch of a multi-batch compress budget) against it."""
    if path is None:
        if batch is not None:
            raise CstarError("--latency-batch needs --latency-table", "pass --latency-table TABLE (cstar profile)")
        return None
    from cstar.latency_table import LatencyTable, latency_batches

    table = LatencyTable.load(path)
    sizes = tuple(int(b) for b in table.batch_sizes)
    chosen = sizes[0] if batch is None and sizes else (None if batch is None else latency_batches(batch)[0])
    if chosen is None or chosen < 1 or (sizes and chosen not in sizes):
        raise CstarError(f"--latency-batch {chosen} is not a batch size of the table {path} "
                         f"(it has {', '.join(map(str, sizes)) or 'none'})",
                         "pass one of the table's batch sizes, or profile that batch size (cstar profile)")
    return _Table(table, Path(path), int(chosen))


def _forms_record(choices: dict[str, Any], table: _Table | None) -> dict[str, Any]:
    """Manifest block: each factorized layer's deploy form, why, and its cost per form."""
    from cstar.manifest import sha256_file

    record: dict[str, Any] = {"chosen_by": "table" if table is not None else "macs",
                              "layers": {name: choice.to_dict() for name, choice in choices.items()}}
    if table is not None:
        record["table"] = {"path": str(table.path.resolve()), "sha256": sha256_file(table.path),
                           "backend": table.table.backend, "machine": table.table.machine,
                           "threads": table.table.threads, "batch": table.batch}
    return record


def _publish(work: Path, out_path: Path, body: dict[str, Any]) -> None:
    """Move model.onnx into place (atomic rename), then write manifest.json last."""
    from cstar.manifest import write_manifest

    (out_path / MANIFEST_NAME).unlink(missing_ok=True)  # a stale manifest must never describe the new file
    os.replace(work / MODEL_FILE, out_path / MODEL_FILE)
    try:
        write_manifest(out_path, "export", body)
    except BaseException:
        (out_path / MODEL_FILE).unlink(missing_ok=True)
        raise


def _parity_set(spec: Any, n: int, parity_data: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """A class-stratified subset of the test split (or of `parity_data`)."""
    import torch

    from cstar.data import load_dataset_from_spec, stratified_indices, to_tensors

    if parity_data is not None:
        images, labels = (torch.as_tensor(parity_data[0], dtype=torch.float32),
                          torch.as_tensor(parity_data[1], dtype=torch.long))
        chosen = stratified_indices(labels.numpy(), n)
        return images[chosen], labels[chosen]
    bundle = load_dataset_from_spec(spec)
    labels_np = bundle.labels("test")
    images, labels = to_tensors(bundle.test, stratified_indices(labels_np, n))
    if tuple(images.shape[1:]) != tuple(spec.input_shape):
        raise CstarError(f"test images have shape {tuple(images.shape[1:])}, the model expects {spec.input_shape}",
                         "the dataset changed since training; re-run the training stage")
    return images, labels


def _export_into(work: Path, model: Any, source: dict[str, Any], from_path: Path, opset: int, simplifier: str,
                 dynamic_batch: bool, static_batch: int | None, parity_samples: int, tolerance: float,
                 parity_data: tuple[Any, Any] | None, log: Callable[[str], None],
                 table: _Table | None = None) -> dict[str, Any]:
    """Do all the work inside `work`; leaves `work/model.onnx` and returns the manifest body."""
    from cstar.data import DatasetSpec
    from export.deploy_form import to_deploy
    from export.forms import FORMS, choose_form_details
    from export.onnx_export import export_onnx, op_counts

    spec = DatasetSpec.from_dict(source["dataset"])
    choices = choose_form_details(model, table.table if table else None, table.batch if table else 1,
                                  tuple(spec.input_shape))
    deployed = to_deploy(model, {name: choice.form for name, choice in choices.items()})
    if choices:
        counts = {form: sum(c.form == form for c in choices.values()) for form in FORMS}
        log("deploy forms" + (f" (table, batch {table.batch})" if table else " (fewest MACs)") + ": "
            + ", ".join(f"{form} {n}" for form, n in counts.items() if n))
    raw = export_onnx(deployed, spec.input_shape, work / "raw.onnx", opset, dynamic_batch, static_batch)
    log(f"exported with the {raw.exporter} exporter" + (f" (dynamo failed: {raw.fallback_reason})"
                                                         if raw.fallback_reason else ""))
    images, labels = _parity_set(spec, parity_samples, parity_data)
    eps, norm = float(source.get("eps", spec.default_eps)), str(source.get("norm", "linf"))
    chosen, parity, fallback = _choose_graph(work, raw.path, model, images, labels, eps, norm, simplifier,
                                             tolerance, log)
    os.replace(chosen, work / MODEL_FILE)
    used_simplifier = simplifier if fallback is None else "none"
    body = _manifest_body(source, from_path, deployed, spec, parity, work / MODEL_FILE, raw, used_simplifier,
                          op_counts(work / MODEL_FILE))
    if choices or table is not None:
        body["deploy_forms"] = _forms_record(choices, table)
    if fallback is not None:
        body["simplifier_fallback"] = {"requested": simplifier, "reason": fallback}
    return body


def _choose_graph(work: Path, raw: Path, model: Any, images: Any, labels: Any, eps: float, norm: str,
                  simplifier: str, tolerance: float, log: Callable[[str], None]) -> tuple[Path, dict[str, Any], str | None]:
    """Simplify and check parity; fall back to the unsimplified graph if simplification breaks it."""
    from export.onnx_export import simplify
    from export.parity import check_parity

    fallback: str | None = None
    if simplifier != "none":
        try:
            simplified = simplify(raw, work / "simplified.onnx", simplifier)
            parity = check_parity(model, simplified, images, labels, eps, norm, tolerance)
            if parity["passed"]:
                log(_parity_line(parity))
                return simplified, parity, None
            fallback = f"{simplifier} output failed parity (max |diff| {parity['max_abs_diff']:.3g} > {tolerance:g})"
        except CstarError:
            raise
        except Exception as exc:  # noqa: BLE001 - a simplifier crash must not sink a valid export
            fallback = f"{simplifier} failed: {type(exc).__name__}: {str(exc)[:300]}"
        log(f"falling back to the unsimplified graph: {fallback}")
    parity = check_parity(model, raw, images, labels, eps, norm, tolerance)
    log(_parity_line(parity))
    if not parity["passed"]:
        raise GateFailure(
            f"ONNX parity failed: max |logit diff| {parity['max_abs_diff']:.3g} > tolerance {tolerance:g} "
            f"(agreement {parity['agreement']:.4f} on {parity['n']} clean + PGD inputs)",
            "report this model; a looser --tolerance hides real numeric drift",
        )
    return raw, parity, fallback


def _parity_line(parity: dict[str, Any]) -> str:
    return (f"parity: max |diff| {parity['max_abs_diff']:.2e} (clean {parity['clean']['max_abs_diff']:.2e}, "
            f"PGD {parity['adversarial']['max_abs_diff']:.2e}), agreement {parity['agreement']:.4f}")


def _manifest_body(source: dict[str, Any], from_path: Path, deployed: Any, spec: Any, parity: dict[str, Any],
                   onnx_path: Path, raw: Any, simplifier: str, nodes: dict[str, int]) -> dict[str, Any]:
    from cstar.flops import count_flops, count_params
    from cstar.manifest import file_entry, library_versions, sha256_file
    from export.onnx_export import INPUT_NAME, OUTPUT_NAME

    weights = source["weights"]["file"]
    body: dict[str, Any] = {
        "inputs": [file_entry(from_path / MANIFEST_NAME), file_entry(from_path / weights)],
        "source": {"stage": source["stage"], "path": str(from_path.resolve())},
        "dataset": source["dataset"],
        "model": source["model"],
        "eps": source.get("eps", spec.default_eps),
        "norm": source.get("norm", "linf"),
        "metrics": source.get("metrics", {}),
        "params": count_params(deployed),
        "flops": count_flops(deployed, spec.input_shape),
    }
    for key in ("compression", "ranks"):
        if key in source:
            body[key] = source[key]
    body["parity"] = parity
    body["onnx"] = {
        "file": MODEL_FILE, "sha256": sha256_file(onnx_path), "opset": raw.opset, "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME, "dynamic_batch": raw.dynamic_batch, "static_batch": raw.static_batch,
        "simplifier": simplifier, "exporter": raw.exporter, "nodes": nodes,
    }
    if raw.fallback_reason:
        body["onnx"]["exporter_fallback"] = raw.fallback_reason
    body["precision"] = "fp32"
    batch = None if raw.dynamic_batch else raw.static_batch
    body["input"] = {"name": INPUT_NAME, "shape": list(spec.input_shape), "batch": batch, "dtype": "float32",
                     "range": [0, 1]}
    body["classes"] = list(spec.classes)
    body["versions"] = library_versions(("torch", "onnx", "onnxruntime", "onnxscript", simplifier)
                                        if simplifier != "none" else ("torch", "onnx", "onnxruntime", "onnxscript"))
    return body
