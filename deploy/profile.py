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
(deploy.profile_calibration: uniform Tucker-2, uniform pruning and the latency allocator's own picks).

The timing side (everything but `main` and `dense_model_onnx`) is torch-free.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.latency_table import (
    DEFAULT_GRID_CAP,
    MIB,
    OPS,
    TABLE_KIND,
    TABLE_SCHEMA_VERSION,
    LatencyTable,
    LayerGeometry,
    channel_grid,
)
from cstar.manifest import atomic_write_json

OPSET = 17
MIN_NET_FRACTION = 0.05  # a micro-graph timed below the call overhead is noise: keep 5% of its raw time
PROGRESS = Callable[[int, int], None]


@dataclass(frozen=True)
class OpSpec:
    """One timed micro-graph: a Conv (or Flatten+Gemm) with its geometry; the batch dimension is dynamic."""

    kind: str  # "conv" or "gemm"
    cin: int
    cout: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilation: tuple[int, int] = (1, 1)
    input_hw: tuple[int, int] = (1, 1)

    @property
    def input_chw(self) -> tuple[int, int, int]:
        return (self.cin, *self.input_hw)

    @property
    def output_hw(self) -> tuple[int, int]:
        """Spatial output size (ONNX Conv arithmetic)."""
        size = []
        for axis in range(2):
            padded = self.input_hw[axis] + self.padding[axis] + self.padding[axis + 2]
            span = self.dilation[axis] * (self.kernel[axis] - 1) + 1
            size.append((padded - span) // self.stride[axis] + 1)
        return size[0], size[1]


@dataclass(frozen=True)
class LayerSpec(LayerGeometry):
    """A candidate layer to profile (cstar.latency.candidate_geometry) with its channel grids."""

    @classmethod
    def from_geometry(cls, geometry: dict[str, Any], cap: int, points: tuple[int, ...] | None) -> LayerSpec:
        cin, cout = int(geometry["in_channels"]), int(geometry["out_channels"])
        return cls(str(geometry["name"]), str(geometry["type"]), cin, cout, _ints(geometry["kernel"]),
                   _ints(geometry["stride"]), _ints(geometry["padding"]), _ints(geometry["dilation"]),
                   _ints(geometry["input_hw"]), _ints(geometry["output_hw"]),
                   tuple(channel_grid(cin, cap, points)), tuple(channel_grid(cout, cap, points)))

    @property
    def dense_weight_bytes(self) -> int:
        """float32 bytes of the dense layer's weight."""
        return 4 * self.in_channels * self.out_channels * self.kernel[0] * self.kernel[1]

    def op(self, op: str, rows: int, cols: int) -> OpSpec:
        """The micro-graph of `op` ("conv", "in_factor", "out_factor") at channel counts (rows, cols)."""
        if self.type == "linear":
            return OpSpec("gemm", rows, cols)
        if op == "conv":
            return OpSpec("conv", rows, cols, self.kernel, self.stride, self.padding, self.dilation, self.input_hw)
        return OpSpec("conv", rows, cols, input_hw=self.input_hw if op == "in_factor" else self.output_hw)

    def ops(self) -> Iterable[tuple[str, int, int, OpSpec]]:
        """Every (op, row, col, micro-graph) this layer needs."""
        for op in OPS:
            rows, cols = self.axes(op)
            for i in rows:
                for j in cols:
                    yield op, i, j, self.op(op, i, j)


def _ints(values: Iterable[Any]) -> Any:
    return tuple(int(v) for v in values)


@dataclass
class ProfileSettings:
    """How to time: backend, runtime threads, batch sizes, iterations and the channel grid."""

    backend: str = "ort-cpu"
    threads: int | None = 1
    batch_sizes: tuple[int, ...] = (1,)
    iters: int = 7
    warmup: int = 2
    grid_cap: int = DEFAULT_GRID_CAP
    ranks: tuple[int, ...] | None = None  # channel grid points (None: cstar.latency_table.GRID_POINTS)
    model_iters: int = 20  # timed calls of the whole dense model (and of each calibration model)
    seed: int = 0
    calibrate: bool = True  # fit the in-model price on reference models (deploy.profile_calibration)

    def validate(self) -> None:
        """Reject user mistakes with a hint."""
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise CstarError(f"--batch-sizes needs positive integers, got {self.batch_sizes}", "e.g. --batch-sizes 1,8")
        if self.iters < 1 or self.warmup < 0 or self.model_iters < 1:
            raise CstarError(f"--iters must be >= 1 and --warmup >= 0 (got {self.iters}, {self.warmup})",
                             "e.g. --iters 7 --warmup 2")
        if self.grid_cap < 2:
            raise CstarError(f"--grid-cap must be >= 2, got {self.grid_cap}", "e.g. --grid-cap 16")
        if self.threads is not None and self.threads < 1:
            raise CstarError(f"--threads must be >= 1, got {self.threads}", "pass a positive thread count")
        if self.ranks is not None and (not self.ranks or any(r < 1 for r in self.ranks)):
            raise CstarError(f"--ranks needs positive channel counts, got {self.ranks}", "e.g. --ranks 4,8,16,32,64")


# ------------------------------------------------------------------------------------------ micro-graphs


def _model(nodes: list[Any], inputs: list[Any], initializers: list[Any], out_shape: list[Any]) -> Any:
    import onnx
    from onnx import TensorProto, helper

    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)
    graph = helper.make_graph(nodes, "cstar_profile", inputs, [output], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="cstar-profile")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def op_graph(spec: OpSpec, rng: np.random.Generator) -> Any:
    """The ONNX model of one micro-graph: input x (N, cin, H, W) -> Conv, or Flatten -> Gemm; bias included."""
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *spec.input_chw])
    bias = numpy_helper.from_array(rng.standard_normal(spec.cout).astype(np.float32) * 0.01, "b")
    if spec.kind == "gemm":
        weight = numpy_helper.from_array((rng.standard_normal((spec.cout, spec.cin)) * 0.01).astype(np.float32), "w")
        nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1),
                 helper.make_node("Gemm", ["f", "w", "b"], ["y"], transB=1)]
        return _model(nodes, [x], [weight, bias], ["N", spec.cout])
    shape = (spec.cout, spec.cin, *spec.kernel)
    weight = numpy_helper.from_array((rng.standard_normal(shape) * 0.01).astype(np.float32), "w")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(spec.kernel), strides=list(spec.stride),
                            pads=list(spec.padding), dilations=list(spec.dilation))
    return _model([node], [x], [weight, bias], ["N", spec.cout, *spec.output_hw])


