"""Deploy form: a plain-op copy of a cstar model (timm-style `to_deploy`).

Two passes over a deep copy in eval mode:

1. Replacement: each `LowRankConv2d` becomes its deploy form (export/forms.py: three-conv, merge-input,
   merge-output or dense; given per layer, by default the fewest-MACs one), then each module whose type
   has a rule (`register_deploy_rule`) is swapped for the rule's result. Built in: `LowRankLinear` ->
   Sequential(Linear, Linear), dropout -> Identity (and `LowRankConv2d` -> three convs for any left).
2. BatchNorm folding: a BatchNorm2d that directly follows a conv in the forward pass is folded into
   that conv's weight and bias (for a factorized conv, into its last 1x1 conv) and replaced by
   `nn.Identity`. Two kinds of knowledge say where this is safe:
   - a generic pass over plain `nn.Sequential` containers (child i a conv, child i+1 a BatchNorm2d),
     which covers VGG `features` and the ResNet shortcut / torchvision `downsample`;
   - fold rules keyed by block type (`register_fold_rule`), usually `pair_rule(("conv1", "bn1"), ...)`
     naming which conv attribute each BN attribute directly follows in that block's forward.
   Only registered types are touched: attribute names alone do not say the order (in a pre-activation
   block `bn2` follows `conv1`, not `conv2`).

Pre-activation ResNets: `PreActBlock.bn2` directly follows `conv1` and is folded into it; `bn1`
(before the ReLU that precedes `conv1`) and the network's `bn1_final` (after a residual add) cannot
be folded into a conv and stay as BatchNorm layers, which export as the standard ONNX
BatchNormalization op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

from cstar.lowrank import LowRankConv2d, LowRankLinear
from export.forms import apply_forms, choose_forms

DeployRule = Callable[[nn.Module], nn.Module]
FoldRule = Callable[[nn.Module], int]

_DEPLOY_RULES: dict[type[nn.Module], DeployRule] = {}
_FOLD_RULES: dict[type[nn.Module], FoldRule] = {}


def register_deploy_rule(module_type: type[nn.Module], rule: DeployRule) -> None:
    """Replace every module of `module_type` (or a subclass) by `rule(module)` in the deploy form."""
    _DEPLOY_RULES[module_type] = rule


def register_fold_rule(module_type: type[nn.Module], rule: FoldRule) -> None:
    """`rule(module)` folds BatchNorms of a `module_type` block in place and returns how many it folded."""
    _FOLD_RULES[module_type] = rule


def _lookup(registry: dict[type[nn.Module], Callable[[nn.Module], object]], module: nn.Module) -> object | None:
    for cls in type(module).__mro__:
        if cls in registry:
            return registry[cls]
    return None


# ------------------------------------------------------------------------------------ BN folding


def last_conv(module: nn.Module) -> nn.Conv2d | None:
    """The conv whose output is `module`'s output: the module itself, or a Sequential's last conv."""
    if isinstance(module, nn.Conv2d):
        return module
    if type(module) is nn.Sequential and len(module) > 0:
        return last_conv(module[-1])
    return None


def fold_bn_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold eval-mode `bn` (applied right after `conv`) into `conv`'s weight and bias, in place."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f"cannot fold BatchNorm2d({bn.num_features}) into a conv with {conv.out_channels} outputs")
    with torch.no_grad():
        mean = bn.running_mean if bn.running_mean is not None else torch.zeros(bn.num_features)
        var = bn.running_var if bn.running_var is not None else torch.ones(bn.num_features)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(mean)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(mean)
        scale = gamma / torch.sqrt(var + bn.eps)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(mean)
        conv.weight.copy_(conv.weight * scale.view(-1, 1, 1, 1))
        new_bias = (bias - mean) * scale + beta
        if conv.bias is None:
            conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            conv.bias.copy_(new_bias)


def _try_fold(conv_module: nn.Module | None, bn: nn.Module | None) -> bool:
    conv = last_conv(conv_module) if conv_module is not None else None
    if conv is None or not isinstance(bn, nn.BatchNorm2d) or bn.num_features != conv.out_channels:
        return False
    fold_bn_into_conv(conv, bn)
    return True


def pair_rule(*pairs: tuple[str, str]) -> FoldRule:
    """A fold rule for blocks whose forward applies attribute `bn` directly to the output of `conv`."""

    def rule(module: nn.Module) -> int:
        folded = 0
        for conv_name, bn_name in pairs:
            if _try_fold(getattr(module, conv_name, None), getattr(module, bn_name, None)):
                setattr(module, bn_name, nn.Identity())
                folded += 1
        return folded

    return rule


def fold_sequential(seq: nn.Sequential) -> int:
    """Fold every BatchNorm2d that directly follows a conv among a plain Sequential's children."""
    folded = 0
    names = list(seq._modules)
    for prev, name in zip(names, names[1:], strict=False):
        if _try_fold(seq._modules[prev], seq._modules[name]):
            seq._modules[name] = nn.Identity()
            folded += 1
    return folded


