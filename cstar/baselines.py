"""Baselines at the same budget as CSTAR: robust structured channel pruning and uniform post-hoc Tucker-2.

Pruning removes whole channels and produces a real, smaller dense network (Conv2d/BatchNorm2d/Linear
modules replaced by smaller ones), never masks, so `describe_structure` records the new shapes.
Channels are grouped by what must agree: a block's inner channels (conv1 out = bn1 = conv2 in) and
a stage's residual stream (every tensor added together, the stem output for the first stage, the
next layers' inputs). Each group keeps the same fraction f of its channels (Li et al. 2017 style
uniform filter pruning), ranked by filter L1 norm summed over the group's producing convs (each
conv's norms divided by their mean so convs are weighed equally); f is the largest fraction meeting
the params/FLOPs budget. Adversarial fine-tuning is done by the caller (cstar.compress) with the
same recipe and epoch budget as CSTAR.

Same budget as CSTAR (issue 15): layers CSTAR keeps dense (`keep_dense`, by default the stem conv and
the classifier, cstar.ranks.first_and_last) keep their weights here too. A conv's output channels are
tied to its channel group, so a group that a kept layer produces (the stem -> the first stage's residual
stream) or consumes (the classifier <- the last stage's stream) is not pruned; the other groups share
the fraction f. `--compress-ends` (no kept layers) prunes every group, as CSTAR then factorizes the ends.

Any other graph (torchvision models, a user's `package.module:factory`) gets its groups from Torch-Pruning's
dependency graph (cstar.graph_pruning), given the input shape; importance, fraction search, kept ends and
width grid are the same code.

Uniform low-rank: every factorizable layer gets the same rank fraction (no ADMM, no global
allocation), Tucker-2 by HOSVD + HOOI, then the same adversarial fine-tuning.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from cstar.budget import model_cost
from cstar.channels import ChannelGroup, group_size
from cstar.checkpoint import set_submodule
from cstar.errors import CstarError, UnreachableBudget
from cstar.lowrank import LowRankConv2d, LowRankLinear
from cstar.models import VGG, BasicBlock, CifarResNet, PreActBlock
from cstar.ranks import largest_fraction_within


def has_written_groups(model: nn.Module) -> bool:
    """True for the registry's CIFAR ResNets and VGG, whose channel groups are written out here."""
    return isinstance(getattr(model, "net", None), (CifarResNet, VGG))