def chain_graph(nodes: int, channels: int = 8, size: int = 4) -> Any:
    """x (N, c, s, s) -> `nodes` tiny 1x1 Convs in a chain: the slope over `nodes` is what one node costs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    weight = numpy_helper.from_array((rng.standard_normal((channels, channels, 1, 1)) * 0.1).astype(np.float32), "w")
    names = ["x", *[f"h{i}" for i in range(1, nodes)], "y"]
    convs = [helper.make_node("Conv", [names[i], "w"], [names[i + 1]]) for i in range(nodes)]
    return _model(convs, [x], [weight], ["N", channels, size, size])


# Interleaved timing rounds of the whole models the table is calibrated on, each a third of --model-iters
# calls. Many short rounds, not a few long ones: on a shared machine a neighbour's burst lasts longer than one
# short round, and the median of nine rounds drops it (measured at batch 1 on 2 shared cores: the same seven
# ResNet-18 structures timed three times, 3 rounds x 30 calls spread up to 16% per model, 9 x 10 up to 7%).
CALIBRATION_ROUNDS = 9
NODE_CHAIN = 9  # nodes in the long chain of `measure_node_cost`


def trivial_graph() -> Any:
    """x (N, 1, 1, 1) -> Relu: what one runtime call costs with (almost) nothing to compute."""
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 1])
    return _model([helper.make_node("Relu", ["x"], ["y"])], [x], [], ["N", 1, 1, 1])


# ------------------------------------------------------------------------------------------ timing


class MicroTimer:
    """Times ONNX files on one backend (registry runners) at every batch size; caches micro-graphs by geometry.

    A micro-graph's cost is its runtime call minus the per-call overhead (any backend), or, on ort-cpu, the
    ONNX Runtime kernel time of its Conv/Gemm node (session profiling) minus the profiler's own cost per
    node (the kernel time of a trivial node): a lone Conv also pays layout conversions (NCHW <-> NCHWc
    reorders) that a chain of convs inside a model does not.
    """

    def __init__(self, settings: ProfileSettings, workdir: Path) -> None:
        from deploy.verify import runner_options

        self.settings = settings
        self.workdir = workdir
        self.options = runner_options(settings.backend, settings.threads)
        self.rng = np.random.default_rng(settings.seed)
        self.cache: dict[OpSpec, dict[int, float]] = {}
        self.runner_info: dict[str, Any] = {}
        self.overhead: dict[int, float] = {}
        self.node_overhead: dict[int, float] = {}  # ort-cpu: profiled kernel time of a trivial node
        self.node_cost: dict[int, float] = {}  # ort-cpu: one more small node in a chain (call time slope)
        self.kernel_timing = settings.backend in KERNEL_TIMING_BACKENDS

    @property
    def timing(self) -> str:
        """How micro-graphs are timed (recorded in the table)."""
        return "ort-kernel" if self.kernel_timing else "call-minus-overhead"

    def _inputs(self, chw: tuple[int, ...]) -> dict[int, np.ndarray]:
        return {b: self.rng.random((b, *chw), dtype=np.float32) for b in self.settings.batch_sizes}

    def time_file(self, path: Path, chw: tuple[int, ...], iters: int) -> dict[int, float]:
        """Median ms of one runtime call of the model at `path`, per batch size (the call overhead included)."""
        from deploy.backends import create_runner
        from deploy.bench import time_batch

        result: dict[int, float] = {}
        with create_runner(self.settings.backend, path, **self.options) as runner:
            for batch, data in self._inputs(chw).items():
                result[batch] = float(np.median(time_batch(runner, data, iters, self.settings.warmup)))
            if not self.runner_info:
                self.runner_info = runner.describe()
        return result

    def time_files(self, paths: dict[str, Path], chw: tuple[int, ...], iters: int,
                   rounds: int) -> dict[str, dict[int, float]]:
        """{name: {batch: ms}}: every model timed in `rounds` interleaved rounds (one runner each, kept open),
        the median of its per-round medians: load drift on a shared machine then hits every model alike."""
        from contextlib import ExitStack

        from deploy.backends import create_runner
        from deploy.bench import time_batch

        inputs = self._inputs(chw)
        per_round: dict[str, dict[int, list[float]]] = {name: {b: [] for b in inputs} for name in paths}
        with ExitStack() as stack:
            runners = {name: stack.enter_context(create_runner(self.settings.backend, path, **self.options))
                       for name, path in paths.items()}
            for _ in range(rounds):
                for name, runner in runners.items():
                    for batch, data in inputs.items():
                        per_round[name][batch].append(float(np.median(time_batch(runner, data, iters,
                                                                                 self.settings.warmup))))
        return {name: {b: float(np.median(v)) for b, v in by_batch.items()} for name, by_batch in per_round.items()}

    def kernel_file(self, path: Path, chw: tuple[int, ...], iters: int) -> dict[int, dict[str, tuple[float, int]]]:
        """ort-cpu: {batch: {op type: (summed median kernel ms, nodes)}} from an ONNX Runtime profile of the model.

        The session is made with the registry runner's own options and providers (threads, optimization).
        """
        import onnxruntime

        from deploy.backends import create_runner
        from deploy.backends.ort import profile_events

        runner: Any = create_runner(self.settings.backend, path, **self.options)
        options = runner.session_options(str(self.workdir / "kernels"))
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=runner.providers())
        name = session.get_inputs()[0].name
        runs = self.settings.warmup + iters
        inputs = self._inputs(chw)
        for data in inputs.values():
            for _ in range(runs):
                session.run(None, {name: data})
        trace = Path(session.end_profiling())
        try:
            events = profile_events(trace)
        finally:
            trace.unlink(missing_ok=True)
        return _kernel_medians(events, list(inputs), runs, self.settings.warmup)

    def time_graph(self, model: Any, chw: tuple[int, ...], iters: int) -> dict[int, float]:
        """Write `model` to the work directory and time its runtime calls."""
        import onnx

        path = self.workdir / "micro.onnx"
        onnx.save(model, str(path))
        return self.time_file(path, chw, iters)

    def measure_overhead(self) -> dict[int, float]:
        """The per-call cost of a trivial graph (more iterations: it is small and noisy), and on ort-cpu the
        profiled kernel time of its one trivial node (what profiling itself adds to every node)."""
        iters = max(3 * self.settings.iters, 15)
        self.overhead = self.time_graph(trivial_graph(), (1, 1, 1), iters)
        if self.kernel_timing:
            kernels = self.kernel_file(self.workdir / "micro.onnx", (1, 1, 1), iters)
            self.node_overhead = {b: sum(ms for ms, _ in k.values()) for b, k in kernels.items()}
        return self.overhead

    def measure_node_cost(self) -> dict[int, float]:
        """Kernel-timed tables only: ms one more small Conv adds to a call (dispatch, intermediate tensor),
        the slope between a 1-node and a NODE_CHAIN-node chain. Kernel times leave it out, and a factorized
        form runs one or two convs more than the dense layer."""
        if not self.kernel_timing:
            return self.node_cost
        iters = max(3 * self.settings.iters, 15)
        short = self.time_graph(chain_graph(1), (8, 4, 4), iters)
        long = self.time_graph(chain_graph(NODE_CHAIN), (8, 4, 4), iters)
        self.node_cost = {b: max(0.0, (long[b] - short[b]) / (NODE_CHAIN - 1)) for b in short}
        return self.node_cost

    def net_kernels(self, kernels: dict[str, tuple[float, int]], batch: int, layers: bool) -> float:
        """Summed kernel ms of the layer ops (or of every other op), less the profiler's cost per node."""
        delta = self.node_overhead.get(batch, 0.0)
        return sum(max(ms - delta * nodes, MIN_NET_FRACTION * ms) for op, (ms, nodes) in kernels.items()
                   if (op in LAYER_KERNELS) == layers)

    def op_ms(self, spec: OpSpec) -> dict[int, float]:
        """Net ms of micro-graph `spec` per batch (cached): its layer kernel, or its call minus the overhead."""
        if spec not in self.cache:
            if self.kernel_timing:
                import onnx

                path = self.workdir / "micro.onnx"
                onnx.save(op_graph(spec, self.rng), str(path))
                kernels = self.kernel_file(path, spec.input_chw, self.settings.iters)
                self.cache[spec] = {b: max(self.net_kernels(k, b, layers=True), 1e-6) for b, k in kernels.items()}
            else:
                raw = self.time_graph(op_graph(spec, self.rng), spec.input_chw, self.settings.iters)
                self.cache[spec] = {b: net_ms(ms, self.overhead.get(b, 0.0)) for b, ms in raw.items()}
        return self.cache[spec]