def fold_batchnorms(model: nn.Module) -> int:
    """Run the fold rules and the Sequential pass over every submodule; returns the number folded."""
    folded = 0
    for module in list(model.modules()):
        rule = _lookup(_FOLD_RULES, module)  # type: ignore[arg-type]
        if rule is not None:
            folded += rule(module)  # type: ignore[operator]
        if type(module) is nn.Sequential:
            folded += fold_sequential(module)
    return folded


# ------------------------------------------------------------------------------------ replacement


def _replace(module: nn.Module) -> nn.Module:
    rule = _lookup(_DEPLOY_RULES, module)  # type: ignore[arg-type]
    if rule is not None:
        return rule(module)  # type: ignore[operator]
    for name, child in list(module.named_children()):
        replaced = _replace(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def to_deploy(model: nn.Module, forms: dict[str, str] | None = None,
              input_shape: tuple[int, ...] | None = None) -> nn.Module:
    """A deep copy of `model` in eval mode with plain ops only and BatchNorms folded where possible.

    `forms` maps factorized-conv paths to deploy forms (`export.forms.choose_forms`); layers it does not
    name, or all of them when it is None, take the fewest-MACs form (counted at `input_shape` if given).
    """
    deployed = copy.deepcopy(model).eval()
    chosen = choose_forms(deployed, None, input_shape=input_shape)
    chosen.update(forms or {})
    deployed = _replace(apply_forms(deployed, chosen))
    fold_batchnorms(deployed)
    for parameter in deployed.parameters():
        parameter.requires_grad_(False)
    return deployed.eval()


def count_modules(model: nn.Module, module_type: type[nn.Module]) -> int:
    """How many submodules of `module_type` `model` holds."""
    return sum(isinstance(m, module_type) for m in model.modules())


# ------------------------------------------------------------------------------------ built-in rules


def _register_builtin_rules() -> None:
    from cstar import models

    register_deploy_rule(LowRankConv2d, lambda m: m.to_convs())  # type: ignore[operator]
    register_deploy_rule(LowRankLinear, lambda m: m.to_linears())  # type: ignore[operator]
    for dropout in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout):
        register_deploy_rule(dropout, lambda m: nn.Identity())
    register_fold_rule(models.BasicBlock, pair_rule(("conv1", "bn1"), ("conv2", "bn2")))
    register_fold_rule(models.PreActBlock, pair_rule(("conv1", "bn2")))
    register_fold_rule(models.CifarResNet, _cifar_resnet_rule)
    try:
        from torchvision.models import resnet as tv
    except ImportError:  # torchvision is optional for the deploy form
        return
    register_fold_rule(tv.ResNet, pair_rule(("conv1", "bn1")))
    register_fold_rule(tv.BasicBlock, pair_rule(("conv1", "bn1"), ("conv2", "bn2")))
    register_fold_rule(tv.Bottleneck, pair_rule(("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")))


def _cifar_resnet_rule(module: nn.Module) -> int:
    """Post-activation CIFAR ResNet: bn1 follows the stem conv (pre-activation nets have bn1 = Identity)."""
    if getattr(module, "preact", False):
        return 0
    return pair_rule(("conv1", "bn1"))(module)


_register_builtin_rules()
