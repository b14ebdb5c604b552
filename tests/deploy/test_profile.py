"""`cstar profile` on a tiny model: micro-graphs timed on ORT CPU, a table that loads and predicts loosely.

Timings on a shared CPU are noisy: numbers are checked for sanity (positive, finite) and predictions
only within a loose factor, never tightly.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cstar.admm import factorize_model
from cstar.checkpoint import save_checkpoint
from cstar.cli import main as cli_main
from cstar.data import DatasetSpec
from cstar.latency import layer_latencies, predicted_latency_ms, predicted_spill_ms
from cstar.latency_table import DEPLOY_FORMS, OPS, LatencyTable
from cstar.models import build_model
from cstar.ranks import candidate_layers
from deploy.backends import backend_available
from deploy.profile import (
    OpSpec,
    calibrate,
    net_ms,
    op_graph,
)

SPEC = DatasetSpec("digits", (1, 16, 16), tuple(str(i) for i in range(10)), (0.5,), (0.5,), 0.2)
REPO = Path(__file__).resolve().parents[2]
FAST = ["--ranks", "4,8", "--grid-cap", "3", "--iters", "3", "--warmup", "1"]


def tiny_dir(root: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("small-resnet", SPEC, width=8).eval()
    out = root / "dense"
    save_checkpoint(out, model, "train", "small-resnet", {"width": 8}, SPEC,
                    {"eps": 0.2, "norm": "linf", "metrics": {}, "config": {}})
    return out


@pytest.fixture(scope="module")
def profiled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(dense dir, table) of a tiny model profiled on ort-cpu, 1 thread, batches 1 and 2, a tiny grid."""
    root = tmp_path_factory.mktemp("profile")
    dense = tiny_dir(root)
    code = cli_main(["profile", "--model-from", str(dense), "--backend", "ort-cpu", "--threads", "1",
                     "--batch-sizes", "1,2", "--out", str(root / "table.json"), "--quiet", *FAST])
    assert code == 0
    return dense, root / "table.json"


def test_table_loads_with_every_layer_and_positive_finite_numbers(profiled: tuple[Path, Path]) -> None:
    dense, path = profiled
    table = LatencyTable.load(path)
    model = build_model("small-resnet", SPEC, width=8)
    assert table.layer_names() == [name for name, _ in candidate_layers(model)]
    assert table.backend == "ort-cpu" and table.threads == 1 and table.batch_sizes == (1, 2)
    assert table.runtime["name"] == "onnxruntime" and table.runtime["version"]
    assert table.machine["cpu_model"] and table.model["name"] == "small-resnet"
    assert table.settings["timing"] == "ort-kernel"
    for entry in table.layers.values():
        assert entry.in_grid[-1] == entry.in_channels and entry.out_grid[-1] == entry.out_channels
        assert set(entry.in_grid) <= {4, 8, entry.in_channels} and len(entry.in_grid) <= 3
        for batch in (1, 2):
            for op in OPS:
                values = entry.ms[batch][op]
                assert values.shape == (len(entry.axes(op)[0]), len(entry.axes(op)[1]))
                assert np.isfinite(values).all() and (values > 0).all()
    for batch in (1, 2):
        for value in (table.model_ms(batch), table.overhead_ms[batch], table.op_scale[batch]):
            assert math.isfinite(value) and value > 0
        assert math.isfinite(table.weight_ms_per_mb[batch]) and table.weight_ms_per_mb[batch] >= 0
    raw = json.loads(path.read_text())
    assert raw["summary"]["1"]["layers_alone_ms"] > 0


def test_prediction_walks_the_model_with_the_tables_costs(profiled: tuple[Path, Path]) -> None:
    """Predicted latency = the dense prediction with each factorized layer's dense cost swapped for its fastest
    form's, and the dense model's weight spill for the factorized one's. Deterministic given the table: how close
    predictions come to measured latency is a benchmark (benchmarks/latency_budget.py), not a test, since timing
    on a shared machine is noise here."""
    _, path = profiled
    table = LatencyTable.load(path)
    torch.manual_seed(0)
    dense = build_model("small-resnet", SPEC, width=8).eval()
    assert predicted_latency_ms(dense, table, 1) == pytest.approx(table.predicted_dense_ms(1))
    ranks = {"net.layer2.0.conv2": (8, 8), "net.layer3.0.conv2": (8, 8)}
    factorized = factorize_model(dense, ranks, sweeps=1)
    forms, dense_forms = layer_latencies(factorized, table, 1), layer_latencies(dense, table, 1)
    expected = (predicted_latency_ms(dense, table, 1) - predicted_spill_ms(dense, table, 1)
                + predicted_spill_ms(factorized, table, 1))
    for name in ranks:
        form, ms = forms[name]
        assert form in DEPLOY_FORMS and dense_forms[name][0] == "dense"  # dense too, where no factorized form pays
        expected += ms - dense_forms[name][1]
    assert predicted_latency_ms(factorized, table, 1) == pytest.approx(expected)


