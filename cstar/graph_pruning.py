"""Channel groups and channel pruning of ANY torch graph, through Torch-Pruning's dependency graph.

The registry's CIFAR ResNets and VGG have hand-written channel groups (cstar.baselines); every other
network (torchvision models, a user's own `pkg.module:factory`: depthwise/grouped convolutions, branches
that concatenate, residual adds of any shape) gets its groups from Torch-Pruning (pip `torch-pruning`,
Fang et al., CVPR 2023), which traces one forward pass and couples every tensor dimension that must be
pruned together. The rest of robust pruning is shared: the same L1 importance, the same uniform keep
fraction found by binary search against the budget, the same kept-dense ends and width grid
(cstar.baselines.prune_to_budget). Torch-Pruning slices the layers (including depthwise convolutions,
whose channels go with the group that feeds them); the result is a real smaller network whose
`describe_structure` rebuilds it on load.

A test checks that on the registry models the traced groups equal the hand-written ones, so either
source gives the same pruned networks there.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from cstar.channels import ChannelGroup, group_size
from cstar.errors import CstarError

FIX_METHODS = "use --method cstar or --method lowrank-uniform (Tucker-2 keeps every layer's channels)"


def require_torch_pruning() -> Any:
    """The torch_pruning module, or one clear error saying how to get it."""
    try:
        import torch_pruning
    except ImportError:
        raise CstarError("structured pruning of this model needs Torch-Pruning (its channel dependency graph)",
                         "pip install 'cstar[train]' (it brings torch-pruning), or " + FIX_METHODS) from None
    return torch_pruning


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Trace in eval mode, so the forward pass does not move BatchNorm's running statistics."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


def output_layers(model: nn.Module, input_shape: tuple[int, ...]) -> list[nn.Module]:
    """The conv/linear layers executed last (their outputs are the model's outputs: never pruned)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod)) for m in model.modules()
             if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with _eval_mode(model), torch.no_grad():
            model(_example(model, input_shape))
    finally:
        for hook in hooks:
            hook.remove()
    return order[-1:]


def _example(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    return torch.zeros(1, *input_shape, device=device)


def dependency_graph(model: nn.Module, input_shape: tuple[int, ...]) -> Any:
    """Torch-Pruning's DependencyGraph of `model` traced on one zero image (eval mode: BN stats unchanged)."""
    tp = require_torch_pruning()
    try:
        with _eval_mode(model), torch.enable_grad():
            return tp.DependencyGraph().build_dependency(model, example_inputs=_example(model, input_shape))
    except Exception as error:  # a graph Torch-Pruning cannot trace: refuse, naming the methods that work
        raise CstarError(f"structured pruning cannot trace this model ({type(error).__name__}: {error})",
                         FIX_METHODS) from None


def _groups_of(graph: Any, model: nn.Module, input_shape: tuple[int, ...]) -> Iterator[tuple[nn.Module, Any]]:
    """(root layer, Torch-Pruning group) for every prunable group whose channels do not reach the output."""
    ignored = output_layers(model, input_shape)
    yield from ((group[0].dep.target.module, group)
                for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Linear)))


def graph_groups(model: nn.Module, input_shape: tuple[int, ...]) -> list[ChannelGroup]:
    """ChannelGroup for every channel group of `model` (named by its root layer): producers are
    the layers whose output channels the group removes (convs, depthwise convs, BatchNorm), consumers those
    whose input channels it removes."""
    graph = dependency_graph(model, input_shape)
    names = {module: name for name, module in model.named_modules()}
    groups = []
    for root, group in _groups_of(graph, model, input_shape):
        producers: list[str] = []
        consumers: list[str] = []
        for item in group:
            name = names.get(item.dep.target.module)
            if name is None or not isinstance(item.dep.target.module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                continue  # functional ops (add, cat, flatten) and parameters carry no weights of their own
            if graph.is_out_channel_pruning_fn(item.dep.handler):
                producers.append(name)
            elif graph.is_in_channel_pruning_fn(item.dep.handler):
                consumers.append(name)
        groups.append(ChannelGroup(names[root], list(dict.fromkeys(producers)), list(dict.fromkeys(consumers))))
    return groups


def prune_graph(model: nn.Module, keep: dict[str, torch.Tensor], groups: list[ChannelGroup],
                input_shape: tuple[int, ...]) -> nn.Module:
    """A copy of `model` where each group keeps the channel indices `keep[group.name]` (Torch-Pruning slices
    every coupled layer; the copy's own graph re-maps concatenations after each group)."""
    pruned = copy.deepcopy(model)
    graph = dependency_graph(pruned, input_shape)
    modules = dict(pruned.named_modules())
    for group in groups:
        kept = set(keep[group.name].tolist())
        remove = [index for index in range(group_size(model, group)) if index not in kept]
        if not remove:
            continue
        root = modules[group.name]
        pruning_fn = graph.get_pruner_of_module(root).prune_out_channels
        graph.get_pruning_group(root, pruning_fn, remove).prune()
    return pruned