# Backends whose micro-graphs are timed by kernel (ONNX Runtime CPU profiling); others by whole calls.
KERNEL_TIMING_BACKENDS = ("ort-cpu",)
# ONNX Runtime op types that are a candidate layer's own compute (fused activations included).
LAYER_KERNELS = frozenset({"Conv", "FusedConv", "NchwcConv", "Gemm", "FusedGemm", "MatMul"})


def _kernel_medians(events: list[dict[str, Any]], batches: list[int], runs: int,
                    warmup: int) -> dict[int, dict[str, tuple[float, int]]]:
    """Per batch: {op type: (sum over its nodes of the median kernel ms of the timed runs, nodes)}."""
    per_node: dict[str, tuple[str, list[float]]] = {}
    for event in events:
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        op = str((event.get("args") or {}).get("op_name", ""))
        per_node.setdefault(name, (op, []))[1].append(float(event.get("dur", 0)) / 1000.0)
    result: dict[int, dict[str, tuple[float, int]]] = {b: {} for b in batches}
    for op, durations in per_node.values():
        for index, batch in enumerate(batches):
            timed = durations[index * runs + warmup:(index + 1) * runs]
            if timed:
                ms, nodes = result[batch].get(op, (0.0, 0))
                result[batch][op] = (ms + float(np.median(timed)), nodes + 1)
    return result


