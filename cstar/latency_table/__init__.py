"""Latency tables measured on a target runtime (`cstar profile`), read by the allocator and the exporter.

Torch-free (numpy + json): the device side writes these tables and reads them back. A table prices,
for every candidate layer of one model (keyed by its module path, e.g. "layer1.0.conv1"), three ops
on a grid of channel counts, per batch size, in milliseconds net of the runtime's per-call overhead:

- "conv":       the layer's own op (kxk conv with its stride/padding/dilation, or the Gemm of a Linear)
                at (cin', cout') on (in_grid x out_grid): prices the dense, pruned and Tucker-core convs;
- "in_factor":  a 1x1 conv cin' -> r at the layer's input size on (in_grid x in_grid);
- "out_factor": a 1x1 conv r -> cout' at the layer's output size on (out_grid x out_grid).

Between grid points the cost is piecewise linear in each channel count (bilinear on the 2-D grid);
beyond the grid it is the nearest edge. Latency is not monotone in channel count (SIMD widths), so the
grid holds multiples of 8 and 16 plus small ranks (`channel_grid`). The deploy forms of a Tucker-2
layer (ranks (r_in, r_out)) are priced as sums of these ops (see DEPLOY_FORMS).

A micro-graph runs its one op again and again, so its weights stay in cache; inside a whole model an
op runs slower, and a layer's weights beyond the per-core cache (`cache_bytes`) stream from memory on
every call. `price` turns an op's (or a model's) `CostParts` into ms inside a model:
op_scale[batch] x its ms alone + weight_ms_per_mb[batch] x its MiB beyond the cache + stream_ms_per_mb[batch]
x all its weight MiB (inside a model whose weights exceed the per-core cache, none of them is still there
when its op runs again) + node_ms[batch] x its extra nodes. A whole model also pays `spill_ms(batch)`:
spill_ms_per_mb[batch] x its weight MiB beyond spill_cache_mib[batch], the shared cache the model's weights
stay in between calls (fitted: on a VM whose L3 other tenants also use, it is far below the L3's size; a
model above it reads its weights from memory, one below from L3). That term is not a sum over layers, so
`model_price` adds it to the summed parts and the allocator meets it as a second linear budget
(cstar.latency.latency_limits). `cstar profile` fits these coefficients on whole models (the dense one and
reference compressed ones, deploy.profile.fit / cstar.latency_fit; the fit is kept in
`calibration`); without that step they come from the dense model alone (no stream, no spill). What the table's
layers do not cover ("rest": activations, adds, pooling, the call itself) is `rest_ms[batch]` when the
profile measured it (ort-cpu: the call overhead plus every other node's kernel time inside the dense
model), else the measured model minus its calibrated dense layers. Kernel-timed tables (ort-cpu) also
charge `node_ms[batch]`, what one more small node costs in a call, for every conv a deploy form runs
beyond the dense layer's one: at batch 1 on a small model that dispatch cost decides whether
factorizing pays.

The package, one concept per module: `forms` (deploy forms and their tie rule), `grid` (channel grid,
interpolation), `batches` (`--latency-batch`), `geometry` (a layer's entry, `CostParts`), `schema` (safe
reading) and `table` (`LatencyTable`).
"""

from cstar.latency_table.batches import LatencyBatches, current_cpu_model, latency_batches
from cstar.latency_table.forms import (
    DEPLOY_FORMS,
    EXTRA_NODES,
    FACTORIZED_FORMS,
    FORM_TIE_ORDER,
    fastest_form,
)
from cstar.latency_table.geometry import MIB, CostParts, LayerEntry, LayerGeometry
from cstar.latency_table.grid import (
    DEFAULT_GRID_CAP,
    GRID_POINTS,
    LAYER_TYPES,
    OPS,
    channel_grid,
    interpolate,
)
from cstar.latency_table.schema import PROFILE_FIX, TABLE_KIND, TABLE_SCHEMA_VERSION
from cstar.latency_table.table import LatencyTable

__all__ = [
    "DEFAULT_GRID_CAP", "DEPLOY_FORMS", "EXTRA_NODES", "FACTORIZED_FORMS", "FORM_TIE_ORDER", "GRID_POINTS",
    "LAYER_TYPES", "MIB", "OPS", "PROFILE_FIX", "TABLE_KIND", "TABLE_SCHEMA_VERSION", "CostParts", "LatencyBatches",
    "LatencyTable", "LayerEntry", "LayerGeometry", "channel_grid", "current_cpu_model", "fastest_form",
    "interpolate", "latency_batches",
]
