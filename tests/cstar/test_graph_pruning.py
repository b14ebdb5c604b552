"""Robust channel pruning of any graph through Torch-Pruning (cstar.graph_pruning)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from cstar.baselines import channel_groups, prune_to_budget
from cstar.budget import model_cost
from cstar.checkpoint import apply_structure, describe_structure
from cstar.data import DatasetSpec
from cstar.errors import CstarError
from cstar.graph_pruning import graph_groups
from cstar.models import build_model
from cstar.ranks import first_and_last

SPEC = DatasetSpec("synthetic", (3, 16, 16), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 0.03)
CIFAR = DatasetSpec("synthetic", (3, 32, 32), tuple(str(i) for i in range(10)), (0.5,) * 3, (0.25,) * 3, 8 / 255)
MOBILENET = "torchvision.models:mobilenet_v2"


class Branches(nn.Module):
    """Two branches concatenated, a residual add and a depthwise conv: no written-out channel rules."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.left = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16),
                                   nn.Conv2d(16, 20, 1, bias=False), nn.BatchNorm2d(20), nn.ReLU())
        self.merge = nn.Sequential(nn.Conv2d(32, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.again = nn.Sequential(nn.Conv2d(24, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24))
        self.head = nn.Linear(24, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.merge(torch.cat([self.left(x), self.right(x)], dim=1))
        x = torch.relu(x + self.again(x))
        return self.head(x.mean((2, 3)))


def make_branches(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """The factory `--model tests.cstar.test_graph_pruning:make_branches` names (digits: one channel)."""
    return Branches(num_classes, in_channels)


def _as_sets(groups: list) -> set[tuple[frozenset[str], frozenset[str]]]:
    return {(frozenset(g.producers), frozenset(g.consumers)) for g in groups}


@pytest.mark.parametrize("name", ["small-resnet", "resnet18", "preact-resnet18", "vgg16"])
def test_traced_groups_equal_the_written_rules_on_the_registry(name: str) -> None:
    """So the registry's pruned networks are the same whichever source gives the groups."""
    torch.manual_seed(0)
    model = build_model(name, SPEC, **({} if name == "vgg16" else {"width": 8}))
    assert _as_sets(graph_groups(model, SPEC.input_shape)) == _as_sets(channel_groups(model))


def _ratio(dense: nn.Module, pruned: nn.Module, shape: tuple[int, ...]) -> float:
    return model_cost(dense, shape, "params") / model_cost(pruned, shape, "params")


def _depthwise(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1}


def test_mobilenet_v2_prunes_to_the_budget_and_round_trips() -> None:
    torch.manual_seed(0)
    dense = build_model(MOBILENET, CIFAR).train()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    keep = first_and_last(dense)
    result = prune_to_budget(dense, CIFAR.input_shape, 2.0, "params", keep_dense=keep)
    assert 2.0 <= _ratio(dense, result.model, CIFAR.input_shape) <= 2.1
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())  # input unchanged, BN stats too
    assert dense.training and all(m.training for m in dense.modules())
    depthwise = _depthwise(result.model)
    assert len(depthwise) == len(_depthwise(dense)) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise.values())
    assert any(m.out_channels < _depthwise(dense)[n].out_channels for n, m in depthwise.items())
    modules, original = dict(result.model.named_modules()), dict(dense.named_modules())
    for name in keep:  # the kept-dense ends keep their weights' shapes, as CSTAR keeps them
        assert modules[name].weight.shape == original[name].weight.shape
    result.model.eval()
    rebuilt = apply_structure(build_model(MOBILENET, CIFAR), describe_structure(result.model))
    rebuilt.load_state_dict(result.model.state_dict())
    x = torch.rand(3, *CIFAR.input_shape)
    with torch.no_grad():
        assert (rebuilt.eval()(x) - result.model(x)).abs().max().item() <= 1e-6


def test_branches_that_concatenate_prune_and_keep_the_output() -> None:
    torch.manual_seed(0)
    model = Branches()
    groups = {g.name: g for g in graph_groups(model, SPEC.input_shape)}
    merged = [g for g in groups.values() if "merge.0" in g.consumers]
    assert {p for g in merged for p in g.producers} >= {"left.0", "right.2"}  # both halves of the cat feed merge
    residual = next(g for g in groups.values() if "again.0" in g.producers or "again.1" in g.producers)
    assert {"merge.0", "again.0"} <= set(residual.producers)  # the add ties merge's and again's channels
    result = prune_to_budget(model, SPEC.input_shape, 2.0, "params", keep_dense=())  # --compress-ends
    assert 2.0 <= _ratio(model, result.model, SPEC.input_shape) <= 2.3
    with torch.no_grad():
        out = result.model.eval()(torch.rand(2, *SPEC.input_shape))
    assert out.shape == (2, 10)  # the classifier's outputs are never pruned
    assert result.model.merge[0].in_channels == result.model.left[0].out_channels + result.model.right[2].out_channels


def test_missing_torch_pruning_is_one_error_naming_the_methods_that_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    with pytest.raises(CstarError, match="needs Torch-Pruning") as info:
        prune_to_budget(Branches(), SPEC.input_shape, 2.0, "params")
    assert "--method cstar" in (info.value.hint or "") and "torch-pruning" in (info.value.hint or "")


def test_an_untraceable_model_is_refused_naming_the_methods_that_work() -> None:
    class DataDependent(Branches):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > -1:
                raise RuntimeError("cannot trace")
            return super().forward(x)

    with pytest.raises(CstarError, match="cannot trace this model") as info:
        graph_groups(DataDependent(), SPEC.input_shape)
    assert "--method cstar" in (info.value.hint or "")


@pytest.mark.parametrize("method", ["prune", "hybrid"])
def test_pruned_mobilenet_v2_exports_with_parity(method: str, tmp_path) -> None:
    """A Torch-Pruning structure (depthwise convs pruned with their groups) through export: BN folded, parity."""
    from cstar.admm import Budget
    from cstar.checkpoint import save_checkpoint
    from cstar.compress import compress_structure
    from export.exporter import run_export
    from tests.cstar.test_import_path_models import with_trained_looking_bn

    torch.manual_seed(0)
    dense = build_model(MOBILENET, CIFAR, width_mult=0.5).eval()
    with_trained_looking_bn(dense)
    budget = Budget(2.0, "params", CIFAR.input_shape, first_and_last(dense))
    structure = compress_structure(dense, budget, method, sweeps=0)
    assert _ratio(dense, structure.model, CIFAR.input_shape) >= 2.0
    save_checkpoint(tmp_path / "ckpt", structure.model.eval(), "compress", MOBILENET, {"width_mult": 0.5}, CIFAR,
                    {"eps": 8 / 255, "norm": "linf", "metrics": {}, "ranks": structure.ranks(dense)})
    exported = run_export(tmp_path / "ckpt", tmp_path / "onnx", parity_samples=8, progress=False,
                          parity_data=(torch.rand(20, *CIFAR.input_shape), torch.arange(20) % 10))
    assert exported["parity"]["passed"] and exported["parity"]["max_abs_diff"] <= 1e-4
    assert "BatchNormalization" not in exported["onnx"]["nodes"]


def test_compress_stage_prunes_a_model_by_import_path(digits, tmp_path) -> None:
    """`cstar compress --method prune` on a network outside the registry: the stage prunes it through the traced
    groups, records the pruned layers, and the saved directory rebuilds the same network from its import path."""
    from cstar.checkpoint import load_checkpoint, save_checkpoint
    from cstar.compress import run_compress
    from cstar.data import to_tensors

    name = "tests.cstar.test_graph_pruning:make_branches"
    torch.manual_seed(0)
    dense = build_model(name, digits.spec).eval()
    save_checkpoint(tmp_path / "dense", dense, "train", name, {}, digits.spec,
                    {"eps": 0.1, "norm": "linf", "metrics": {}, "config": {"fixture": True}})
    tiny = {"admm_epochs": 0, "finetune_epochs": 1, "train_steps": 1, "eval_suite": "apgd", "eval_steps": 2,
            "eval_limit": 40, "eval_dense": False}
    manifest = run_compress(tmp_path / "dense", tmp_path / "pruned", ratio=2.0, method="prune", config=tiny,
                            progress=False)
    assert manifest["compression"]["params_ratio"] >= 2.0
    assert manifest["model"]["name"] == name
    assert any(entry["kind"] == "pruned" for entry in manifest["ranks"].values())
    assert manifest["ranks"]["net.head"]["ranks"][0] == 10  # the classifier's outputs are never pruned
    model, _ = load_checkpoint(tmp_path / "pruned")
    images, _ = to_tensors(digits.test, limit=8)
    with torch.no_grad():
        assert model(images).shape == (8, 10)
