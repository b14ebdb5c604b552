"""`cstar profile`, host side: calibrate the measured table on whole reference models (torch).

The micro-graphs price each op alone; inside a model ops run slower (cache, dispatch), and the dense
model alone cannot tell a per-op slowdown from weight streaming. So the profile builds reference
models from the same architecture with random weights, the shapes `cstar compress` produces:

- Tucker-2 at uniform rank fractions (REFERENCE_RANK_FRACTIONS of each width, rounded down to the
  table's grid), every candidate layer but the stem and classifier, deploy forms by the table;
- channel pruning at uniform keep fractions (REFERENCE_PRUNE_FRACTIONS, widths on the table's grid),
  where the model supports pruning;
- what `cstar compress --by latency` itself allocates with the uncalibrated table (CSTAR's global rank
  allocation and latency-budget pruning at REFERENCE_LATENCY_RATIOS of the largest profiled batch; a
  ratio the model cannot reach is skipped). An allocator picks exactly the layers and ranks a noisy
  or optimistic table underprices, so the fit must see such models, not only uniform ones.

Each is exported as `cstar export` deploys it and timed whole on the runtime (the same runner and
settings as the dense model); `cstar.latency_fit.fit_price` then fits op_scale, the weight streaming
and spill terms and node_ms per batch size over the dense and reference models. The fit and each model's error are written to
the table ("calibration"), so a user sees how well the table predicts models of this kind.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.latency_fit import CalibrationFit, CalibrationPoint, fit_price
from cstar.latency_table import MIB, LatencyTable

REFERENCE_RANK_FRACTIONS = (0.5, 0.25, 0.125)
REFERENCE_PRUNE_FRACTIONS = (0.5, 0.25)
REFERENCE_LATENCY_RATIOS = (2.0, 4.0, 8.0)
CALIBRATION_PASSES = 2


def tucker_reference(dense: Any, table: LatencyTable, fraction: float) -> Any:
    """`dense` with every priced candidate layer but the ends factorized at `fraction` of its widths."""
    from torch import nn

    from cstar.admm import factorize_model
    from cstar.baselines import snap_count
    from cstar.ranks import candidate_layers, first_and_last

    ranks: dict[str, Any] = {}
    for name, module in candidate_layers(dense, first_and_last(dense)):
        entry = table.layers.get(name)
        if entry is None:
            continue
        if isinstance(module, nn.Linear):
            grid = sorted({*entry.in_grid, *entry.out_grid})
            ranks[name] = (snap_count(fraction * min(entry.in_channels, entry.out_channels), grid),)
        else:
            ranks[name] = (snap_count(fraction * entry.out_channels, entry.out_grid),
                           snap_count(fraction * entry.in_channels, entry.in_grid))
    return factorize_model(dense, ranks, sweeps=0)


def pruned_reference(dense: Any, table: LatencyTable, fraction: float) -> Any | None:
    """`dense` with every channel group the ends do not touch pruned to `fraction` (grid widths); None
    when the model has no channel groups (pruning does not support it)."""
    from cstar.baselines import channel_groups, frozen_groups, keep_indices, prune_channels
    from cstar.latency import table_widths
    from cstar.ranks import first_and_last

    try:
        groups = channel_groups(dense)
    except CstarError:
        return None
    frozen = frozen_groups(groups, first_and_last(dense))
    keep = keep_indices(dense, groups, fraction, frozen, table_widths(table))
    return prune_channels(dense, keep, groups)


def allocated_references(dense: Any, table: LatencyTable, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """{name: model}: CSTAR's allocation and latency pruning at each reachable REFERENCE_LATENCY_RATIOS ratio
    of the table's prediction at its largest batch (structure only: random weights, no training)."""
    from cstar.admm import Budget
    from cstar.compress import compress_structure
    from cstar.ranks import first_and_last

    models: dict[str, Any] = {}
    for ratio in REFERENCE_LATENCY_RATIOS:
        budget = Budget(ratio, "latency", input_shape, first_and_last(dense), latency_table=table,
                        latency_batch=max(table.batch_sizes))
        for method in ("cstar", "prune"):
            with suppress(CstarError):  # a ratio this model cannot reach on this runtime is skipped
                models[f"{method}-x{ratio:g}"] = compress_structure(dense, budget, method, sweeps=0).model
    return models


