"""Structured pruning baseline: same-budget fairness with CSTAR (the stem and classifier kept alike)."""

from __future__ import annotations

import argparse
import re
from typing import Any

import pytest
import torch
from torch import nn

from cstar.baselines import channel_groups, frozen_groups, prune_to_budget, pruned_rank_map
from cstar.budget import model_cost
from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.models import build_model
from cstar.ranks import first_and_last

SPEC = DatasetSpec("synthetic", (3, 16, 16), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 0.03)


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", SPEC, width=16).eval()


def _ends(model: nn.Module) -> tuple[int, int]:
    """(stem conv out-channels, classifier in-features)."""
    return int(model.get_submodule("net.conv1").out_channels), int(model.get_submodule("net.fc").in_features)


@pytest.mark.parametrize("by", ["params", "flops"])
def test_pruning_keeps_the_ends_dense_unless_compress_ends(by: str) -> None:
    model = _resnet()
    keep = first_and_last(model)
    assert keep == ("net.conv1", "net.fc")
    dense_cost = model_cost(model, SPEC.input_shape, by)
    kept = prune_to_budget(model, SPEC.input_shape, 8.0, by, keep_dense=keep)
    assert _ends(kept.model) == _ends(model) == (16, 128)
    assert kept.frozen == ["net.stem", "net.layer4"]  # the groups the stem produces and the classifier reads
    for name in keep:  # weights untouched, not only the same shape
        assert torch.equal(kept.model.get_submodule(name).weight, model.get_submodule(name).weight)
    ends = prune_to_budget(model, SPEC.input_shape, 8.0, by)  # --compress-ends
    assert ends.frozen == []
    stem_out, fc_in = _ends(ends.model)
    assert stem_out < 16 and fc_in < 128
    for result in (kept, ends):
        assert 8.0 <= dense_cost / model_cost(result.model, SPEC.input_shape, by) <= 8.0 * 1.25
    # the dense ends are paid for by thinner pruned groups, at the same budget
    assert kept.fraction < ends.fraction
    entries = pruned_rank_map(model, kept.model)
    assert entries["net.conv1"]["kind"] == entries["net.fc"]["kind"] == "dense"
    assert entries["net.layer4.0.conv2"]["kind"] == "pruned"  # out kept (stream), in pruned (inner group)
    assert entries["net.layer4.0.conv2"]["ranks"][0] == 128 > entries["net.layer4.0.conv2"]["ranks"][1]


def test_frozen_groups_follow_the_kept_layers() -> None:
    model = _resnet()
    groups = channel_groups(model)
    assert frozen_groups(groups, ()) == []
    assert set(frozen_groups(groups, ("net.layer2.0.conv1",))) == {"net.stem", "net.layer2.0.inner"}
    vgg = build_model("vgg16", SPEC).eval()
    vgg_groups = channel_groups(vgg)
    assert frozen_groups(vgg_groups, first_and_last(vgg)) == [vgg_groups[0].name, vgg_groups[-1].name]


def test_unreachable_ratio_with_dense_ends_names_compress_ends() -> None:
    with pytest.raises(CstarError, match="first/last layers kept dense") as info:
        prune_to_budget(_resnet(), SPEC.input_shape, 400.0, "params", keep_dense=first_and_last(_resnet()))
    assert "--compress-ends" in (info.value.hint or "")
    from cstar.errors import UnreachableBudget

    best = float(re.search(r"at most ([0-9.]+)x", info.value.message).group(1))  # type: ignore[union-attr]
    assert isinstance(info.value, UnreachableBudget) and round(info.value.best_ratio, 2) == best


def test_cost_function_is_pluggable() -> None:
    """A budget cost passed in replaces params/MACs: here the weight count of the convs alone."""
    model = _resnet()

    def conv_weights(m: nn.Module) -> float:
        return float(sum(x.weight.numel() for x in m.modules() if isinstance(x, nn.Conv2d)))

    result = prune_to_budget(model, SPEC.input_shape, 4.0, "params", cost=conv_weights)
    assert 4.0 <= conv_weights(model) / conv_weights(result.model) <= 4.0 * 1.15