def calibrate(alone: float, in_model: float, beyond_mib: float) -> tuple[float, float]:
    """(ms per MiB of weights beyond the cache, scale of every op) that make the dense layers take, in sum,
    what they take inside the model: slower inside -> weight streaming (a scale when no weights stream);
    faster inside -> a scale below 1."""
    if alone <= 0 or in_model <= 0:
        return 0.0, 1.0
    if in_model >= alone and beyond_mib > 0:
        return (in_model - alone) / beyond_mib, 1.0
    return 0.0, in_model / alone


def cache_bytes() -> int:
    """Per-core L2 cache size (Linux sysfs), else 1 MiB: weights above it stream from memory inside a model."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 1 << 20


def net_ms(raw: float, overhead: float) -> float:
    """Raw ms minus the call overhead, never below MIN_NET_FRACTION of the raw time (always > 0)."""
    return max(raw - overhead, MIN_NET_FRACTION * raw, 1e-6)


def runtime_of(info: dict[str, Any]) -> dict[str, str]:
    """{"name", "version"} of the runtime library a runner reports (its versions besides python/numpy)."""
    versions = {k: v for k, v in (info.get("versions") or {}).items() if k not in ("python", "numpy")}
    if not versions:
        return {"name": str(info.get("backend", "?")), "version": "?"}
    name, version = next(iter(versions.items()))
    return {"name": str(name), "version": str(version)}


def machine_record() -> dict[str, Any]:
    """This host as the table records it (hostname-free): CPU model, architecture, cores."""
    from deploy.report import hardware_info

    hardware = hardware_info()
    return {"cpu_model": hardware["processor"], "machine": hardware["machine"], "cpu_count": hardware["cpu_count"],
            "cpus_available": hardware["cpus_available"], "platform": hardware["platform"]}


def profile_layers(layers: list[LayerSpec], dense_model: str | Path, input_shape: tuple[int, ...],
                   model_info: dict[str, Any], settings: ProfileSettings,
                   progress: PROGRESS | None = None) -> dict[str, Any]:
    """Time every layer's ops on the grid and the whole dense model; returns the table body (validated)."""
    settings.validate()
    if not layers:
        raise CstarError("the model has no candidate (conv or linear) layers to profile",
                         "profile a model with Conv2d/Linear layers")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cstar-profile-"))
    try:
        timer = MicroTimer(settings, work)
        timer.measure_overhead()
        timer.measure_node_cost()
        unique = list(dict.fromkeys(spec for layer in layers for _, _, _, spec in layer.ops()))
        for done, spec in enumerate(unique, start=1):
            timer.op_ms(spec)
            if progress is not None:
                progress(done, len(unique))
        whole = timer.time_file(Path(dense_model), tuple(input_shape), settings.model_iters)
        inside = (timer.kernel_file(Path(dense_model), tuple(input_shape), settings.model_iters)
                  if timer.kernel_timing else None)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    body: dict[str, Any] = {
        "kind": TABLE_KIND, "schema_version": TABLE_SCHEMA_VERSION, "backend": settings.backend,
        "runtime": runtime_of(timer.runner_info), "machine": machine_record(), "threads": settings.threads,
        "batch_sizes": list(settings.batch_sizes), "model": {**model_info, "input_shape": list(input_shape)},
        "settings": {"iters": settings.iters, "warmup": settings.warmup, "grid_cap": settings.grid_cap,
                     "ranks": list(settings.ranks) if settings.ranks else None, "model_iters": settings.model_iters,
                     "micro_graphs": len(unique), "timing": timer.timing,
                     "profiler_node_ms": {str(b): ms for b, ms in timer.node_overhead.items()},
                     "seconds": round(time.perf_counter() - started, 2)},
        "overhead_ms": {str(b): ms for b, ms in timer.overhead.items()},
        "node_ms": {str(b): timer.node_cost.get(b, 0.0) for b in settings.batch_sizes},
        "dense_model_ms": {str(b): ms for b, ms in whole.items()},
        "layers": {layer.name: _layer_body(layer, timer, settings.batch_sizes) for layer in layers},
    }
    alone, in_model = _calibrate_into(body, layers, timer, whole, inside)
    table = LatencyTable.from_dict(body, "the measured table")
    body["summary"] = {str(b): {"model_ms": table.model_ms(b), "overhead_ms": table.overhead_ms[b],
                                "layers_alone_ms": alone[b], "layers_in_model_ms": in_model[b],
                                "rest_ms": table.rest_ms(b), "predicted_dense_ms": table.predicted_dense_ms(b)}
                       for b in settings.batch_sizes}
    return body


