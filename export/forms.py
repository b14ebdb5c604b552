"""Exact deploy forms of a Tucker-2 layer (`LowRankConv2d`) and the per-layer choice between them.

A Tucker-2 conv W = core x_1 U_out x_2 U_in can run as four plain-conv graphs, all the same function:

- "three-conv":   1x1 Cin->r_in, kxk r_in->r_out, 1x1 r_out->Cout (the unmerged layer)
- "merge-input":  kxk Cin->r_out (U_in merged into the core), then 1x1 r_out->Cout
- "merge-output": 1x1 Cin->r_in, then kxk r_in->Cout (U_out merged into the core)
- "dense":        one kxk Cin->Cout conv

The kxk conv always carries the layer's stride, padding and dilation; 1x1 convs run at stride 1 and
the bias sits on the last conv. Merging a 1x1 factor that has no bias into the kxk core is exact
(zero padding maps to zero through a bias-free 1x1 conv), so merges are done in float64 and cast.
Which form is fastest depends on the runtime (1x1 factors are memory-bound, every conv is an operator
launch): `choose_forms` takes it from a measured latency table, or from the MACs without one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from cstar.errors import CstarError
from cstar.flops import probe_forward
from cstar.latency_table import FORM_TIE_ORDER, fastest_form
from cstar.lowrank import LowRankConv2d

# Every deploy form, in the one tie order (cstar.latency_table.FORM_TIE_ORDER: unmerged first, dense last).
FORMS = FORM_TIE_ORDER
CONVS_PER_FORM = {"three-conv": 3, "merge-input": 2, "merge-output": 2, "dense": 1}


class FormTable(Protocol):
    """What `choose_forms` needs of a latency table (cstar.latency_table.LatencyTable)."""

    def form_ms(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                cin: int | None = None, cout: int | None = None) -> float: ...


@dataclass
class FormChoice:
    """The form chosen for one layer, why, and what each form costs (MACs; predicted ms with a table)."""

    form: str
    reason: str  # "table" or "macs"
    macs: dict[str, int]
    predicted_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"form": self.form, "reason": self.reason, "macs": dict(self.macs)}
        if self.predicted_ms:
            body["predicted_ms"] = dict(self.predicted_ms)
        return body


# ------------------------------------------------------------------------------------ building forms


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise CstarError(f"unknown deploy form '{form}'", f"use one of: {', '.join(FORMS)}")


def _kxk(layer: LowRankConv2d, cin: int, cout: int, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """The layer's spatial conv (its stride, padding, dilation) with the given weight and bias."""
    conv = nn.Conv2d(cin, cout, layer.kernel_size, layer.stride, layer.padding,  # type: ignore[arg-type]
                     layer.dilation, bias=bias is not None)  # type: ignore[arg-type]
    return _load(conv, weight, bias)