def reference_models(dense: Any, table: LatencyTable, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """{name: model}: the uniform Tucker-2, uniform pruned and allocated references of `dense`."""
    models: dict[str, Any] = {}
    for fraction in REFERENCE_RANK_FRACTIONS:
        models[f"tucker2-{fraction:g}"] = tucker_reference(dense, table, fraction)
    for fraction in REFERENCE_PRUNE_FRACTIONS:
        pruned = pruned_reference(dense, table, fraction)
        if pruned is not None:
            models[f"pruned-{fraction:g}"] = pruned
    models.update(allocated_references(dense, table, input_shape))
    return models


TimeFiles = Callable[[dict[str, Path]], dict[str, dict[int, float]]]


def calibrate_table(body: dict[str, Any], dense: Any, input_shape: tuple[int, ...], dense_onnx: Path,
                    workdir: Path, time_files: TimeFiles, passes: int = CALIBRATION_PASSES) -> dict[str, Any]:
    """`body` with op_scale / weight_ms_per_mb (and rest_ms where not measured) fitted on the dense model and
    its references, timed together by `time_files` ({name: {batch: ms}} of whole runtime calls, rounds
    interleaved), and a "calibration" block.

    Pass 1 fits on the uniform references and the allocator's picks under the uncalibrated table; each
    further pass adds what the allocator picks under the table just fitted (the models `cstar compress`
    will make) and times every model again together, so the last fit sees all of them at once."""
    from export.as_deployed import export_as_deployed
    from export.forms import choose_forms

    uncalibrated = LatencyTable.from_dict(body, "the measured table")
    table = uncalibrated
    first = table.batch_sizes[0]
    built: dict[str, tuple[Any, dict[str, str]]] = {"dense": (dense, {})}
    paths = {"dense": dense_onnx}
    for index in range(max(1, passes)):
        fresh = (reference_models(dense, table, input_shape) if index == 0 else
                 {f"{name}@pass{index + 1}": model for name, model in allocated_references(dense, table, input_shape).items()})
        for name, model in fresh.items():
            forms = choose_forms(model, table, first)
            paths[name] = export_as_deployed(model, input_shape, workdir, name, forms)
            built[name] = (model, forms)
        measured = time_files(paths)
        body = _fit_into(body, uncalibrated, {name: (*built[name], measured[name]) for name in built})
        body["calibration"]["passes"] = index + 1
        table = LatencyTable.from_dict(body, "the calibrated table")
    for batch in table.batch_sizes:
        body["summary"][str(batch)].update(
            rest_ms=table.rest_ms(batch), predicted_dense_ms=table.predicted_dense_ms(batch),
            calibration_max_abs_error=body["calibration"]["by_batch"][str(batch)]["max_abs_error"])
    return body


def _fit_into(body: dict[str, Any], uncalibrated: LatencyTable,
              timed: dict[str, tuple[Any, dict[str, str], dict[int, float]]]) -> dict[str, Any]:
    """Fit the price per batch on `timed` ({name: (model, forms, {batch: measured ms})}) into `body`."""
    from cstar.latency import model_parts

    measured_rest = uncalibrated.measured_rest_ms is not None  # else fitted (and written) on every pass
    block: dict[str, Any] = {"method": "least relative squares over whole models (cstar.latency_fit)",
                             "forms_batch": uncalibrated.batch_sizes[0], "by_batch": {}}
    for batch in uncalibrated.batch_sizes:
        points = [CalibrationPoint(name, model_parts(model, uncalibrated, batch, forms), ms[batch])
                  for name, (model, forms, ms) in timed.items()]
        before = {p.name: uncalibrated.rest_ms(batch) + uncalibrated.model_price(p.parts, batch) for p in points}
        fit: CalibrationFit = fit_price(points, uncalibrated.node_ms.get(batch, 0.0),
                                        uncalibrated.rest_ms(batch) if measured_rest else None,
                                        spill_floor_mib=uncalibrated.cache_bytes / MIB)
        body["op_scale"][str(batch)] = fit.op_scale
        body["weight_ms_per_mb"][str(batch)] = fit.weight_ms_per_mb
        for key in ("stream_ms_per_mb", "spill_ms_per_mb", "spill_cache_mib"):
            body[key] = {**(body.get(key) or {}), str(batch): getattr(fit, key)}
        body["node_ms"] = {**(body.get("node_ms") or {}), str(batch): fit.node_ms}
        if not measured_rest:
            body["rest_ms"] = {**(body.get("rest_ms") or {}), str(batch): fit.rest_ms}
        block["by_batch"][str(batch)] = {**fit.to_dict(before), "measured_node_ms": uncalibrated.node_ms.get(batch, 0.0)}
    body["calibration"] = block
    return body
