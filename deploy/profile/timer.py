"""`MicroTimer`: times ONNX files on one backend through the registry runners, by whole calls minus the
per-call overhead, or on ort-cpu by ONNX Runtime's profiled kernel time. Torch-free."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from deploy.profile.graphs import chain_graph, op_graph, trivial_graph
from deploy.profile.specs import OpSpec, ProfileSettings

MIN_NET_FRACTION = 0.05  # a micro-graph timed below the call overhead is noise: keep 5% of its raw time
# Interleaved timing rounds of the whole models the table is calibrated on, each a third of --model-iters
# calls. Many short rounds, not a few long ones: on a shared machine a neighbour's burst lasts longer than one
# short round, and the median of nine rounds drops it (measured at batch 1 on 2 shared cores: the same seven
# ResNet-18 structures timed three times, 3 rounds x 30 calls spread up to 16% per model, 9 x 10 up to 7%).
CALIBRATION_ROUNDS = 9
NODE_CHAIN = 9  # nodes in the long chain of `measure_node_cost`


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
        return kernel_medians(events, list(inputs), runs, self.settings.warmup)

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


def kernel_medians(events: list[dict[str, Any]], batches: list[int], runs: int,
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



def net_ms(raw: float, overhead: float) -> float:
    """Raw ms minus the call overhead, never below MIN_NET_FRACTION of the raw time (always > 0)."""
    return max(raw - overhead, MIN_NET_FRACTION * raw, 1e-6)
