"""Hybrid compression (prune, then CSTAR on what remains): one budget against the dense model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import cstar.checkpoint as checkpoint
from cstar.admm import Budget
from cstar.budget import model_cost
from cstar.checkpoint import load_checkpoint
from cstar.compress import COMPRESSION_METHODS, METHODS, CompressConfig, compression_method, run_compress
from cstar.data import DatasetSpec, load_dataset, to_tensors
from cstar.errors import CstarError
from cstar.hybrid import hybrid_compress, prune_ratio
from cstar.lowrank import LowRankConv2d
from cstar.models import build_model
from cstar.ranks import first_and_last
from tests.cstar.test_compress import rebuild_from_rank_map

SPEC = DatasetSpec("synthetic", (3, 16, 16), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 0.03)
TINY = {"admm_epochs": 1, "finetune_epochs": 1, "train_steps": 2, "eval_suite": "apgd", "eval_steps": 3,
        "eval_limit": 60, "realloc_epochs": 1, "eval_dense": False}


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", SPEC, width=16).eval()


def _narrowed(dense: nn.Module, compressed: nn.Module) -> list[str]:
    """Layers whose in or out channels are fewer than the dense layer's (pruned, factorized or not)."""
    before = dict(dense.named_modules())
    names = []
    for name, module in compressed.named_modules():
        original = before.get(name)
        if (isinstance(module, (nn.Conv2d, LowRankConv2d)) and isinstance(original, nn.Conv2d)
                and (module.out_channels, module.in_channels) != (original.out_channels, original.in_channels)):
            names.append(name)
    return names


@pytest.mark.parametrize("by", ["params", "flops"])
@pytest.mark.parametrize("keep_ends", [True, False])
def test_hybrid_meets_the_budget_of_the_dense_model(by: str, keep_ends: bool) -> None:
    dense = _resnet()
    keep = first_and_last(dense) if keep_ends else ()
    result = hybrid_compress(dense, Budget(8.0, by, SPEC.input_shape, keep))
    dense_cost = model_cost(dense, SPEC.input_shape, by)
    achieved = dense_cost / model_cost(result.model, SPEC.input_shape, by)
    assert 8.0 <= achieved <= 8.0 * 1.05
    assert result.stage.prune_ratio == pytest.approx(dense_cost / model_cost(result.stage.pruned.model,
                                                                               SPEC.input_shape, by))
    assert math.sqrt(8.0) <= result.stage.prune_ratio <= math.sqrt(8.0) * 1.2  # share 0.5 of the log-ratio
    assert result.stage.residual.ratio == pytest.approx(8.0 / result.stage.prune_ratio)
    lowrank = [n for n, m in result.model.named_modules() if isinstance(m, LowRankConv2d)]
    narrowed = _narrowed(dense, result.model)
    assert lowrank and len(narrowed) >= 10  # fewer channels AND Tucker-2 layers
    assert set(lowrank) & set(narrowed)  # some factorized layers were pruned first
    stem, fc = result.model.get_submodule("net.conv1"), result.model.get_submodule("net.fc")
    if keep_ends:
        assert isinstance(stem, nn.Conv2d) and stem.weight.shape == dense.get_submodule("net.conv1").weight.shape
        assert isinstance(fc, nn.Linear) and fc.weight.shape == dense.get_submodule("net.fc").weight.shape
    else:
        assert "net.conv1" in narrowed


def test_prune_share_splits_the_log_ratio() -> None:
    assert prune_ratio(16.0, 0.5) == pytest.approx(4.0)
    assert prune_ratio(16.0, 0.25) == pytest.approx(2.0)
    for share in (0.0, 1.0, -0.5):
        with pytest.raises(CstarError, match="hybrid-prune-share"):
            prune_ratio(16.0, share)
    with pytest.raises(CstarError, match="hybrid-prune-share"):
        CompressConfig(method="hybrid", hybrid_prune_share=1.0).validate()


