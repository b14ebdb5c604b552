"""Predicted latency of a (dense, pruned or factorized) model from a `cstar profile` table, and the
latency cost model of the rank allocator.

A model's predicted latency at batch b is the table's "rest" (the measured dense model minus its
dense layers: activations, adds, pooling, the runtime call) plus, for each layer the table prices:

- a plain Conv2d / Linear (dense, or pruned to fewer channels): the layer's op at its channel counts;
- a LowRankConv2d: its fastest deploy form (dense, three-conv, merge-input, merge-output), the one
  `cstar export --latency-table` picks;
- a LowRankLinear: its two Gemms (cin -> r -> cout).

plus the spill of the whole model's weights beyond the shared cache they stay in (LatencyTable.spill_ms: not
a sum over layers). Costs between the table's channel grid points are interpolated (cstar.latency_table). The
"rest" is held at its dense value, so pruning that narrows activations is predicted a little slow.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from cstar.errors import CstarError
from cstar.flops import probe_forward
from cstar.latency_table import DEPLOY_FORMS, CostParts, LatencyTable, fastest_form, latency_batches
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.ranks import CostModel, LayerBudget, Limit, Ranks, candidate_layers

MIN_PREDICTED_MS = 1e-6  # a prediction is never <= 0 (the rest can be negative: micro-graphs run cold)


def module_form_parts(table: LatencyTable, name: str, module: nn.Module, batch: int,
                      form: str | None = None, form_batch: int | None = None) -> tuple[str, CostParts] | None:
    """(deploy form, cost parts at `batch`) of one module as the table prices it: a Tucker-2 conv in `form`, or
    in its fastest form by the table at `form_batch` (default `batch`: the form export picks there) when None;
    None for modules the table does not price."""
    if isinstance(module, LowRankConv2d):
        r_out, r_in = module.ranks

        def parts(name_of_form: str, at: int) -> CostParts:
            return table.form_parts(name, name_of_form, None if name_of_form == "dense" else (r_in, r_out), at,
                                    module.in_channels, module.out_channels)

        if form is None:
            at = batch if form_batch is None else form_batch
            form = fastest_form({f: table.price(parts(f, at), at) for f in DEPLOY_FORMS})
        return form, parts(form, batch)
    if isinstance(module, LowRankLinear):
        ranks = (module.rank, module.rank)
        return "three-conv", table.form_parts(name, "three-conv", ranks, batch, module.in_features, module.out_features)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        return "dense", table.form_parts(name, "dense", None, batch, module.in_channels, module.out_channels)
    if isinstance(module, nn.Linear):
        return "dense", table.form_parts(name, "dense", None, batch, module.in_features, module.out_features)
    return None


def module_form_ms(table: LatencyTable, name: str, module: nn.Module, batch: int) -> tuple[str, float] | None:
    """(deploy form, ms) of one module as the table prices it; None for modules the table does not price."""
    priced = module_form_parts(table, name, module, batch)
    return None if priced is None else (priced[0], table.price(priced[1], batch))


def layer_parts(model: nn.Module, table: LatencyTable, batch: int, forms: dict[str, str] | None = None,
                form_batch: int | None = None) -> dict[str, tuple[str, CostParts]]:
    """{layer path: (deploy form, cost parts)} for every layer the table prices (Tucker-2 layers in `forms`
    where given, else their fastest form at `form_batch`, default `batch`).

    CstarError when the model has a conv/linear layer the table lacks, or lacks a layer the table has
    (the table was profiled on another model).
    """
    table.check_batch(batch)
    known = set(table.layer_names())
    priced: dict[str, tuple[str, CostParts]] = {}
    missing: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        if not isinstance(module, (LowRankConv2d, LowRankLinear, nn.Conv2d, nn.Linear)):
            continue
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            continue  # grouped / depthwise convs are not candidates: part of the measured rest
        if name not in known:
            missing.append(name)
            continue
        cost = module_form_parts(table, name, module, batch, (forms or {}).get(name), form_batch)
        if cost is not None:
            priced[name] = cost
    if missing:
        raise table.missing_error(missing)
    absent = [name for name in table.layer_names() if name not in priced]
    if absent:
        raise CstarError(f"the model has no layer {', '.join(absent[:5])} that the latency table prices "
                         f"(profiled on model '{table.model.get('name', '?')}')",
                         "use the table profiled on this model's dense source (cstar profile --model-from DIR)")
    return priced


def model_parts(model: nn.Module, table: LatencyTable, batch: int, forms: dict[str, str] | None = None,
                form_batch: int | None = None) -> CostParts:
    """The summed cost parts of every priced layer (the prediction is rest + table.model_price of them)."""
    total = CostParts()
    for _, parts in layer_parts(model, table, batch, forms, form_batch).values():
        total = total + parts
    return total


def layer_latencies(model: nn.Module, table: LatencyTable, batch: int,
                    form_batch: int | None = None) -> dict[str, tuple[str, float]]:
    """{layer path: (deploy form, predicted ms)} for every layer the table prices (see layer_parts)."""
    return {name: (form, table.price(parts, batch))
            for name, (form, parts) in layer_parts(model, table, batch, form_batch=form_batch).items()}


def predicted_latency_ms(model: nn.Module, table: LatencyTable, batch: int, form_batch: int | None = None) -> float:
    """Predicted ms of one runtime call of `model` at `batch`: the table's rest + each layer in its fastest form
    at `form_batch` (default `batch`; export picks the forms at the headline batch of a multi-batch budget) + the
    spill of its weights (LatencyTable.model_price)."""
    total = table.rest_ms(batch) + table.model_price(model_parts(model, table, batch, form_batch=form_batch), batch)
    return max(total, MIN_PREDICTED_MS)


def predicted_spill_ms(model: nn.Module, table: LatencyTable, batch: int, form_batch: int | None = None) -> float:
    """The part of `predicted_latency_ms` that is the spill of the model's weights beyond the shared cache."""
    return table.spill_ms(model_parts(model, table, batch, form_batch=form_batch).weight_mib, batch)