def channel_groups(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> list[ChannelGroup]:
    """Prunable channel groups: written out for the registry's CIFAR ResNets (BasicBlock, PreActBlock) and VGG;
    for any other graph traced by Torch-Pruning at `input_shape` (cstar.graph_pruning)."""
    net = getattr(model, "net", None)
    if isinstance(net, CifarResNet):
        return _preact_groups(net, "net.") if net.preact else _resnet_groups(net, "net.")
    if isinstance(net, VGG):
        return _vgg_groups(net, "net.")
    if input_shape is not None:
        from cstar.graph_pruning import graph_groups

        return graph_groups(model, input_shape)
    raise CstarError(
        f"structured pruning without an input shape supports small-resnet, resnet18, preact-resnet18 and vgg16, "
        f"not {type(net if net is not None else model).__name__}",
        "use --method cstar or --method lowrank-uniform for this model",
    )


def _resnet_groups(net: CifarResNet, prefix: str) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    stream = ChannelGroup(f"{prefix}stem", [f"{prefix}conv1", f"{prefix}bn1"], [])
    for stage in range(1, net.num_stages + 1):
        for index, block in enumerate(getattr(net, f"layer{stage}")):
            if not isinstance(block, BasicBlock):
                raise CstarError("structured pruning supports BasicBlock ResNets only", "use --method cstar")
            name = f"{prefix}layer{stage}.{index}"
            stream.consumers.append(f"{name}.conv1")
            groups.append(ChannelGroup(f"{name}.inner", [f"{name}.conv1", f"{name}.bn1"], [f"{name}.conv2"]))
            if len(block.shortcut) > 0:
                stream.consumers.append(f"{name}.shortcut.0")
                groups.append(stream)
                stream = ChannelGroup(
                    f"{prefix}layer{stage}", [f"{name}.conv2", f"{name}.bn2", f"{name}.shortcut.0", f"{name}.shortcut.1"]
                )
            else:
                stream.producers += [f"{name}.conv2", f"{name}.bn2"]
    stream.consumers.append(f"{prefix}fc")
    groups.append(stream)
    return groups


def _preact_groups(net: CifarResNet, prefix: str) -> list[ChannelGroup]:
    """Groups of a pre-activation ResNet: a block's bn1 normalizes the residual stream, so it is sliced with the
    stream (listed with its producers); conv1 + bn2 are the block's inner group; bn1_final closes the last stream."""
    groups: list[ChannelGroup] = []
    stream = ChannelGroup(f"{prefix}stem", [f"{prefix}conv1"], [])
    for stage in range(1, net.num_stages + 1):
        for index, block in enumerate(getattr(net, f"layer{stage}")):
            if not isinstance(block, PreActBlock):
                raise CstarError("structured pruning supports PreActBlock pre-activation ResNets only",
                                 "use --method cstar")
            name = f"{prefix}layer{stage}.{index}"
            stream.producers.append(f"{name}.bn1")
            stream.consumers.append(f"{name}.conv1")
            groups.append(ChannelGroup(f"{name}.inner", [f"{name}.conv1", f"{name}.bn2"], [f"{name}.conv2"]))
            if block.shortcut is not None:
                stream.consumers.append(f"{name}.shortcut.0")
                groups.append(stream)
                stream = ChannelGroup(f"{prefix}layer{stage}", [f"{name}.conv2", f"{name}.shortcut.0"])
            else:
                stream.producers.append(f"{name}.conv2")
    stream.producers.append(f"{prefix}bn1_final")
    stream.consumers.append(f"{prefix}fc")
    groups.append(stream)
    return groups


def _vgg_groups(net: VGG, prefix: str) -> list[ChannelGroup]:
    groups: list[ChannelGroup] = []
    current: ChannelGroup | None = None
    for index, module in enumerate(net.features):
        name = f"{prefix}features.{index}"
        if isinstance(module, nn.Conv2d):
            if current is not None:
                current.consumers.append(name)
                groups.append(current)
            current = ChannelGroup(name, [name])
        elif isinstance(module, nn.BatchNorm2d) and current is not None:
            current.producers.append(name)
    if current is not None:
        current.consumers.append(f"{prefix}classifier")
        groups.append(current)
    return groups


def channel_importance(model: nn.Module, group: ChannelGroup) -> torch.Tensor:
    """Per-channel L1 filter norm summed over the group's producing convs and linears (each normalized by its
    mean)."""
    modules = dict(model.named_modules())
    score: torch.Tensor | None = None
    for name in group.producers:
        module = modules[name]
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            norms = module.weight.detach().abs().flatten(1).sum(1).double()
            norms = norms / norms.mean().clamp_min(1e-12)
            score = norms if score is None else score + norms
    if score is None:
        raise ValueError(f"group {group.name} has no producing conv")
    return score


def prune_channels(model: nn.Module, keep: dict[str, torch.Tensor], groups: list[ChannelGroup],
                   input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A copy of `model` where each group keeps channel indices `keep[group.name]` (real smaller layers).
    Groups traced by Torch-Pruning (a model without written-out groups, given `input_shape`) are pruned by it."""
    if input_shape is not None and not has_written_groups(model):
        from cstar.graph_pruning import prune_graph

        return prune_graph(model, keep, groups, input_shape)
    pruned = copy.deepcopy(model)
    out_index: dict[str, torch.Tensor] = {}
    in_index: dict[str, torch.Tensor] = {}
    for group in groups:
        index = keep[group.name]
        for name in group.producers:
            out_index[name] = index
        for name in group.consumers:
            in_index[name] = index
    modules = dict(pruned.named_modules())
    for name in sorted(set(out_index) | set(in_index)):
        set_submodule(pruned, name, _slice_module(modules[name], out_index.get(name), in_index.get(name)))
    return pruned


def _slice_module(module: nn.Module, out_idx: torch.Tensor | None, in_idx: torch.Tensor | None) -> nn.Module:
    """A smaller copy of a Conv2d/BatchNorm2d/Linear keeping the given output/input channels."""
    new: nn.BatchNorm2d | nn.Conv2d | nn.Linear
    with torch.no_grad():
        if isinstance(module, nn.BatchNorm2d):
            assert out_idx is not None
            new = nn.BatchNorm2d(len(out_idx), module.eps, module.momentum, module.affine, module.track_running_stats)
            for key in ("weight", "bias", "running_mean", "running_var"):
                source = getattr(module, key)
                if source is not None:
                    getattr(new, key).copy_(source[out_idx])
            if module.num_batches_tracked is not None:
                assert new.num_batches_tracked is not None  # same track_running_stats as `module`
                new.num_batches_tracked.copy_(module.num_batches_tracked)
            return new.to(module.weight.device)
        weight = cast(torch.Tensor, module.weight)
        if out_idx is not None:
            weight = weight[out_idx]
        if in_idx is not None:
            weight = weight[:, in_idx]
        module_bias = cast("torch.Tensor | None", module.bias)
        bias = module_bias[out_idx] if module_bias is not None and out_idx is not None else module_bias
        if isinstance(module, nn.Conv2d):
            if module.groups != 1:
                raise CstarError("structured pruning of grouped convolutions is not supported", "use --method cstar")
            new = nn.Conv2d(weight.shape[1], weight.shape[0], module.kernel_size, module.stride,  # type: ignore[arg-type]
                            module.padding, module.dilation, 1, bias is not None)  # type: ignore[arg-type]
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)  # type: ignore[union-attr]
        return new.to(weight.device)


def frozen_groups(groups: list[ChannelGroup], keep_dense: tuple[str, ...]) -> list[str]:
    """Names of the groups a kept-dense layer produces or consumes: pruning them would reshape that layer."""
    kept = set(keep_dense)
    return [g.name for g in groups if kept & (set(g.producers) | set(g.consumers))]


# The kept-channel counts a group of `n` channels may take, ascending (e.g. a latency table's channel grid:
# off the grid a width is neither measured nor, often, on the runtime's fast kernel path).
WidthOptions = Callable[[ChannelGroup, int], Sequence[int]]


def snap_count(count: float, options: Sequence[int]) -> int:
    """The largest of `options` <= `count` (the smallest option when none is)."""
    below = [option for option in options if option <= count]
    return max(below) if below else min(options)


def keep_indices(model: nn.Module, groups: list[ChannelGroup], fraction: float,
                 frozen: tuple[str, ...] | list[str] = (), widths: WidthOptions | None = None
                 ) -> dict[str, torch.Tensor]:
    """Top-`fraction` channels of every group by importance (at least one), in original order;
    every channel of the `frozen` groups. `widths`: the counts a group may keep (rounded down to one)."""
    keep = {}
    for group in groups:
        score = channel_importance(model, group)
        if group.name in frozen:
            keep[group.name] = torch.arange(score.numel(), device=score.device)
            continue
        count = max(1, min(score.numel(), math.ceil(fraction * score.numel())))
        if widths is not None:
            count = max(1, min(score.numel(), snap_count(count, widths(group, score.numel()))))
        keep[group.name] = torch.sort(torch.topk(score, count).indices).values
    return keep


@dataclass
class PruneResult:
    """The pruned model, the fraction of channels kept, {group: (kept, total)} and the unpruned groups."""

    model: nn.Module
    fraction: float
    kept: dict[str, tuple[int, int]]
    frozen: list[str] = field(default_factory=list)  # groups left whole because a kept-dense layer touches them


CostFn = Callable[[nn.Module], float]  # a model's budget cost (params, MACs, predicted latency, ...)


def prune_to_budget(model: nn.Module, input_shape: tuple[int, ...], ratio: float, by: str = "params",
                    keep_dense: tuple[str, ...] = (), cost: CostFn | None = None,
                    widths: WidthOptions | None = None) -> PruneResult:
    """Largest uniform keep fraction whose pruned network meets dense_cost / ratio (binary search).

    `keep_dense`: layers whose weights must keep their shape (their groups are not pruned);
    `cost`: the budget's cost of a model (default: params or MACs as `by` says), so any cost model plugs in;
    `widths`: the kept counts each group may take (a latency table's grid), each group rounded down to one.
    """
    measure: CostFn = cost if cost is not None else (lambda m: model_cost(m, input_shape, by))
    groups = channel_groups(model, input_shape)
    frozen = frozen_groups(groups, keep_dense)
    dense = measure(model)
    target = dense / ratio

    def pruned_at(fraction: float) -> nn.Module:
        return prune_channels(model, keep_indices(model, groups, fraction, frozen, widths), groups, input_shape)

    smallest = measure(pruned_at(0.0))
    if smallest > target:
        ends = " with the first/last layers kept dense" if frozen else ""
        raise UnreachableBudget(
            f"a {by} ratio of {ratio:g} is not reachable by pruning{ends}: one channel per group gives at most "
            f"{dense / smallest:.2f}x (the best reachable ratio)",
            "pass a smaller --ratio" + (", or --compress-ends" if frozen else "") + ", or use --method cstar",
            dense / smallest,
        )
    low = largest_fraction_within(lambda fraction: measure(pruned_at(fraction)), target, iterations=20)
    keep = keep_indices(model, groups, low, frozen, widths)
    kept = {g.name: (int(keep[g.name].numel()), group_size(model, g)) for g in groups}
    return PruneResult(prune_channels(model, keep, groups, input_shape), low, kept, frozen)


def pruned_rank_map(dense: nn.Module, pruned: nn.Module) -> dict[str, dict]:
    """Manifest `ranks` entries of a pruned (or pruned then factorized) model, keyed by the dense layer names.

    kind 'pruned' (ranks = kept out/in channels) or 'dense' (shape unchanged) for plain layers; 'tucker2' /
    'svd' (ranks as cstar.admm.rank_map) for factorized ones, with `channels` = their kept [out, in]
    channels where pruning narrowed them. `shape` is always the dense layer's.
    """
    before = dict(dense.named_modules())
    entries: dict[str, dict] = {}
    for name, module in pruned.named_modules():
        if name not in before or not isinstance(before[name], (nn.Conv2d, nn.Linear)):
            continue
        shape = list(cast(torch.Tensor, before[name].weight).shape)
        if isinstance(module, (LowRankConv2d, LowRankLinear)):
            factorized = isinstance(module, LowRankConv2d)
            channels = ([module.out_channels, module.in_channels] if isinstance(module, LowRankConv2d)
                        else [module.out_features, module.in_features])
            entry: dict = {"kind": "tucker2" if factorized else "svd",
                           "ranks": list(module.ranks) if isinstance(module, LowRankConv2d) else [module.rank],
                           "shape": shape}
            if channels != shape[:2]:
                entry["channels"] = channels
            entries[name] = entry
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            kept = [int(module.weight.shape[0]), int(module.weight.shape[1])]
            entries[name] = {"kind": "dense" if kept == shape[:2] else "pruned", "ranks": kept, "shape": shape}
    return entries