def test_unreachable_remainder_is_restated_against_the_dense_model() -> None:
    with pytest.raises(CstarError, match=r"hybrid: after pruning .*x, Tucker-2 cannot reach") as info:
        hybrid_compress(_resnet(), Budget(200.0, "params", SPEC.input_shape, ()), share=0.05)
    assert "--hybrid-prune-share" in (info.value.hint or "")
    from cstar.errors import UnreachableBudget

    pruned = float(re.search(r"after pruning ([0-9.]+)x", info.value.message).group(1))  # type: ignore[union-attr]
    inner = float(re.search(r"at most ([0-9.]+)x", info.value.message).group(1))  # type: ignore[union-attr]
    assert isinstance(info.value, UnreachableBudget)  # the best total: the pruning's times the allocator's
    assert info.value.best_ratio == pytest.approx(pruned * inner, rel=0.01)


def test_registry_lists_hybrid() -> None:
    assert "hybrid" in METHODS and tuple(COMPRESSION_METHODS) == METHODS
    assert compression_method("hybrid") is COMPRESSION_METHODS["hybrid"]
    with pytest.raises(CstarError, match="unknown compression method 'hybird'") as info:
        compression_method("hybird")
    assert "hybrid" in (info.value.hint or "")
    with pytest.raises(CstarError, match="unknown compression method"):
        CompressConfig(method="hybird").validate()


def test_hybrid_round_trip(robust_digits_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    saved: dict[str, nn.Module] = {}
    original = checkpoint.save_checkpoint

    def spy(out_dir, model, *args, **kwargs):  # type: ignore[no-untyped-def]
        saved["model"] = model
        return original(out_dir, model, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", spy)
    out = tmp_path / "hybrid"
    manifest = run_compress(robust_digits_dir, out, ratio=3.0, method="hybrid", config=TINY, progress=False)
    assert manifest["method"] == "hybrid" and manifest["compression"]["params_ratio"] >= 3.0
    assert manifest["hybrid"]["prune_share"] == 0.5
    assert manifest["hybrid"]["prune_ratio"] >= math.sqrt(3.0)
    assert manifest["hybrid"]["prune_ratio"] * manifest["hybrid"]["cstar_ratio"] == pytest.approx(3.0)
    kinds = {entry["kind"] for entry in manifest["ranks"].values()}
    assert {"tucker2", "pruned"} <= kinds
    assert any("channels" in entry for entry in manifest["ranks"].values())  # pruned, then factorized
    assert manifest["dense_layers"]["ends"] == "dense"
    assert manifest["dense_layers"]["end_layers"] == ["net.conv1", "net.fc"]
    assert {"net.conv1", "net.fc"} <= set(manifest["dense_layers"]["layers"])
    assert manifest["pruning"]["unpruned_groups"] == ["net.stem", "net.layer3"]
    model, loaded = load_checkpoint(out)
    rebuilt = rebuild_from_rank_map(robust_digits_dir, out, loaded)
    images, _ = to_tensors(load_dataset("digits").test, limit=32)
    with torch.no_grad():
        expected = saved["model"].eval()(images)
        for candidate in (model, rebuilt):
            assert float((candidate(images) - expected).abs().max()) <= 1e-5 * float(expected.abs().max())


@pytest.mark.parametrize("method", METHODS)
def test_structure_path_meets_the_budget_for_every_method(method: str) -> None:
    """cstar.compress.structure: one structure-only path keyed like the method registry; each structure reaches
    the ratio (within the allocator's/pruning's granularity) and keeps the ends' weights' shapes."""
    from cstar.compress import STRUCTURES, compress_structure

    assert tuple(STRUCTURES) == METHODS
    dense = _resnet()
    keep = first_and_last(dense)
    structure = compress_structure(dense, Budget(4.0, "params", SPEC.input_shape, keep), method, sweeps=0)
    achieved = model_cost(dense, SPEC.input_shape, "params") / model_cost(structure.model, SPEC.input_shape, "params")
    assert 4.0 <= achieved <= 4.0 * 1.25, achieved
    ranks = structure.ranks(dense)
    assert keep and all(ranks[name]["kind"] == "dense" for name in keep), {name: ranks[name] for name in keep}
    assert any(entry["kind"] != "dense" for entry in ranks.values())
    assert (structure.pruned is not None) == (method in ("prune", "hybrid"))
    assert (structure.allocation is not None) == (method != "prune")


def test_structure_path_names_the_methods_on_a_typo() -> None:
    from cstar.compress import compress_structure

    with pytest.raises(CstarError, match="unknown compression method 'pruned'") as info:
        compress_structure(_resnet(), Budget(2.0, "params", SPEC.input_shape, ()), "pruned")
    assert "lowrank-uniform" in (info.value.hint or "")