def _parsed_config(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    from cstar.compress import command as compress

    captured: dict[str, Any] = {}

    def fake_run(from_dir: str, out: str, config: Any, progress: bool, force: bool = False) -> dict[str, Any]:
        captured["config"] = config
        return {"metrics": {"clean_acc": 1.0, "robust_acc": 1.0, "attack": {}},
                "compression": {"params_ratio": 1.0, "flops_ratio": 1.0}}

    monkeypatch.setattr(compress, "run_compress", fake_run)
    parser = argparse.ArgumentParser()
    compress.add_arguments(parser)
    assert compress.main(parser.parse_args(["--from", "a", "--out", "b", "--ratio", "4", "--quiet", *argv])) == 0
    return captured["config"]


def test_cli_compress_ends_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _parsed_config([], monkeypatch).keep_first_last is True
    assert _parsed_config(["--compress-ends"], monkeypatch).keep_first_last is False
    assert _parsed_config(["--factorize-all"], monkeypatch).keep_first_last is False  # the older name
    config = _parsed_config(["--method", "hybrid", "--hybrid-prune-share", "0.25"], monkeypatch)
    assert config.method == "hybrid" and config.hybrid_prune_share == 0.25


def test_pruned_widths_land_on_the_given_grid() -> None:
    """With width options (a latency table's grid), every pruned group keeps a count on it, rounded down, and
    the budget still holds: off the grid a width is neither measured nor on the fast kernel path."""
    from cstar.baselines import snap_count

    assert snap_count(43, [4, 8, 16, 24, 32, 48, 64]) == 32
    assert snap_count(3, [4, 8, 16]) == 4 and snap_count(16, [4, 8, 16]) == 16
    assert snap_count(6.0, [4, 8, 16]) == 4  # a fraction of a width (the profile's reference ranks)
    model = _resnet()

    def multiples_of_8(group: Any, width: int) -> list[int]:
        return [4, *range(8, width + 1, 8)]

    result = prune_to_budget(model, SPEC.input_shape, 3.0, "flops", keep_dense=first_and_last(model),
                             widths=multiples_of_8)
    dense_flops = model_cost(model, SPEC.input_shape, "flops")
    assert dense_flops / model_cost(result.model, SPEC.input_shape, "flops") >= 3.0
    for name, (kept, total) in result.kept.items():
        assert kept == total or kept in multiples_of_8(None, total), name
    assert any(kept < total for kept, total in result.kept.values())


def test_table_widths_read_each_groups_grid_from_the_table() -> None:
    from cstar.latency import candidate_geometry, table_widths
    from cstar.latency_table import LatencyTable, channel_grid
    from tests.cstar.test_latency import synthetic_table

    model = _resnet()
    table = LatencyTable.from_dict(synthetic_table(candidate_geometry(model, SPEC.input_shape)))
    options = table_widths(table)
    for group in channel_groups(model):
        width = int(model.get_submodule(group.producers[0]).weight.shape[0])
        assert options(group, width) == channel_grid(width)


def test_preact_resnet_prunes_with_its_stream_batchnorms() -> None:
    """Pre-activation blocks normalize the residual stream (block.bn1, bn1_final): they are sliced with it, the
    pruned model runs and meets the budget, and keeping every channel reproduces the dense outputs exactly."""
    from cstar.baselines import keep_indices, prune_channels

    torch.manual_seed(0)
    model = build_model("preact-resnet18", SPEC, width=16).eval()
    for module in model.modules():  # non-trivial BN statistics, so a mis-sliced BN changes the outputs
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    groups = channel_groups(model)
    stream = next(g for g in groups if g.name == "net.layer2")
    assert "net.layer2.1.bn1" in stream.producers and "net.layer3.0.shortcut.0" in stream.consumers
    assert "net.bn1_final" in groups[-1].producers and groups[-1].consumers[-1] == "net.fc"
    x = torch.rand(4, *SPEC.input_shape)
    whole = prune_channels(model, keep_indices(model, groups, 1.0), groups).eval()
    assert torch.equal(whole(x), model(x))
    kept = prune_to_budget(model, SPEC.input_shape, 4.0, "params", keep_dense=first_and_last(model))
    ratio = model_cost(model, SPEC.input_shape, "params") / model_cost(kept.model, SPEC.input_shape, "params")
    assert 4.0 <= ratio <= 4.0 * 1.25
    assert kept.model.eval()(x).shape == (4, 10)
    assert int(kept.model.get_submodule("net.bn1_final").num_features) == 128  # the classifier's group stays whole