def _calibrate_into(body: dict[str, Any], layers: list[LayerSpec], timer: MicroTimer, whole: dict[int, float],
                    inside: dict[int, dict[str, tuple[float, int]]] | None) -> tuple[dict[int, float], dict[int, float]]:
    """Add cache_bytes, weight_ms_per_mb, op_scale (and rest_ms on ort-cpu) to `body`: the dense layers'
    sum alone vs inside the whole model sets them. Returns (alone, in model) ms per batch."""
    batches = timer.settings.batch_sizes
    cache = cache_bytes()
    alone = {b: sum(timer.op_ms(layer.op("conv", layer.in_channels, layer.out_channels))[b] for layer in layers)
             for b in batches}
    if inside is not None:  # ort-cpu: the layers' kernels inside the model; the rest is every other node
        in_model = {b: timer.net_kernels(k, b, layers=True) for b, k in inside.items()}
        body["rest_ms"] = {str(b): timer.overhead.get(b, 0.0) + timer.net_kernels(k, b, layers=False)
                           for b, k in inside.items()}
    else:
        in_model = {b: whole[b] - timer.overhead.get(b, 0.0) for b in batches}
    beyond = sum(max(0, layer.dense_weight_bytes - cache) for layer in layers) / MIB
    calibration = {b: calibrate(alone[b], in_model[b], beyond) for b in batches}
    body["cache_bytes"] = cache
    body["weight_ms_per_mb"] = {str(b): rate for b, (rate, _) in calibration.items()}
    body["op_scale"] = {str(b): scale for b, (_, scale) in calibration.items()}
    return alone, in_model


