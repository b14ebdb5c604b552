"""Exact deploy forms of a Tucker-2 layer: same function in every form, chosen by a latency table or by MACs."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cstar.admm import rank_map
from cstar.checkpoint import save_checkpoint
from cstar.cli import main as cli_main
from cstar.errors import CstarError
from cstar.flops import count_flops
from cstar.latency_table import DEPLOY_FORMS
from cstar.lowrank import LowRankConv2d
from cstar.models import build_model
from export.deploy_form import to_deploy
from export.exporter import run_export
from export.forms import CONVS_PER_FORM, FORMS, build_form, choose_form_details, choose_forms
from export.onnx_export import export_onnx, op_counts
from export.parity import check_parity
from tests.export.helpers import random_factorize, randomize_batchnorms, synthetic_spec


def _layer(cin: int, cout: int, ranks: tuple[int, int], kernel: tuple[int, int] = (3, 3), stride: int = 1,
           padding: Any = 0, dilation: int = 1, bias: bool = True, seed: int = 0) -> LowRankConv2d:
    """A LowRankConv2d with random (non-orthogonal) factors and bias: ranks = (r_out, r_in)."""
    generator = torch.Generator().manual_seed(seed)
    pad = padding if isinstance(padding, str) else (padding if isinstance(padding, tuple) else (padding, padding))
    layer = LowRankConv2d(cin, cout, kernel, ranks, (stride, stride), pad, (dilation, dilation), bias=bias, init=False)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return layer.eval()


def _convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


def _assert_same_function(layer: LowRankConv2d, form: str, x: torch.Tensor) -> None:
    deployed = build_form(layer, form)
    with torch.no_grad():
        reference, result = layer(x), deployed(x)
    assert result.shape == reference.shape
    scale = float(reference.abs().max())
    assert scale > 0 and float((result - reference).abs().max()) <= 1e-5 * scale, form


GEOMETRY = [(stride, padding, dilation, bias) for stride in (1, 2) for padding in (0, 1, (1, 2))
            for dilation in (1, 2) for bias in (True, False)]


@pytest.mark.parametrize("ranks", [(3, 2), (10, 6)], ids=["ranks<channels", "ranks=channels"])
@pytest.mark.parametrize(("stride", "padding", "dilation", "bias"), GEOMETRY)
def test_every_form_equals_the_unmerged_layer(stride: int, padding: Any, dilation: int, bias: bool,
                                              ranks: tuple[int, int]) -> None:
    layer = _layer(6, 10, ranks, stride=stride, padding=padding, dilation=dilation, bias=bias)
    x = torch.randn(2, 6, 11, 9, generator=torch.Generator().manual_seed(1))
    for form in FORMS:
        _assert_same_function(layer, form, x)


@pytest.mark.parametrize(("kernel", "padding"), [((1, 1), 0), ((3, 5), "same"), ((1, 3), "valid"), ((3, 3), (0, 2))])
def test_forms_other_kernels_and_paddings(kernel: tuple[int, int], padding: Any) -> None:
    layer = _layer(5, 7, (4, 3), kernel=kernel, padding=padding, bias=True, seed=2)
    x = torch.randn(3, 5, 8, 10, generator=torch.Generator().manual_seed(3))
    for form in FORMS:
        _assert_same_function(layer, form, x)


def test_form_structure_stride_sits_on_the_kxk_conv() -> None:
    layer = _layer(6, 10, (4, 3), stride=2, padding=(1, 2), dilation=2, bias=True)
    expected = {  # (in, out, kernel) per conv
        "three-conv": [(6, 3, (1, 1)), (3, 4, (3, 3)), (4, 10, (1, 1))],
        "merge-input": [(6, 4, (3, 3)), (4, 10, (1, 1))],
        "merge-output": [(6, 3, (1, 1)), (3, 10, (3, 3))],
        "dense": [(6, 10, (3, 3))],
    }
    for form, shapes in expected.items():
        convs = _convs(build_form(layer, form))
        assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == shapes
        assert len(convs) == CONVS_PER_FORM[form]
        for conv in convs:
            spatial = conv.kernel_size == (3, 3)
            assert conv.stride == ((2, 2) if spatial else (1, 1)), form
            assert conv.padding == ((1, 2) if spatial else (0, 0)) and conv.dilation == ((2, 2) if spatial else (1, 1))
        assert [c.bias is not None for c in convs] == [False] * (len(convs) - 1) + [True]  # bias on the last conv


def test_unknown_form_is_a_clear_error() -> None:
    with pytest.raises(CstarError, match="unknown deploy form 'fused'"):
        build_form(_layer(4, 4, (2, 2)), "fused")


# ------------------------------------------------------------------------------------ choice


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = _layer(8, 16, (4, 2), stride=2, padding=1, bias=False)  # 8x8 -> 4x4
        self.proj = _layer(16, 8, (8, 4), kernel=(1, 1), bias=True, seed=1)  # 4x4 -> 4x4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.relu(self.conv(x)))


def test_macs_choice_hand_computed() -> None:
    model = _TwoLayers().eval()
    details = choose_form_details(model, input_shape=(8, 8, 8))
    # conv: Cin 8, Cout 16, 3x3, r_in 2, r_out 4; 64 input and 16 output positions
    assert details["conv"].macs == {"three-conv": 64 * 8 * 2 + 16 * (2 * 9 * 4 + 4 * 16),  # 3200
                                    "merge-input": 16 * (8 * 9 * 4 + 4 * 16),  # 5632
                                    "merge-output": 64 * 8 * 2 + 16 * 2 * 9 * 16,  # 5632
                                    "dense": 16 * 8 * 9 * 16}  # 18432
    # proj (1x1): Cin 16, Cout 8, r_in 4, r_out 8; 16 positions: merging the output factor saves most
    assert details["proj"].macs == {"three-conv": 16 * (16 * 4 + 4 * 8 + 8 * 8), "merge-input": 16 * (16 * 8 + 8 * 8),
                                    "merge-output": 16 * (16 * 4 + 4 * 8), "dense": 16 * 16 * 8}
    assert choose_forms(model, input_shape=(8, 8, 8)) == {"conv": "three-conv", "proj": "merge-output"}
    assert {name: c.reason for name, c in details.items()} == {"conv": "macs", "proj": "macs"}
    assert choose_forms(model) == {"conv": "three-conv", "proj": "merge-output"}  # per-position estimate agrees
    deployed = to_deploy(model, input_shape=(8, 8, 8))  # default: the MACs choice
    assert count_flops(deployed, (8, 8, 8)) == 3200 + 16 * 96
    assert count_flops(model, (8, 8, 8)) == 3200 + 16 * 160  # three-conv MACs == the factorized layer's
    x = torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert float((deployed(x) - model(x)).abs().max()) <= 1e-5 * float(model(x).abs().max())


class FakeTable:
    """Latency table stand-in: per (layer, form) ms; records the ranks it was asked for."""

    backend = "fake-backend"
    machine = {"cpu": "test"}
    threads = 1

    def __init__(self, ms: dict[str, dict[str, float]], batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        self.ms = ms
        self.batch_sizes = batch_sizes
        self.calls: list[tuple[str, str, tuple[int, int] | None, int]] = []
        self.widths: list[tuple[int | None, int | None]] = []

    def layer_names(self) -> list[str]:
        return list(self.ms)

    def form_ms(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                cin: int | None = None, cout: int | None = None) -> float:
        self.calls.append((layer, form, ranks, batch))
        self.widths.append((cin, cout))
        return self.ms[layer][form] * batch


def test_table_choice_picks_the_fastest_per_layer() -> None:
    model = _TwoLayers().eval()
    table = FakeTable({"conv": {"three-conv": 0.3, "merge-input": 0.2, "merge-output": 0.25, "dense": 0.9},
                       "proj": {"three-conv": 0.5, "merge-input": 0.4, "merge-output": 0.45, "dense": 0.1}})
    details = choose_form_details(model, table, batch=8, input_shape=(8, 8, 8))
    assert {name: c.form for name, c in details.items()} == {"conv": "merge-input", "proj": "dense"}
    assert details["conv"].reason == "table" and details["conv"].predicted_ms["merge-input"] == pytest.approx(1.6)
    # ranks go to the table as (r_in, r_out); the dense form has none
    assert ("conv", "three-conv", (2, 4), 8) in table.calls and ("proj", "merge-output", (4, 8), 8) in table.calls
    assert ("conv", "dense", None, 8) in table.calls
    assert set(table.widths) == {(8, 16), (16, 8)}  # every form priced at the layer's own (cin, cout)
    tie = FakeTable({"conv": dict.fromkeys(FORMS, 1.0)})  # ties keep the unmerged form; proj is not in it
    tied = choose_form_details(model, tie, input_shape=(8, 8, 8))
    assert (tied["conv"].form, tied["conv"].reason) == ("three-conv", "table")
    assert (tied["proj"].form, tied["proj"].reason, tied["proj"].predicted_ms) == ("merge-output", "macs", {})


class _Narrow(nn.Module):
    """One 3x3 Tucker-2 layer pruned to 8 -> 8 channels with r_out = 8 (its output factor is a full-width 1x1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = _layer(8, 8, (8, 4), padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_a_pruned_layer_takes_the_form_priced_at_its_own_widths() -> None:
    """The table profiled the layer at 16 -> 16; pruned to 8 -> 8 (hybrid) its forms are priced at 8 -> 8, as the
    prediction (cstar.latency) prices them. Priced per MAC, three-conv wins at 16 -> 16 (its 8 -> 16 output factor is
    cheaper than a wider core) but merge-output wins at 8 -> 8 (three-conv's output factor is then pure waste)."""
    from cstar.latency import layer_latencies
    from cstar.latency_table import LatencyTable
    from tests.cstar.test_latency import geometry, synthetic_table

    def per_mac(layer: dict[str, Any], op: str, rows: int, cols: int) -> float:
        return 1e-6 * rows * cols * (9 if op == "conv" else 1) * 64

    table = LatencyTable.from_dict(synthetic_table([geometry("conv", 16, 16)], per_mac))
    model = _Narrow().eval()
    assert table.fastest_form("conv", (4, 8), 1)[0] == "three-conv"  # at the profiled 16 -> 16
    chosen = choose_forms(model, table, 1, input_shape=(8, 8, 8))
    predicted = {name: form for name, (form, _) in layer_latencies(model, table, 1).items()}
    assert chosen == predicted == {"conv": "merge-output"}


def test_to_deploy_applies_given_forms_and_rejects_unknown_layers() -> None:
    model = _TwoLayers().eval()
    deployed = to_deploy(model, {"conv": "dense"})
    assert isinstance(deployed.get_submodule("conv"), nn.Conv2d)
    assert len(_convs(deployed.get_submodule("proj"))) == 2  # proj: the MACs choice (merge-output)
    with pytest.raises(CstarError, match="not factorized convs: nope"):
        to_deploy(model, {"nope": "dense"})


# ------------------------------------------------------------------------------------ ONNX


def test_mixed_forms_onnx_parity_and_conv_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    classifier = nn.Linear(12, 5)
    body = nn.Sequential(
        _layer(3, 8, (4, 2), padding=1, bias=False, seed=1), nn.BatchNorm2d(8), nn.ReLU(),
        _layer(8, 8, (4, 4), stride=2, padding=(1, 2), bias=False, seed=2), nn.BatchNorm2d(8), nn.ReLU(),
        _layer(8, 12, (6, 4), dilation=2, padding=2, bias=True, seed=3), nn.ReLU(),
        _layer(12, 12, (6, 6), padding=1, bias=True, seed=4),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), classifier,
    )
    model = randomize_batchnorms(body).eval()
    with torch.no_grad():  # random factors blow activations up: bring logits to O(1)
        classifier.weight.mul_(1.0 / float(model(torch.rand(8, 3, 12, 12)).std()))
    forms = {"0": "three-conv", "3": "merge-input", "6": "merge-output", "8": "dense"}
    deployed = to_deploy(model, forms)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in deployed.modules()) == 0  # folded into each form's last conv
    result = export_onnx(deployed, (3, 12, 12), tmp_path / "m.onnx")
    assert op_counts(result.path)["Conv"] == 3 + 2 + 2 + 1
    images = torch.rand(16, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    parity = check_parity(model, result.path, images, torch.arange(16) % 5, eps=4 / 255)
    assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["n"] == 32


def _fake_table_module(monkeypatch: pytest.MonkeyPatch, table: FakeTable) -> list[str]:
    """Install a stand-in `cstar.latency_table` whose LatencyTable.load returns `table`."""
    loaded: list[str] = []

    class LatencyTable:
        @staticmethod
        def load(path: str | Path) -> FakeTable:
            loaded.append(str(path))
            return table

    from cstar.latency_table import latency_batches  # the real parser of --latency-batch

    module = types.ModuleType("cstar.latency_table")
    module.LatencyTable = LatencyTable  # type: ignore[attr-defined]
    module.latency_batches = latency_batches  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cstar.latency_table", module)
    return loaded


def test_export_with_latency_table_records_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = synthetic_spec(channels=1, size=16)
    torch.manual_seed(0)
    model = random_factorize(randomize_batchnorms(build_model("small-resnet", spec, width=4)).eval())
    images = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        scale = 1.0 / float(model(images).std())
        fc = model.get_submodule("net.fc")
        fc.get_parameter("u").mul_(scale)
        fc.get_parameter("bias").mul_(scale)
    save_checkpoint(tmp_path / "ckpt", model, "compress", "small-resnet", {"width": 4}, spec,
                    {"eps": 0.1, "norm": "linf", "metrics": {}, "ranks": rank_map(model)})
    names = [name for name, m in model.named_modules() if isinstance(m, LowRankConv2d)]
    favourite = {name: FORMS[i % len(FORMS)] for i, name in enumerate(names)}
    table = FakeTable({name: {f: 1.0 if f == favourite[name] else 2.0 for f in FORMS} for name in names})
    (tmp_path / "table.json").write_text("{}")
    loaded = _fake_table_module(monkeypatch, table)
    manifest = run_export(tmp_path / "ckpt", tmp_path / "out", parity_samples=8, parity_data=(images, torch.arange(8)),
                          progress=False, latency_table=tmp_path / "table.json", latency_batch=8)
    record = manifest["deploy_forms"]
    assert loaded == [str(tmp_path / "table.json")] and record["chosen_by"] == "table"
    assert record["table"]["backend"] == "fake-backend" and record["table"]["batch"] == 8
    assert len(record["table"]["sha256"]) == 64
    assert {name: entry["form"] for name, entry in record["layers"].items()} == favourite
    assert all(entry["reason"] == "table" and entry["predicted_ms"][entry["form"]] == 8.0
               for entry in record["layers"].values())
    assert len(set(favourite.values())) == 4  # all four forms in one graph
    assert manifest["onnx"]["nodes"]["Conv"] == sum(CONVS_PER_FORM[f] for f in favourite.values())
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-4
    macs = record["layers"]
    assert manifest["flops"] == count_flops(to_deploy(model, favourite), (1, 16, 16))
    assert count_flops(model, (1, 16, 16)) - manifest["flops"] == sum(
        entry["macs"]["three-conv"] - entry["macs"][entry["form"]] for entry in macs.values())
    listed = run_export(tmp_path / "ckpt", tmp_path / "out3", parity_samples=8, progress=False,
                        parity_data=(images, torch.arange(8)), latency_table=tmp_path / "table.json",
                        latency_batch="8,1")  # a multi-batch compress budget: its first batch picks the forms
    assert listed["deploy_forms"]["table"]["batch"] == 8
    assert {name: entry["form"] for name, entry in listed["deploy_forms"]["layers"].items()} == favourite
    with pytest.raises(CstarError, match="--latency-batch 4 is not a batch size"):
        run_export(tmp_path / "ckpt", tmp_path / "out2", progress=False, latency_table=tmp_path / "table.json",
                   latency_batch=4)
    assert not (tmp_path / "out2").exists()


def test_latency_batch_needs_a_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["export", "--from", str(tmp_path / "a"), "--out", str(tmp_path / "b"), "--latency-batch", "2"])
    assert code == 2 and "--latency-batch needs --latency-table" in capsys.readouterr().err


def test_forms_match_the_latency_table_api() -> None:
    """Export's forms are the ones the table prices (cstar.latency_table is part of the package: imported, not
    skipped, so a broken import fails here)."""
    assert set(DEPLOY_FORMS) == set(FORMS)