def test_table_is_calibrated_on_whole_reference_models(profiled: tuple[Path, Path]) -> None:
    """The profile times the dense model and uniform Tucker-2 / pruned references whole and fits the in-model
    price on them: the block lists every model, its coefficients are the table's, and its dense prediction
    is the table's own (rest + priced dense layers)."""
    _, path = profiled
    table = LatencyTable.load(path)
    assert table.calibration is not None and table.calibration["passes"] == 2
    for batch in table.batch_sizes:
        block = table.calibration["by_batch"][str(batch)]
        names = {m["model"] for m in block["models"]}
        assert {"dense", "tucker2-0.5", "tucker2-0.25", "pruned-0.5"} <= names
        assert block["op_scale"] == pytest.approx(table.op_scale[batch]) and table.op_scale[batch] > 0
        assert block["weight_ms_per_mb"] == pytest.approx(table.weight_ms_per_mb[batch])
        assert table.weight_ms_per_mb[batch] >= 0
        dense_row = next(m for m in block["models"] if m["model"] == "dense")
        assert dense_row["predicted_ms"] == pytest.approx(table.predicted_dense_ms(batch), rel=1e-3)
        for row in block["models"]:
            assert row["measured_ms"] > 0 and math.isfinite(row["error"])
            assert row["error"] == pytest.approx((row["predicted_ms"] - row["measured_ms"]) / row["measured_ms"],
                                                 abs=1e-3)
        assert block["max_abs_error"] == pytest.approx(max(abs(m["error"]) for m in block["models"]))


def test_reference_models_sit_on_the_tables_grid(profiled: tuple[Path, Path]) -> None:
    from cstar.lowrank import LowRankConv2d
    from deploy.profile.fit import pruned_reference, tucker_reference

    _, path = profiled
    table = LatencyTable.load(path)
    dense = build_model("small-resnet", SPEC, width=8).eval()
    tucker = tucker_reference(dense, table, 0.5)
    factorized = {n: m for n, m in tucker.named_modules() if isinstance(m, LowRankConv2d)}
    assert factorized and "net.conv1" not in factorized
    for name, layer in factorized.items():
        entry = table.layer(name)
        assert layer.ranks[0] in entry.out_grid and layer.ranks[1] in entry.in_grid
        assert layer.ranks[0] <= max(entry.out_grid[0], entry.out_channels // 2)
    pruned = pruned_reference(dense, table, 0.5)
    assert pruned is not None
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name in table.layers:
            assert module.out_channels in table.layer(name).out_grid


def test_net_times_and_calibration_stay_positive() -> None:
    assert net_ms(0.05, 0.01) == pytest.approx(0.04)
    assert net_ms(0.005, 0.01) == pytest.approx(0.05 * 0.005)  # below the overhead: noise, kept positive
    assert calibrate(10.0, 12.0, 4.0) == (0.5, 1.0)  # slower in the model: 2 ms over 4 MiB of streamed weights
    assert calibrate(10.0, 9.0, 4.0) == (0.0, 0.9)  # faster in the model: every op scaled
    assert calibrate(10.0, 12.0, 0.0) == (0.0, 1.2)  # slower, nothing beyond the cache: scaled


def test_micro_graph_is_one_conv_with_the_layer_geometry() -> None:
    spec = OpSpec("conv", 6, 10, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), (9, 9))
    graph = op_graph(spec, np.random.default_rng(0))
    (node,) = graph.graph.node
    attributes = {a.name: list(a.ints) for a in node.attribute}
    assert node.op_type == "Conv" and attributes["strides"] == [2, 2] and attributes["pads"] == [1, 1, 1, 1]
    assert spec.output_hw == (5, 5)
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"  # one session, every batch
    gemm = op_graph(OpSpec("gemm", 32, 10), np.random.default_rng(0))
    assert [n.op_type for n in gemm.graph.node] == ["Flatten", "Gemm"]


@pytest.mark.skipif(not backend_available("openvino-cpu")[0], reason="openvino CPU not available")
def test_openvino_backend_profiles_through_the_registry(tmp_path: Path) -> None:
    dense = tiny_dir(tmp_path)
    code = cli_main(["profile", "--model-from", str(dense), "--backend", "openvino-cpu", "--threads", "1",
                     "--batch-sizes", "1", "--out", str(tmp_path / "ov.json"), "--quiet", *FAST])
    assert code == 0
    table = LatencyTable.load(tmp_path / "ov.json")
    assert table.backend == "openvino-cpu" and table.runtime["name"] == "openvino"
    assert table.settings["timing"] == "call-minus-overhead"
    assert table.check_matches("ort-cpu", 1, cpu=table.machine["cpu_model"])


def test_cli_errors_are_one_line_with_a_fix(tmp_path: Path, capsys) -> None:
    dense = tiny_dir(tmp_path)
    for args, message in ((["--batch-sizes", "0"], "--batch-sizes"), (["--ranks", "x"], "--ranks"),
                          (["--backend", "nope"], "unknown backend")):
        code = cli_main(["profile", "--model-from", str(dense), "--out", str(tmp_path / "t.json"), *args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("error:") == 1 and "fix:" in err and message in err, err
    assert not (tmp_path / "t.json").exists()


def test_timing_side_is_torch_free() -> None:
    code = ("import sys; import deploy.profile, cstar.latency_table; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