def is_table_dense(model: nn.Module, table: LatencyTable) -> bool:
    """True when `model` is the table's own dense model in structure: no factorized layer, and every layer the
    table prices at the width it was profiled at."""
    for name, module in model.named_modules():
        if isinstance(module, (LowRankConv2d, LowRankLinear)):
            return False
        entry = table.layers.get(name)
        if entry is None:
            continue
        if isinstance(module, nn.Conv2d):
            widths = (module.in_channels, module.out_channels)
        elif isinstance(module, nn.Linear):
            widths = (module.in_features, module.out_features)
        else:
            continue
        if widths != (entry.in_channels, entry.out_channels):
            return False
    return True


def reference_latency_ms(model: nn.Module, table: LatencyTable, batch: int, form_batch: int | None = None) -> float:
    """The latency a ratio divides: the table's MEASURED dense latency when `model` is its dense model
    (LatencyTable.dense_reference_ms), else the prediction. A budget is then measured dense / R, spent on
    predicted compressed latencies."""
    if is_table_dense(model, table):
        return table.dense_reference_ms(batch)
    return predicted_latency_ms(model, table, batch, form_batch)


def latency_cost_model(table: LatencyTable, batch: int, form_batch: int | None = None, spill: bool = False) -> CostModel:
    """The allocator's cost model: a candidate layer's ms at `batch`, dense or in its fastest factorized form
    (fastest at `form_batch`, default `batch`); with `spill`, plus the table's spill rate x its weight MiB (the
    spill budget's linear side, see latency_limits).

    LayerBudget ranks are (r_out, r_in) (Linear: (r,)); the table takes (r_in, r_out). The dense layer is
    priced at the LayerBudget's channel counts (a pruned model's narrower layers included). Ranks are
    restricted to the table's measured channel grid: between grid points latency is not known (a channel
    count off the SIMD width can fall off the fast kernel path).
    """
    table.check_batch(batch)
    pick = table.check_batch(batch if form_batch is None else form_batch)
    rate = table.spill_ms_per_mb.get(batch, 0.0) if spill else 0.0

    def parts(layer: LayerBudget, ranks: Ranks | None) -> CostParts:
        cin, cout = layer.in_channels, layer.out_channels
        if ranks is None:
            return table.form_parts(layer.name, "dense", None, batch, cin, cout)
        if layer.linear:
            (rank,) = ranks
            return table.form_parts(layer.name, "three-conv", (rank, rank), batch, cin, cout)
        r_out, r_in = ranks
        form = table.fastest_form(layer.name, (r_in, r_out), pick, cin, cout)[0]
        return table.form_parts(layer.name, form, (r_in, r_out), batch, cin, cout)

    def cost(layer: LayerBudget, ranks: Ranks | None) -> float:
        priced = parts(layer, ranks)
        return table.price(priced, batch) + rate * priced.weight_mib

    def grid(layer: LayerBudget) -> tuple[list[int], ...]:
        entry = table.layer(layer.name)
        if layer.linear:
            return (sorted({*entry.in_grid, *entry.out_grid}),)
        return list(entry.out_grid), list(entry.in_grid)  # (r_out, r_in)

    return CostModel("latency", cost, monotone=False, rank_grid=grid)