def _layer_body(layer: LayerSpec, timer: MicroTimer, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    ms: dict[str, dict[str, list[list[float]]]] = {}
    for batch in batch_sizes:
        ms[str(batch)] = {}
        for op in OPS:
            rows, cols = layer.axes(op)
            ms[str(batch)][op] = [[round(timer.op_ms(layer.op(op, i, j))[batch], 6) for j in cols] for i in rows]
    return {**layer.geometry_dict(), "ms": ms}


def write_table(body: dict[str, Any], out: str | Path) -> LatencyTable:
    """Write the table atomically and read it back through the validating loader."""
    atomic_write_json(out, body)
    return LatencyTable.load(out)


# ------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cstar profile`."""
    defaults = ProfileSettings()
    parser.add_argument("--model-from", required=True, help="train or compress stage directory (its dense model)")
    parser.add_argument("--backend", default=defaults.backend, help="runtime backend (default ort-cpu)")
    parser.add_argument("--threads", type=int, default=defaults.threads,
                        help="runtime intra-op threads (default 1; 0: the runtime's default)")
    parser.add_argument("--batch-sizes", default="1", help="comma-separated batch sizes (default 1)")
    parser.add_argument("--ranks", default=None,
                        help="channel grid points below each full width, e.g. 4,8,16,24,32,48,64 (default: small "
                             "ranks and multiples of 8 and 16; the full width is always included)")
    parser.add_argument("--grid-cap", type=int, default=defaults.grid_cap, help="most grid points per channel dim")
    parser.add_argument("--iters", type=int, default=defaults.iters, help="timed calls per micro-graph (median)")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="untimed calls per micro-graph")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="skip the calibration on whole reference models (faster; predictions of compressed "
                             "models then run optimistic)")
    parser.add_argument("--out", required=True, help="the table (JSON) to write")
    parser.add_argument("--force", action="store_true", help="replace an existing latency table at --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise CstarError(f"{option} '{text}' is not a comma-separated list of integers", f"e.g. {option} 1,8") from exc
    if not values or any(v < 1 for v in values):
        raise CstarError(f"{option} '{text}' needs positive integers", f"e.g. {option} 1,8")
    return values


def settings_from_args(args: argparse.Namespace) -> ProfileSettings:
    """ProfileSettings from parsed options (validated)."""
    settings = ProfileSettings(
        backend=args.backend, threads=None if args.threads == 0 else args.threads,
        batch_sizes=_int_list(args.batch_sizes, "--batch-sizes"),
        iters=args.iters, warmup=args.warmup, grid_cap=args.grid_cap,
        ranks=None if args.ranks is None else _int_list(args.ranks, "--ranks"),
        calibrate=getattr(args, "calibrate", True),
    )
    settings.validate()
    return settings


def main(args: argparse.Namespace) -> int:
    """CLI entry: profile, write the table, print a one-line summary."""
    started = time.perf_counter()
    settings = settings_from_args(args)
    from deploy.backends import require_backend

    require_backend(settings.backend)
    table = run_profile(args.model_from, args.out, settings, progress=not args.quiet, force=args.force)
    batches = ", ".join(f"b{b} {table.model_ms(b):.3f} ms" for b in table.batch_sizes)
    print(f"profiled {len(table.layers)} layers ({table.settings.get('micro_graphs')} micro-graphs) of "
          f"{table.model.get('name')} on {table.backend} ({table.runtime.get('name')} {table.runtime.get('version')}, "
          f"{table.threads or 'default'} thread(s)): dense model {batches} -> {args.out} "
          f"({time.perf_counter() - started:.0f}s)")
    return 0


def run_profile(model_dir: str | Path, out: str | Path, settings: ProfileSettings,
                progress: bool = True, force: bool = False) -> LatencyTable:
    """Profile the dense model of the stage directory `model_dir` into the table `out` (host side: torch).

    `out` follows cstar.outdir.check_output_file: never inside an input or a stage directory; an existing
    file only with `force`, and only when it is a latency table."""
    from cstar.latency import candidate_geometry
    from cstar.outdir import check_output_file
    from cstar.train import progress_bars

    check_output_file(out, (model_dir,), force=force, kind=TABLE_KIND)

    model, input_shape, info = dense_model(model_dir)
    layers = [LayerSpec.from_geometry(g, settings.grid_cap, settings.ranks)
              for g in candidate_geometry(model, input_shape)]
    log = _logger(progress)
    with tempfile.TemporaryDirectory(prefix="cstar-profile-model-") as tmp:
        onnx_path = dense_model_onnx(model, input_shape, Path(tmp))
        log(f"profiling {len(layers)} layers of {info['name']} on {settings.backend} "
            f"(batch {','.join(map(str, settings.batch_sizes))}, {settings.threads or 'default'} thread(s))")
        with _bar(progress_bars(progress)) as callback:
            body = profile_layers(layers, onnx_path, input_shape, info, settings, callback)
        if settings.calibrate:
            from deploy.profile_calibration import calibrate_table

            log("calibrating on whole reference models (Tucker-2 and pruned)")
            timer = MicroTimer(settings, Path(tmp))
            body = calibrate_table(body, model, input_shape, onnx_path, Path(tmp),
                                   lambda paths: timer.time_files(paths, input_shape, calibration_iters(settings),
                                                                  CALIBRATION_ROUNDS))
    return write_table(body, out)


def calibration_iters(settings: ProfileSettings) -> int:
    """Timed calls per calibration round: a third of --model-iters (at least 5), so nine rounds cost about as much
    as three of --model-iters."""
    return max(5, settings.model_iters // 3)


def dense_model(model_dir: str | Path) -> tuple[Any, tuple[int, ...], dict[str, Any]]:
    """The dense architecture of a train/compress directory's model (registry build, random weights)."""
    from cstar.checkpoint import CHECKPOINT_STAGES
    from cstar.data import DatasetSpec
    from cstar.manifest import read_manifest
    from cstar.models import build_model

    manifest = read_manifest(model_dir, CHECKPOINT_STAGES)
    if "model" not in manifest or "dataset" not in manifest:
        raise CstarError(f"{model_dir}/manifest.json lacks 'model' or 'dataset'", "re-run the stage that wrote it")
    spec = DatasetSpec.from_dict(manifest["dataset"])
    options = manifest["model"].get("options", {})
    model = build_model(manifest["model"]["name"], spec, **options).eval()
    info = {"name": manifest["model"]["name"], "options": options,
            "source": {"path": str(Path(model_dir).resolve()), "stage": manifest.get("stage")}}
    return model, tuple(int(d) for d in spec.input_shape), info


def dense_model_onnx(model: Any, input_shape: tuple[int, ...], directory: Path) -> Path:
    """Export the dense model as `cstar export` deploys it (export.as_deployed)."""
    from export.as_deployed import export_as_deployed

    return export_as_deployed(model, input_shape, directory, "dense")


def _logger(progress: bool) -> Callable[[str], None]:
    from cstar.stage_log import StageLog

    return StageLog(progress)


class _bar:
    """A tqdm bar over the micro-graphs when drawing bars (a TTY), else a no-op callback."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def __enter__(self) -> PROGRESS | None:
        if not self.enabled:
            return None

        def update(done: int, total: int) -> None:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="profile", unit="graph", leave=False)
            self.bar.n = done
            self.bar.refresh()

        return update

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

