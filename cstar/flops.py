"""Parameter and FLOP counts measured on the real model (forward hooks, one sample).

FLOPs here are multiply-accumulates (MACs) of Conv2d, Linear and the factorized layers, the
quantity low-rank factorization changes; elementwise ops are left out (they do not change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from cstar.lowrank import LowRankConv2d, LowRankLinear


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _conv_macs(conv: nn.Conv2d, output: torch.Tensor) -> int:
    kh, kw = conv.kernel_size
    per_position = (conv.in_channels // conv.groups) * kh * kw * conv.out_channels
    return int(per_position * output.shape[-1] * output.shape[-2])


def _lowrank_conv_macs(layer: LowRankConv2d, inputs: torch.Tensor, output: torch.Tensor) -> int:
    r_out, r_in = layer.ranks
    kh, kw = layer.kernel_size
    in_positions = inputs.shape[-1] * inputs.shape[-2]
    out_positions = output.shape[-1] * output.shape[-2]
    return int(in_positions * layer.in_channels * r_in + out_positions * (r_in * kh * kw * r_out + r_out * layer.out_channels))


def count_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass on a single input of shape C x H x W."""
    total = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, LowRankConv2d):
            total += _lowrank_conv_macs(module, inputs[0], output)
        elif isinstance(module, nn.Conv2d):
            total += _conv_macs(module, output)
        elif isinstance(module, LowRankLinear):
            total += module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    probe_forward(model, input_shape, [(m, hook) for m in model.modules()
                                       if isinstance(m, (nn.Conv2d, nn.Linear, LowRankConv2d, LowRankLinear))])
    return total


def probe_forward(model: nn.Module, input_shape: Sequence[int], hooks: Iterable[tuple[nn.Module, Callable[..., Any]]]
                  ) -> None:
    """One eval-mode, no-grad forward pass of a zero input (batch 1) with forward `hooks` attached.

    What layer shapes, MACs and spatial sizes are read from; the hooks are removed and the model's
    training mode restored afterwards, whatever happens.
    """
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