def latency_limits(model: nn.Module, table: LatencyTable, batches: tuple[int, ...]) -> tuple[Limit, ...]:
    """The allocator's budgets of a latency budget at `batches` (cstar.ranks.Limit: cost model, `model`'s total by
    it, the total the ratio divides), each layer in the form fastest at the first batch.

    Per batch: the layers' summed price (rest included) <= target, and where the table has a spill, also
    summed (price + spill rate x weight MiB) + rest - spill rate x spill cache <= target. Both hold exactly when
    rest + price + spill rate x max(0, weight MiB - spill cache) <= target: max(0, x) <= y is 0 <= y and x <= y,
    so the allocator's linear budgets meet the whole-model prediction."""
    limits: list[Limit] = []
    for batch in batches:
        reference = reference_latency_ms(model, table, batch, batches[0])
        summed = model_parts(model, table, batch, form_batch=batches[0])
        additive = table.rest_ms(batch) + table.price(summed, batch)
        limits.append((latency_cost_model(table, batch, batches[0]), additive, reference))
        rate = table.spill_ms_per_mb.get(batch, 0.0)
        if rate > 0:
            spilled = additive + rate * (summed.weight_mib - table.spill_cache_mib.get(batch, 0.0))
            limits.append((latency_cost_model(table, batch, batches[0], spill=True), spilled, reference))
    return tuple(limits)


def table_widths(table: LatencyTable) -> Callable[[Any, int], list[int]]:
    """Kept-channel counts a pruned channel group may take: the table's grid of that width (cstar.baselines.
    WidthOptions). A group's width is priced on the out_grid of its producing layers and the in_grid of its
    consuming ones; both are the grid of the same full width. A group no priced layer touches takes any count."""

    def options(group: Any, width: int) -> list[int]:
        for name in group.producers:
            entry = table.layers.get(name)
            if entry is not None and entry.out_channels == width:
                return list(entry.out_grid)
        for name in group.consumers:
            entry = table.layers.get(name)
            if entry is not None and entry.in_channels == width:
                return list(entry.in_grid)
        return list(range(1, width + 1))

    return options


def latency_record(table: LatencyTable, batch: int | tuple[int, ...], dense: nn.Module,
                   compressed: nn.Module) -> dict[str, Any]:
    """Manifest block: the table's provenance, the dense model's reference (measured) and predicted latency, the
    compressed model's predicted latency and the predicted speedup (reference / predicted) at the (headline)
    batch, and at every budget batch of a multi-batch budget (`by_batch`; forms picked at the headline)."""
    batches = latency_batches(batch)
    headline = batches[0]

    def at(size: int) -> dict[str, float]:
        reference = reference_latency_ms(dense, table, size, headline)
        predicted = predicted_latency_ms(compressed, table, size, headline)
        return {"dense_ms": reference, "predicted_dense_ms": predicted_latency_ms(dense, table, size, headline),
                "predicted_ms": predicted, "predicted_speedup": reference / predicted,
                "predicted_spill_ms": predicted_spill_ms(compressed, table, size, headline)}

    forms = layer_latencies(compressed, table, headline)
    record: dict[str, Any] = {
        "table": table.describe(),
        "batch": headline,
        **at(headline),
        "layers": {name: {"form": form, "ms": round(ms, 5)} for name, (form, ms) in forms.items()},
    }
    if len(batches) > 1:
        record["batches"] = list(batches)
        record["by_batch"] = {str(size): at(size) for size in batches}
    return record


# ------------------------------------------------------------------------------------------ profiling


def _explicit_padding(conv: nn.Conv2d) -> list[int]:
    """[top, left, bottom, right] zero padding of `conv` (string paddings resolved as torch does)."""
    if not isinstance(conv.padding, str):
        ph, pw = (int(p) for p in conv.padding)
        return [ph, pw, ph, pw]
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    totals = [conv.dilation[i] * (conv.kernel_size[i] - 1) for i in range(2)]  # 'same' at stride 1
    return [totals[0] // 2, totals[1] // 2, totals[0] - totals[0] // 2, totals[1] - totals[1] // 2]


def candidate_geometry(model: nn.Module, input_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Plain-data geometry of every candidate layer (cstar.ranks.candidate_layers, the ends included),
    with input/output spatial sizes from one forward pass: what `cstar profile` times on the runtime."""
    layers = candidate_layers(model)
    sizes: dict[str, tuple[tuple[int, int], tuple[int, int]]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if inputs[0].ndim == 4:
                sizes[name] = ((int(inputs[0].shape[-2]), int(inputs[0].shape[-1])),
                               (int(output.shape[-2]), int(output.shape[-1])))
        return record

    probe_forward(model, input_shape, [(module, hook(name)) for name, module in layers])
    return [_geometry(name, module, sizes.get(name, ((1, 1), (1, 1)))) for name, module in layers]


def _geometry(name: str, module: nn.Module, hw: tuple[tuple[int, int], tuple[int, int]]) -> dict[str, Any]:
    if isinstance(module, nn.Linear):
        return {"name": name, "type": "linear", "in_channels": module.in_features,
                "out_channels": module.out_features, "kernel": [1, 1], "stride": [1, 1], "padding": [0, 0, 0, 0],
                "dilation": [1, 1], "input_hw": [1, 1], "output_hw": [1, 1]}
    assert isinstance(module, nn.Conv2d)
    return {"name": name, "type": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
            "kernel": list(module.kernel_size), "stride": list(module.stride),
            "padding": _explicit_padding(module), "dilation": list(module.dilation),
            "input_hw": list(hw[0]), "output_hw": list(hw[1])}
