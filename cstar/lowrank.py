"""Factorized layers: Tucker-2 convolutions and low-rank linear layers.

`LowRankConv2d` holds a conv weight W (Cout x Cin x kh x kw) as
    W = core x_1 U_out x_2 U_in,   U_in: r_in x Cin,  core: r_out x r_in x kh x kw,  U_out: Cout x r_out
and runs it as three convolutions: 1x1 (Cin -> r_in), kxk core (r_in -> r_out, the original stride,
padding, dilation), 1x1 (r_out -> Cout, the bias). `LowRankLinear` holds W = U V (rank r).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LowRankConv2d(nn.Module):
    """Tucker-2 factorized Conv2d (groups=1), executed as 1x1 -> kxk -> 1x1 convolutions."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        ranks: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        bias: bool = False,
        padding_mode: str = "zeros",
        init: bool = True,
    ) -> None:
        super().__init__()
        r_out, r_in = ranks
        if not (1 <= r_out <= out_channels and 1 <= r_in <= in_channels):
            raise ValueError(f"ranks {ranks} out of range for a {out_channels}x{in_channels} conv")
        if padding_mode != "zeros":
            raise ValueError("LowRankConv2d supports padding_mode='zeros' only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.ranks = (int(r_out), int(r_in))
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self.u_in = nn.Parameter(torch.empty(r_in, in_channels))
        self.core = nn.Parameter(torch.empty(r_out, r_in, *self.kernel_size))
        self.u_out = nn.Parameter(torch.empty(out_channels, r_out))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        if init:  # skipped when weights are loaded right after (checkpoints): the QR is costly on big layers
            nn.init.orthogonal_(self.u_in)
            nn.init.orthogonal_(self.u_out)
            nn.init.kaiming_normal_(self.core)

    @classmethod
    def from_factors(
        cls,
        conv: nn.Conv2d,
        u_out: torch.Tensor,
        core: torch.Tensor,
        u_in: torch.Tensor,
    ) -> LowRankConv2d:
        """Build from the geometry of `conv` and given factors (U_out: Cout x r_out, U_in: r_in x Cin)."""
        if conv.groups != 1:
            raise ValueError(f"LowRankConv2d needs groups=1, got groups={conv.groups}")
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            (int(core.shape[0]), int(core.shape[1])),
            stride=conv.stride,  # type: ignore[arg-type]
            padding=conv.padding,  # type: ignore[arg-type]
            dilation=conv.dilation,  # type: ignore[arg-type]
            bias=conv.bias is not None,
        )
        with torch.no_grad():
            layer.u_out.copy_(u_out)
            layer.core.copy_(core)
            layer.u_in.copy_(u_in)
            if conv.bias is not None and layer.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer.to(conv.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r_out, r_in = self.ranks
        out = F.conv2d(x, self.u_in.view(r_in, self.in_channels, 1, 1))
        out = F.conv2d(out, self.core, None, self.stride, self.padding, self.dilation)
        return F.conv2d(out, self.u_out.view(self.out_channels, r_out, 1, 1), self.bias)

    def dense_weight(self) -> torch.Tensor:
        """The full Cout x Cin x kh x kw weight the factors represent."""
        return torch.einsum("or,rshw,si->oihw", self.u_out, self.core, self.u_in)

    def to_convs(self) -> nn.Sequential:
        """The deploy form: three plain Conv2d layers computing exactly this layer."""
        r_out, r_in = self.ranks
        first = nn.Conv2d(self.in_channels, r_in, 1, bias=False)
        middle = nn.Conv2d(
            r_in, r_out, self.kernel_size, self.stride, self.padding, self.dilation, bias=False  # type: ignore[arg-type]
        )
        last = nn.Conv2d(r_out, self.out_channels, 1, bias=self.bias is not None)
        with torch.no_grad():
            first.weight.copy_(self.u_in.view(r_in, self.in_channels, 1, 1))
            middle.weight.copy_(self.core)
            last.weight.copy_(self.u_out.view(self.out_channels, r_out, 1, 1))
            if self.bias is not None:
                last.bias.copy_(self.bias)  # type: ignore[union-attr]
        return nn.Sequential(first, middle, last).to(self.core.device)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, ranks={self.ranks}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class LowRankLinear(nn.Module):
    """Rank-r factorized Linear: y = U (V x) + b, executed as two matrix products."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, init: bool = True) -> None:
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ValueError(f"rank {rank} out of range for a {out_features}x{in_features} linear layer")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = int(rank)
        self.v = nn.Parameter(torch.empty(rank, in_features))
        self.u = nn.Parameter(torch.empty(out_features, rank))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        if init:
            nn.init.orthogonal_(self.v)
            nn.init.orthogonal_(self.u)

    @classmethod
    def from_factors(cls, linear: nn.Linear, u: torch.Tensor, v: torch.Tensor) -> LowRankLinear:
        layer = cls(linear.in_features, linear.out_features, int(v.shape[0]), bias=linear.bias is not None)
        with torch.no_grad():
            layer.u.copy_(u)
            layer.v.copy_(v)
            if linear.bias is not None and layer.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer.to(linear.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.v), self.u, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.u @ self.v

    def to_linears(self) -> nn.Sequential:
        """The deploy form: two plain Linear layers."""
        first = nn.Linear(self.in_features, self.rank, bias=False)
        second = nn.Linear(self.rank, self.out_features, bias=self.bias is not None)
        with torch.no_grad():
            first.weight.copy_(self.v)
            second.weight.copy_(self.u)
            if self.bias is not None:
                second.bias.copy_(self.bias)
        return nn.Sequential(first, second).to(self.u.device)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, bias={self.bias is not None}"
