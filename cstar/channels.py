"""A channel group: the output channels of some layers and the input channels of others that must be pruned
together (one concept, shared by the written-out rules of cstar.baselines and the traced ones of
cstar.graph_pruning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn


@dataclass
class ChannelGroup:
    """Channels that must be pruned together: producers' outputs (conv/bn) and consumers' inputs."""

    name: str
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)


def group_size(model: nn.Module, group: ChannelGroup) -> int:
    """The group's channel count (its first producer's output channels)."""
    return int(cast(torch.Tensor, model.get_submodule(group.producers[0]).weight).shape[0])
