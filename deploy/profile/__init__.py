"""`cstar profile`: a latency table measured ON the target runtime for the candidate layers of a model.

    cstar profile --model-from DIR --backend ort-cpu [--threads 1] [--batch-sizes 1,8] [--ranks 4,8,16,...]
                  --out TABLE.json

For every candidate layer (conv and linear layers, the ends included) of the model in DIR (a train or
compress stage directory: the DENSE architecture of its model is profiled, random weights), single-op
ONNX micro-graphs written with `onnx.helper` are timed through the backend registry (so any runner
works): the layer's own op (kxk Conv with its kernel/stride/padding/dilation and input size, or
Flatten+Gemm) on a grid of (cin', cout') channel counts, and the 1x1 factor convs cin' -> r (at the
input size) and r -> cout' (at the output size). The grid (cstar.latency_table.channel_grid) holds
small ranks and multiples of 8 and 16 up to the full width: latency is not monotone in channel count.
Each micro-graph has a dynamic batch dimension (one session serves every batch size); identical ops
are timed once. Per-call overhead is measured on a trivial graph and subtracted. The whole dense model
is exported to ONNX in a temporary directory (export.onnx_export, BatchNorm folded) and timed too.
Timing: `warmup` untimed calls, then the median of `iters` timed runtime calls (deploy.bench.time_batch).
Last (unless --no-calibrate), the table's in-model price is fitted on whole reference models
(deploy.profile.fit: uniform Tucker-2, uniform pruning and the latency allocator's own picks).

The package, one concept per module: `specs` (what to time), `graphs` (the micro-graphs), `timer`
(`MicroTimer`), `table` (the table body and its calibration) and `stage` (the command). Everything
but `stage.run_profile` and what it calls to build and export the model is torch-free.
"""

from deploy.profile.graphs import OPSET, chain_graph, op_graph, trivial_graph
from deploy.profile.specs import LayerSpec, OpSpec, ProfileSettings
from deploy.profile.stage import (
    add_arguments,
    calibration_iters,
    dense_model,
    dense_model_onnx,
    main,
    run_profile,
    settings_from_args,
)
from deploy.profile.table import (
    PROGRESS,
    cache_bytes,
    calibrate,
    machine_record,
    profile_layers,
    runtime_of,
    write_table,
)
from deploy.profile.timer import (
    CALIBRATION_ROUNDS,
    KERNEL_TIMING_BACKENDS,
    LAYER_KERNELS,
    MIN_NET_FRACTION,
    NODE_CHAIN,
    MicroTimer,
    kernel_medians,
    net_ms,
)

__all__ = [
    "CALIBRATION_ROUNDS", "KERNEL_TIMING_BACKENDS", "LAYER_KERNELS", "MIN_NET_FRACTION", "NODE_CHAIN", "OPSET",
    "PROGRESS", "LayerSpec", "MicroTimer", "OpSpec", "ProfileSettings", "add_arguments", "cache_bytes", "calibrate",
    "calibration_iters", "chain_graph", "dense_model", "dense_model_onnx", "kernel_medians", "machine_record", "main",
    "net_ms", "op_graph", "profile_layers", "run_profile", "runtime_of", "settings_from_args", "trivial_graph",
    "write_table",
]
