"""Latency tables (cstar.latency_table), predicted latency (cstar.latency) and the latency budget of the allocator."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from cstar.admm import Budget, allocate_for, factorize_model
from cstar.checkpoint import save_checkpoint, set_submodule
from cstar.cli import main as cli_main
from cstar.data import DatasetSpec
from cstar.errors import CstarError, UnreachableBudget
from cstar.latency import (
    candidate_geometry,
    latency_cost_model,
    layer_latencies,
    predicted_latency_ms,
    predicted_spill_ms,
)
from cstar.latency_table import TABLE_KIND, CostParts, LatencyTable, channel_grid, interpolate
from cstar.lowrank import LowRankConv2d
from cstar.models import build_model
from cstar.ranks import LayerBudget, allocate, first_and_last, rank_options

SPEC = DatasetSpec("digits", (1, 16, 16), tuple(str(i) for i in range(10)), (0.5,), (0.5,), 0.2)
CPU = "Test CPU 9000"
OpCost = Callable[[dict[str, Any], str, int, int], float]


def macs_cost(geometry: dict[str, Any], op: str, rows: int, cols: int) -> float:
    """A synthetic runtime: 2 us per op plus 1e-7 ms per multiply-accumulate."""
    kh, kw = geometry["kernel"]
    hw = geometry["output_hw"] if op != "in_factor" else geometry["input_hw"]
    taps = kh * kw if op == "conv" else 1
    return 0.002 + 1e-7 * rows * cols * taps * hw[0] * hw[1]


def synthetic_table(geometries: list[dict[str, Any]], cost: OpCost = macs_cost, batches: tuple[int, ...] = (1,),
                    model_ms: float | None = None, backend: str = "ort-cpu", threads: int = 1) -> dict[str, Any]:
    """A table body as `cstar profile` writes it, from layer geometry and a cost function (ms at batch 1)."""
    layers = {}
    for g in geometries:
        in_grid, out_grid = channel_grid(g["in_channels"]), channel_grid(g["out_channels"])
        axes = {"conv": (in_grid, out_grid), "in_factor": (in_grid, in_grid), "out_factor": (out_grid, out_grid)}
        ms = {str(b): {op: [[b * cost(g, op, i, j) for j in cols] for i in rows] for op, (rows, cols) in axes.items()}
              for b in batches}
        layers[g["name"]] = {**{k: v for k, v in g.items() if k != "name"}, "in_grid": in_grid, "out_grid": out_grid,
                             "ms": ms}
    dense = sum(cost(g, "conv", g["in_channels"], g["out_channels"]) for g in geometries)
    return {"kind": TABLE_KIND, "schema_version": 1, "backend": backend,
            "runtime": {"name": "onnxruntime", "version": "0"}, "machine": {"cpu_model": CPU}, "threads": threads,
            "batch_sizes": list(batches), "model": {"name": "small-resnet", "input_shape": list(SPEC.input_shape)},
            "overhead_ms": {str(b): 0.005 for b in batches},
            "dense_model_ms": {str(b): b * (model_ms if model_ms is not None else dense * 1.1) for b in batches},
            "layers": layers}


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("small-resnet", SPEC, width=8).eval()


def write(tmp_path: Path, body: Any, name: str = "table.json") -> Path:
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


def geometry(name: str, cin: int, cout: int, hw: int = 8, kernel: int = 3) -> dict[str, Any]:
    pad = kernel // 2
    return {"name": name, "type": "conv", "in_channels": cin, "out_channels": cout, "kernel": [kernel, kernel],
            "stride": [1, 1], "padding": [pad] * 4, "dilation": [1, 1], "input_hw": [hw, hw], "output_hw": [hw, hw]}


def layer_budget(name: str, cin: int, cout: int, hw: int = 8, seed: int = 0) -> LayerBudget:
    """A 3x3 candidate layer with decaying spectra (so that rank buys energy)."""
    generator = torch.Generator().manual_seed(seed)

    def spectrum(n: int) -> torch.Tensor:
        values = torch.exp(-torch.arange(n, dtype=torch.float64) / (n / 6)) * (1 + 0.1 * torch.rand(n, generator=generator,
                                                                                                       dtype=torch.float64))
        values = values.sort(descending=True).values
        return values / values.sum()

    return LayerBudget(name, cout, cin, 9, False, True, hw * hw, hw * hw, (spectrum(cout), spectrum(cin)))


# ------------------------------------------------------------------------------------------ interpolation


def test_grid_has_small_ranks_multiples_of_16_and_the_full_width() -> None:
    assert channel_grid(64) == [4, 8, 16, 24, 32, 48, 64]
    assert channel_grid(100)[-1] == 100 and 96 in channel_grid(100)
    assert channel_grid(3) == [3]
    capped = channel_grid(512, cap=5)
    assert len(capped) == 5 and capped[0] == 4 and capped[-1] == 512


def test_interpolation_is_exact_on_grid_points_linear_between_and_flat_beyond() -> None:
    rows, cols = [4, 8, 16], [8, 24]
    values = np.array([[1.0, 2.0], [3.0, 7.0], [5.0, 4.0]])
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            assert interpolate(rows, cols, values, r, c) == values[i, j]
    assert interpolate(rows, cols, values, 6, 8) == pytest.approx(2.0)  # halfway 4 -> 8
    assert interpolate(rows, cols, values, 8, 12) == pytest.approx(3.0 + 0.25 * 4.0)  # a quarter 8 -> 24
    assert interpolate(rows, cols, values, 12, 16) == pytest.approx(0.5 * (5.0 + 4.5))  # bilinear: rows 8, 16 at col 16
    assert interpolate(rows, cols, values, 1, 2) == 1.0 and interpolate(rows, cols, values, 99, 99) == 4.0


def test_table_prices_forms_from_its_ops(tmp_path: Path) -> None:
    body = synthetic_table([geometry("a", 32, 64)], batches=(1, 4))
    table = LatencyTable.load(write(tmp_path, body))
    conv, infac, outfac = (np.array(body["layers"]["a"]["ms"]["4"][op]) for op in ("conv", "in_factor", "out_factor"))
    in_grid, out_grid = body["layers"]["a"]["in_grid"], body["layers"]["a"]["out_grid"]
    i16, o32, i_full, o_full = in_grid.index(16), out_grid.index(32), in_grid.index(32), out_grid.index(64)
    assert table.form_ms("a", "dense", None, 4) == pytest.approx(conv[i_full, o_full])
    three = infac[i_full, i16] + conv[i16, o32] + outfac[o32, o_full]
    assert table.form_ms("a", "three-conv", (16, 32), 4) == pytest.approx(three)
    assert table.form_ms("a", "merge-input", (16, 32), 4) == pytest.approx(conv[i_full, o32] + outfac[o32, o_full])
    assert table.form_ms("a", "merge-output", (16, 32), 4) == pytest.approx(infac[i_full, i16] + conv[i16, o_full])
    form, ms = table.fastest_form("a", (16, 32), 4)
    assert ms == pytest.approx(min(table.form_ms("a", f, (16, 32), 4) for f in ("three-conv", "merge-input",
                                                                                 "merge-output")))
    assert form in ("three-conv", "merge-input", "merge-output")
    assert table.rest_ms(1) == pytest.approx(table.model_ms(1) - table.dense_ms("a", 1))


def test_weight_streaming_adds_to_ops_beyond_the_cache(tmp_path: Path) -> None:
    body = synthetic_table([geometry("a", 256, 256)])
    plain = LatencyTable.from_dict(body)
    body.update(cache_bytes=1 << 20, weight_ms_per_mb={"1": 0.5})
    streamed = LatencyTable.from_dict(body)
    dense_bytes = 4 * 256 * 256 * 9
    extra = 0.5 * (dense_bytes - (1 << 20)) / (1 << 20)
    assert streamed.dense_ms("a", 1) == pytest.approx(plain.dense_ms("a", 1) + extra)
    assert streamed.conv_ms("a", 16, 16, 1) == pytest.approx(plain.conv_ms("a", 16, 16, 1))  # fits in cache


# ------------------------------------------------------------------------------------------ validation


def _one_error(path: Path, match: str) -> CstarError:
    with pytest.raises(CstarError, match=match) as info:
        LatencyTable.load(path)
    assert info.value.hint, "every table error carries a fix"
    return info.value


def test_bad_tables_are_one_clear_error_each(tmp_path: Path) -> None:
    good = synthetic_table([geometry("a", 16, 16)])
    _one_error(tmp_path / "missing.json", "does not exist")
    _one_error(write(tmp_path, "{not json", "broken.json"), "not readable JSON")
    _one_error(write(tmp_path, {**good, "kind": "cstar-bench"}, "kind.json"), "not a cstar latency table")
    _one_error(write(tmp_path, {**good, "schema_version": 9}, "schema.json"), "schema_version")
    _one_error(write(tmp_path, {**good, "layers": {}}, "empty.json"), "has no layers")
    nan = json.loads(json.dumps(good))
    nan["layers"]["a"]["ms"]["1"]["conv"][0][0] = float("nan")
    error = _one_error(write(tmp_path, nan, "nan.json"), "finite")
    assert "layer 'a'" in error.message and "conv" in error.message
    negative = json.loads(json.dumps(good))
    negative["layers"]["a"]["ms"]["1"]["out_factor"][1][0] = -0.5
    _one_error(write(tmp_path, negative, "negative.json"), "-0.5")
    _one_error(write(tmp_path, {**good, "dense_model_ms": {"1": 0}}, "zero.json"), "dense_model_ms")
    table = LatencyTable.load(write(tmp_path, good))
    with pytest.raises(CstarError, match="has no layer conv9") as info:
        table.conv_ms("conv9", 4, 4, 1)
    assert "cstar profile" in (info.value.hint or "")
    with pytest.raises(CstarError, match="no batch size 8") as info:
        table.conv_ms("a", 4, 4, 8)
    assert "--batch-sizes" in (info.value.hint or "")


def test_check_matches_warns_on_another_backend_threads_or_cpu(tmp_path: Path) -> None:
    table = LatencyTable.load(write(tmp_path, synthetic_table([geometry("a", 16, 16)])))
    assert table.check_matches("ort-cpu", 1, cpu=CPU) == []
    assert table.check_matches("ort-cpu", None, cpu=CPU) == []
    (backend,) = table.check_matches("openvino-cpu", 1, cpu=CPU)
    assert "'ort-cpu'" in backend and "openvino-cpu" in backend
    (threads,) = table.check_matches("ort-cpu", 4, cpu=CPU)
    assert "1 thread" in threads and "--threads 4" in threads
    (cpu,) = table.check_matches("ort-cpu", 1, cpu="Other CPU")
    assert CPU in cpu and "Other CPU" in cpu


# ------------------------------------------------------------------------------------------ allocation


def _slack_bound(layers: list[LayerBudget], ranks: dict[str, Any], cost: Any, step: int) -> float:
    """The most one more grid step on one mode (or going dense) of any factorized layer would add."""
    worst = 0.0
    for layer in layers:
        current = ranks[layer.name]
        if current is None:
            continue
        for mode, allowed in enumerate(rank_options(layer, step, cost)):
            assert current[mode] in allowed  # ranks sit on the table's measured grid
            higher = [r for r in allowed if r > current[mode]]
            if higher:
                bigger = tuple(higher[0] if m == mode else r for m, r in enumerate(current))
                worst = max(worst, min(cost(layer, bigger), cost(layer, None)) - cost(layer, current))
    return worst


@pytest.mark.parametrize(("ratio", "step"), [(2.0, 1), (4.0, 1), (3.0, 8)])
def test_allocator_meets_a_latency_budget_within_one_grid_step(tmp_path: Path, ratio: float, step: int) -> None:
    shapes = [("a", 32, 32, 16), ("b", 32, 64, 8), ("c", 64, 64, 8), ("d", 64, 128, 4)]
    table = LatencyTable.from_dict(synthetic_table([geometry(n, i, o, hw) for n, i, o, hw in shapes]))
    layers = [layer_budget(n, i, o, hw, seed) for seed, (n, i, o, hw) in enumerate(shapes)]
    model = latency_cost_model(table, 1)
    dense_total = table.model_ms(1)
    allocation = allocate(layers, dense_total, ratio, "latency", step=step, cost_model=model)
    target = dense_total / ratio
    planned = table.rest_ms(1) + sum(model(layer, allocation.ranks[layer.name]) for layer in layers)
    assert allocation.by == "latency" and allocation.total_cost == pytest.approx(planned)
    assert planned <= target + 1e-12
    assert target - planned <= _slack_bound(layers, allocation.ranks, model, step) + 1e-12
    assert any(r is not None for r in allocation.ranks.values())
    if step > 1:
        for layer in layers:
            ranks = allocation.ranks[layer.name]
            assert ranks is None or all(r % step == 0 or r == f for r, f in zip(ranks, layer.full_ranks, strict=True))


def test_a_layer_whose_factorized_form_is_slower_stays_dense() -> None:
    def cost(g: dict[str, Any], op: str, rows: int, cols: int) -> float:
        slow_factors = g["name"] == "slow" and op != "conv"
        return 5.0 if slow_factors else macs_cost(g, op, rows, cols)

    geometries = [geometry("fast", 64, 64), geometry("slow", 64, 64)]
    table = LatencyTable.from_dict(synthetic_table(geometries, cost))
    layers = [layer_budget("fast", 64, 64, seed=1), layer_budget("slow", 64, 64, seed=2)]
    model = latency_cost_model(table, 1)
    allocation = allocate(layers, table.model_ms(1), 1.5, "latency", cost_model=model)
    assert allocation.ranks["slow"] is None
    assert allocation.ranks["fast"] is not None
    assert allocation.total_cost <= table.model_ms(1) / 1.5


def test_unreachable_latency_ratio_names_the_best_reachable_one() -> None:
    table = LatencyTable.from_dict(synthetic_table([geometry("a", 64, 64)], model_ms=None))
    layers = [layer_budget("a", 64, 64)]
    model = latency_cost_model(table, 1)
    fastest = min(model(layers[0], (r_out, r_in)) for r_out in channel_grid(64) for r_in in channel_grid(64))
    best = table.model_ms(1) / (table.rest_ms(1) + fastest)
    with pytest.raises(CstarError, match=rf"at most {best:.2f}x") as info:
        allocate(layers, table.model_ms(1), 1000.0, "latency", cost_model=model)
    assert f"--ratio {math.floor(best * 100) / 100:g}" in (info.value.hint or "")
    assert isinstance(info.value, UnreachableBudget) and info.value.best_ratio == pytest.approx(best, rel=1e-9)


def test_latency_budget_needs_a_table() -> None:
    with pytest.raises(CstarError, match="latency table"):
        allocate([layer_budget("a", 8, 8)], 1.0, 2.0, "latency")


# ------------------------------------------------------------------------------------------ prediction


def test_predicted_latency_of_dense_pruned_and_factorized_models(tmp_path: Path) -> None:
    model = tiny_model()
    table = LatencyTable.from_dict(synthetic_table(candidate_geometry(model, SPEC.input_shape)))
    assert predicted_latency_ms(model, table, 1) == pytest.approx(table.model_ms(1))
    name = "net.layer2.0.conv2"  # 16 -> 16, 3x3
    conv = model.get_submodule(name)
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels == 16
    pruned = factorize_model(model, {})
    set_submodule(pruned, name, nn.Conv2d(12, 10, 3, padding=1, bias=False))
    expected = table.model_ms(1) - table.dense_ms(name, 1) + table.conv_ms(name, 12, 10, 1)
    assert predicted_latency_ms(pruned, table, 1) == pytest.approx(expected)
    factorized = factorize_model(model, {name: (8, 4)}, sweeps=1)
    layer = factorized.get_submodule(name)
    assert isinstance(layer, LowRankConv2d)
    form, ms = layer_latencies(factorized, table, 1)[name]
    forms = {f: table.form_ms(name, f, None if f == "dense" else (4, 8), 1)
             for f in ("dense", "three-conv", "merge-input", "merge-output")}
    assert ms == pytest.approx(min(forms.values())) and forms[form] == pytest.approx(ms)
    assert predicted_latency_ms(factorized, table, 1) == pytest.approx(table.model_ms(1) - table.dense_ms(name, 1) + ms)


def test_prediction_refuses_a_table_of_another_model() -> None:
    model = tiny_model()
    geometries = candidate_geometry(model, SPEC.input_shape)
    table = LatencyTable.from_dict(synthetic_table(geometries[:-2]))
    with pytest.raises(CstarError, match="has no layer") as info:
        predicted_latency_ms(model, table, 1)
    assert "cstar profile" in (info.value.hint or "")
    extra = LatencyTable.from_dict(synthetic_table([*geometries, geometry("head.extra", 8, 8)]))
    with pytest.raises(CstarError, match="head.extra"):
        predicted_latency_ms(model, extra, 1)


def test_allocate_for_a_latency_budget_on_a_model(tmp_path: Path) -> None:
    model = tiny_model()
    table = LatencyTable.from_dict(synthetic_table(candidate_geometry(model, SPEC.input_shape)))
    budget = Budget(1.4, "latency", SPEC.input_shape, first_and_last(model), latency_table=table)
    allocation = allocate_for(model, budget)
    compressed = factorize_model(model, allocation.ranks, sweeps=1)
    assert any(isinstance(m, LowRankConv2d) for m in compressed.modules())
    assert predicted_latency_ms(compressed, table, 1) <= table.model_ms(1) / 1.4 + 1e-9
    assert predicted_latency_ms(compressed, table, 1) == pytest.approx(allocation.total_cost)


# ------------------------------------------------------------------------------------------ compress


@pytest.fixture()
def random_dense_dir(tmp_path: Path) -> Path:
    """A train-stage directory of small-resnet (width 8) with random weights (enough for the early checks)."""
    out = tmp_path / "dense"
    save_checkpoint(out, tiny_model(), "train", "small-resnet", {"width": 8}, SPEC,
                    {"eps": 0.2, "norm": "linf", "metrics": {}, "config": {}})
    return out


def _compress_cli(dense: Path, table: Path, out: Path, *extra: str, ratio: float = 1.4) -> int:
    return cli_main(["compress", "--from", str(dense), "--out", str(out), "--ratio", str(ratio), "--by", "latency",
                     "--latency-table", str(table), "--admm-epochs", "0", "--finetune-epochs", "0", "--quiet", *extra])


def test_compress_refuses_bad_tables_with_one_error_and_fix(random_dense_dir: Path, tmp_path: Path, capsys) -> None:
    model = tiny_model()
    geometries = candidate_geometry(model, SPEC.input_shape)
    nan = synthetic_table(geometries)
    nan["layers"][geometries[2]["name"]]["ms"]["1"]["in_factor"][0][1] = float("nan")
    cases = {
        "missing": (tmp_path / "nope.json", "does not exist"),
        "nan": (write(tmp_path, nan, "nan.json"), "finite"),
        "other model": (write(tmp_path, synthetic_table(geometries[:3]), "other.json"), "has no layer"),
        "backend": (write(tmp_path, synthetic_table(geometries), "good.json"), "measured on backend 'ort-cpu'"),
    }
    for case, (path, message) in cases.items():
        extra = ("--latency-backend", "openvino-cpu") if case == "backend" else ()
        assert _compress_cli(random_dense_dir, path, tmp_path / case, *extra) == 2, case
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and err.count("fix:") == 1 and message in err, (case, err)
        assert not (tmp_path / case / "manifest.json").exists()
    with pytest.raises(CstarError, match="needs a latency table"):
        from cstar.compress import CompressConfig

        CompressConfig(by="latency").validate()


def test_compress_by_latency_records_the_table_and_predicted_latency(robust_digits_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:
    from cstar.manifest import sha256_file

    model = tiny_model()
    body = synthetic_table(candidate_geometry(model, SPEC.input_shape), batches=(1, 8), threads=2)
    body["machine"]["cpu_model"] = "Some Other CPU"
    table = write(tmp_path, body)
    code = _compress_cli(robust_digits_dir, table, tmp_path / "c", "--latency-batch", "8", "--latency-threads", "1",
                         "--eval-suite", "apgd", "--eval-steps", "1", "--eval-limit", "20")
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "warning:" in captured.err and "thread" in captured.err and "Some Other CPU" in captured.err
    assert "predicted latency x" in captured.out
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    latency = manifest["latency"]
    assert latency["table"]["sha256"] == sha256_file(table) and latency["table"]["backend"] == "ort-cpu"
    assert latency["batch"] == 8
    assert latency["predicted_dense_ms"] == pytest.approx(8 * body["dense_model_ms"]["1"], rel=1e-6)
    assert latency["dense_ms"] == pytest.approx(body["dense_model_ms"]["8"])  # measured: what the ratio divides
    assert latency["predicted_speedup"] == pytest.approx(latency["dense_ms"] / latency["predicted_ms"])
    assert latency["predicted_speedup"] >= 1.4 - 1e-9
    assert manifest["compression"]["latency_ratio"] >= 1.4 - 1e-9 and manifest["compression"]["by"] == "latency"
    assert any(entry["kind"] == "tucker2" for entry in manifest["ranks"].values())
    assert manifest["allocation"]["planned_cost"] == pytest.approx(latency["predicted_ms"])
    assert latency["predicted_spill_ms"] == 0.0  # the synthetic table has no spill


def test_prune_and_hybrid_meet_a_latency_budget_priced_by_the_same_table() -> None:
    """Pruned layers are dense convs with fewer channels: the table prices them as it prices Tucker cores."""
    from cstar.baselines import prune_to_budget
    from cstar.hybrid import budget_cost, hybrid_compress

    model = tiny_model()
    table = LatencyTable.from_dict(synthetic_table(candidate_geometry(model, SPEC.input_shape)))
    budget = Budget(1.3, "latency", SPEC.input_shape, first_and_last(model), latency_table=table)
    cost = budget_cost(budget)
    assert cost(model) == pytest.approx(predicted_latency_ms(model, table, 1))
    pruned = prune_to_budget(model, SPEC.input_shape, 1.3, "latency", keep_dense=first_and_last(model), cost=cost)
    predicted = predicted_latency_ms(pruned.model, table, 1)
    assert predicted <= cost(model) / 1.3 + 1e-9 and predicted < cost(model)
    assert pruned.fraction < 1.0
    hybrid = hybrid_compress(model, budget, share=0.5, cost=cost)
    assert any(isinstance(m, LowRankConv2d) for m in hybrid.model.modules())
    assert predicted_latency_ms(hybrid.model, table, 1) <= cost(model) / 1.3 + 1e-9


def test_each_extra_node_of_a_deploy_form_is_charged_node_ms() -> None:
    """Kernel-timed tables leave out per-node dispatch; three-conv runs two convs more than dense, merges one."""
    model = tiny_model()
    body = synthetic_table(candidate_geometry(model, SPEC.input_shape))
    plain = LatencyTable.from_dict(body)
    charged = LatencyTable.from_dict({**body, "node_ms": {"1": 0.01}})
    name = next(n for n in plain.layer_names() if plain.layer(n).type == "conv")
    extra = {"dense": 0, "three-conv": 2, "merge-input": 1, "merge-output": 1}
    for form, nodes in extra.items():
        ranks = None if form == "dense" else (4, 4)
        assert charged.form_ms(name, form, ranks, 1) == pytest.approx(plain.form_ms(name, form, ranks, 1) + 0.01 * nodes)
    assert charged.to_dict()["node_ms"] == {"1": 0.01}
    assert plain.node_ms == {1: 0.0}  # older tables without the key read as no charge


# ------------------------------------------------------------------------------------------ spill


def spilling_table(model: nn.Module, share: float = 0.2, cache: float = 0.1) -> LatencyTable:
    """A synthetic table of `model` with a spill: the dense model's weights beyond `cache` of them cost `share` of
    its latency."""
    body = synthetic_table(candidate_geometry(model, SPEC.input_shape))
    plain = LatencyTable.from_dict(body)
    dense_mib = sum(plain.op_parts(n, "conv", e.in_channels, e.out_channels, 1).weight_mib for n, e in plain.layers.items())
    rate = share * plain.model_ms(1) / ((1 - cache) * dense_mib)
    return LatencyTable.from_dict({**body, "spill_ms_per_mb": {"1": rate}, "spill_cache_mib": {"1": cache * dense_mib},
                                   "stream_ms_per_mb": {"1": 0.0}})


def test_spill_is_paid_by_the_whole_model_beyond_its_cache_only() -> None:
    """A layer's price has no spill (it is not a sum over layers); the model's price adds rate x MiB beyond the
    cache, and nothing below it; the table keeps the coefficients, older tables read as none."""
    model = tiny_model()
    table = spilling_table(model)
    rate, cache = table.spill_ms_per_mb[1], table.spill_cache_mib[1]
    parts = table.op_parts("net.layer2.0.conv2", "conv", 16, 16, 1)
    assert parts.weight_mib == pytest.approx(16 * 16 * 9 * 4 / 2**20)
    assert table.price(parts, 1) == pytest.approx(table.form_ms("net.layer2.0.conv2", "dense", None, 1))
    small = CostParts(1.0, 0.0, 0, 0.5 * cache)
    assert table.model_price(small, 1) == pytest.approx(table.price(small, 1))  # below the cache
    big = CostParts(1.0, 0.0, 0, cache + 2.0)
    assert table.model_price(big, 1) == pytest.approx(table.price(big, 1) + 2.0 * rate)
    assert table.spill_ms(cache, 1) == 0.0
    again = LatencyTable.from_dict(table.to_dict())
    assert (again.spill_ms_per_mb, again.spill_cache_mib) == (table.spill_ms_per_mb, table.spill_cache_mib)
    assert LatencyTable.from_dict(synthetic_table([geometry("a", 8, 8)])).spill_ms_per_mb == {1: 0.0}
    with pytest.raises(CstarError, match="spill_ms_per_mb"):
        LatencyTable.from_dict({**table.to_dict(), "spill_ms_per_mb": {"1": float("nan")}})
    dense_parts = CostParts()
    for name, entry in table.layers.items():
        dense_parts = dense_parts + table.op_parts(name, "conv", entry.in_channels, entry.out_channels, 1)
    assert table.predicted_dense_ms(1) == pytest.approx(table.rest_ms(1) + table.model_price(dense_parts, 1))
    assert predicted_spill_ms(model, table, 1) == pytest.approx(rate * (dense_parts.weight_mib - cache))


def test_allocator_meets_the_whole_model_prediction_with_its_spill() -> None:
    """The spill is a second linear budget: the allocation meets rest + price + spill <= target, where the layers'
    summed price alone would have left the spill over the budget."""
    model = tiny_model()
    table = spilling_table(model)
    budget = Budget(1.4, "latency", SPEC.input_shape, first_and_last(model), latency_table=table)
    target = table.model_ms(1) / 1.4
    compressed = factorize_model(model, allocate_for(model, budget).ranks, sweeps=1)
    assert predicted_latency_ms(compressed, table, 1) <= target + 1e-9
    assert predicted_spill_ms(compressed, table, 1) > 0  # the budget held the spill the model still pays
    plain = LatencyTable.from_dict({**table.to_dict(), "spill_ms_per_mb": None, "spill_cache_mib": None})
    unaware = factorize_model(model, allocate_for(model, replace(budget, latency_table=plain)).ranks, sweeps=1)
    assert predicted_latency_ms(unaware, table, 1) > target


def test_prune_and_hybrid_meet_a_latency_budget_with_a_spill() -> None:
    from cstar.baselines import prune_to_budget
    from cstar.hybrid import budget_cost, hybrid_compress

    model = tiny_model()
    table = spilling_table(model)
    budget = Budget(1.4, "latency", SPEC.input_shape, first_and_last(model), latency_table=table)
    cost = budget_cost(budget)
    target = table.model_ms(1) / 1.4
    pruned = prune_to_budget(model, SPEC.input_shape, 1.4, "latency", keep_dense=first_and_last(model), cost=cost)
    assert predicted_latency_ms(pruned.model, table, 1) <= target + 1e-9
    hybrid = hybrid_compress(model, budget, share=0.5, cost=cost)
    assert predicted_latency_ms(hybrid.model, table, 1) <= target + 1e-9


def test_one_tie_rule_for_the_latency_model_and_export() -> None:
    """On an exact tie of every form the prediction and the export pick the same form (three-conv first)."""
    from cstar.latency import module_form_parts
    from cstar.latency_table import FORM_TIE_ORDER, fastest_form
    from cstar.lowrank import LowRankConv2d
    from export.forms import FORMS, _fastest, _table_ms

    class Flat:  # prices every form of every layer the same
        def form_parts(self, *args: object) -> str:
            return "parts"

        def price(self, parts: object, batch: int) -> float:
            return 1.0

        def form_ms(self, *args: object) -> float:
            return 1.0

    layer = LowRankConv2d(8, 8, (3, 3), (4, 4), padding=(1, 1))
    predicted = module_form_parts(Flat(), "layer", layer, 1)  # type: ignore[arg-type]
    assert predicted is not None and predicted[0] == "three-conv"
    assert _fastest(_table_ms(Flat(), "layer", layer, 1)) == predicted[0]  # type: ignore[arg-type]
    assert FORMS == FORM_TIE_ORDER and fastest_form({"dense": 2.0, "merge-output": 1.0, "merge-input": 1.0}) == "merge-input"