def _pointwise(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    """A 1x1 stride-1 conv computing `weight` (out x in) as a matrix."""
    cout, cin = weight.shape
    conv = nn.Conv2d(int(cin), int(cout), 1, bias=bias is not None)
    return _load(conv, weight.reshape(cout, cin, 1, 1), bias)


def _load(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Conv2d:
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None and conv.bias is not None:
            conv.bias.copy_(bias)
    return conv


def build_form(layer: LowRankConv2d, form: str) -> nn.Module:
    """Plain convs computing `layer` exactly in `form` (a Sequential, or one Conv2d for "dense")."""
    _check_form(form)
    if form == "three-conv":
        return layer.to_convs()
    dtype, device = layer.core.dtype, layer.core.device
    u_in, core, u_out = (t.detach().to(torch.float64) for t in (layer.u_in, layer.core, layer.u_out))
    bias = layer.bias.detach() if layer.bias is not None else None
    r_out, r_in = layer.ranks
    cin, cout = layer.in_channels, layer.out_channels
    result: nn.Module
    if form == "merge-input":
        merged = torch.einsum("rshw,si->rihw", core, u_in).to(dtype)
        result = nn.Sequential(_kxk(layer, cin, r_out, merged, None), _pointwise(u_out.to(dtype), bias))
    elif form == "merge-output":
        merged = torch.einsum("or,rshw->oshw", u_out, core).to(dtype)
        result = nn.Sequential(_pointwise(u_in.to(dtype), None), _kxk(layer, r_in, cout, merged, bias))
    else:
        dense = torch.einsum("or,rshw,si->oihw", u_out, core, u_in).to(dtype)
        result = _kxk(layer, cin, cout, dense, bias)
    return result.to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------ costs


def form_macs(layer: LowRankConv2d, form: str, in_positions: int, out_positions: int) -> int:
    """Multiply-accumulates of `layer` run as `form`; 1x1 factors before the kxk conv run at the input size."""
    _check_form(form)
    r_out, r_in = layer.ranks
    k = layer.kernel_size[0] * layer.kernel_size[1]
    cin, cout = layer.in_channels, layer.out_channels
    if form == "three-conv":
        return in_positions * cin * r_in + out_positions * (r_in * k * r_out + r_out * cout)
    if form == "merge-input":
        return out_positions * (cin * k * r_out + r_out * cout)
    if form == "merge-output":
        return in_positions * cin * r_in + out_positions * r_in * k * cout
    return out_positions * cin * k * cout


def factorized_layers(model: nn.Module) -> dict[str, LowRankConv2d]:
    """Every LowRankConv2d by module path (the same path the dense layer had: tables are keyed by it)."""
    return {name: m for name, m in model.named_modules() if name and isinstance(m, LowRankConv2d)}


def layer_positions(model: nn.Module, input_shape: tuple[int, ...] | None) -> dict[str, tuple[int, int]]:
    """(input, output) spatial positions of each factorized layer, from one forward pass at `input_shape`.

    Without an input shape the counts are per output position, with stride x stride input positions each
    (exact for 'same'-padded convs on even sizes; the choice only depends on the ratio).
    """
    layers = factorized_layers(model)
    if input_shape is None:
        return {name: (int(layer.stride[0] * layer.stride[1]), 1) for name, layer in layers.items()}
    positions: dict[str, tuple[int, int]] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            positions[name] = (int(inputs[0].shape[-2] * inputs[0].shape[-1]), int(output.shape[-2] * output.shape[-1]))

        return record

    probe_forward(model, input_shape, [(layer, hook(name)) for name, layer in layers.items()])
    return positions


# ------------------------------------------------------------------------------------ choice


def _fastest(costs: dict[str, Any]) -> str:
    """The cheapest form; exact ties follow FORM_TIE_ORDER, as in the latency model that budgeted it."""
    return fastest_form({form: costs[form] for form in FORMS})


def _table_ms(table: FormTable, name: str, layer: LowRankConv2d, batch: int) -> dict[str, float]:
    """Each form's ms at the layer's OWN widths: a pruned-then-factorized layer (hybrid) is narrower than the
    layer the table profiled, and priced at full width its choice would differ from the one the prediction
    (cstar.latency) priced."""
    r_out, r_in = layer.ranks
    return {form: float(table.form_ms(name, form, None if form == "dense" else (r_in, r_out), batch,
                                      layer.in_channels, layer.out_channels)) for form in FORMS}


def _in_table(table: FormTable, name: str) -> bool:
    names = getattr(table, "layer_names", None)
    return True if names is None else name in set(names())


def choose_form_details(model: nn.Module, table: FormTable | None = None, batch: int = 1,
                        input_shape: tuple[int, ...] | None = None) -> dict[str, FormChoice]:
    """Per factorized layer: the fastest form by `table.form_ms` (layers the table lacks: fewest MACs)."""
    if batch < 1:
        raise CstarError(f"latency batch must be >= 1, got {batch}", "pass a positive batch size")
    positions = layer_positions(model, input_shape)
    choices: dict[str, FormChoice] = {}
    for name, layer in factorized_layers(model).items():
        pin, pout = positions.get(name, (1, 1))
        macs = {form: form_macs(layer, form, pin, pout) for form in FORMS}
        if table is not None and _in_table(table, name):
            ms = _table_ms(table, name, layer, batch)
            choices[name] = FormChoice(_fastest(ms), "table", macs, ms)
        else:
            choices[name] = FormChoice(_fastest(macs), "macs", macs)
    return choices


def choose_forms(model: nn.Module, table: FormTable | None = None, batch: int = 1,
                 input_shape: tuple[int, ...] | None = None) -> dict[str, str]:
    """{layer path: form}: fastest by the latency table, else fewest MACs (at `input_shape` when given)."""
    return {name: choice.form for name, choice in choose_form_details(model, table, batch, input_shape).items()}


def apply_forms(model: nn.Module, forms: dict[str, str]) -> nn.Module:
    """Replace, in place, each LowRankConv2d named in `forms` by that form; returns `model`."""
    layers = factorized_layers(model)
    unknown = sorted(set(forms) - set(layers))
    if unknown:
        raise CstarError(f"deploy forms name layers that are not factorized convs: {', '.join(unknown[:5])}",
                         "name LowRankConv2d layers by their module path (e.g. 'layer1.0.conv1')")
    for name, form in forms.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, build_form(layers[name], form))
    return model
