"""Native TensorRT: engine building and a runner on the tensor-address API (TensorRT 10.x / 11.x).

Written against the documented Python API: a strongly typed network parsed from ONNX (INT8 comes
from the Q/DQ nodes of `cstar calibrate`, FP16 from an FP16-converted ONNX; TensorRT 11 has no
precision builder flags or calibrators), one optimization profile over the batch range, a timing
cache, `set_input_shape` / `set_tensor_address` / `execute_async_v3` at run time (every output
bound; the one named 'logits', or the only one, is returned).

Building is split into small loaders (network_from_onnx, build_config, serialized_engine, save_engine,
build_record) that take the `trt` module as an argument, so tests check each one with a fake module.

`import tensorrt` is lazy: this module imports without it. Device buffers come from cuda-python
(`cuda.bindings.runtime` / `cuda.cudart`) when importable, else from torch CUDA tensors (the one
place on the device side where torch may be used, and only if it is already installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import atomic_write_bytes
from deploy.backends.base import BUILD_INFO_NAME, InputSpec, Runner, logits_output

PRECISIONS = ("fp32", "fp16", "int8")


def _import_trt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "tensorrt", "the native TensorRT backend") from exc
    return trt


def _import_cudart() -> Any | None:
    """cuda-python's runtime module (new and old layouts), or None."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef, unused-ignore]

        return cudart
    except ImportError:
        return None


def device_buffer_library() -> str | None:
    """'cuda-python' or 'torch' (whichever will provide device buffers), or None."""
    if _import_cudart() is not None:
        return "cuda-python"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    return None


# --------------------------------------------------------------------------------------- GPU info


def gpu_info(device: int = 0) -> dict[str, str | None]:
    """{name, compute_capability ('8.9')} of GPU `device`: cuda-python, else nvidia-smi, else torch."""
    cudart = _import_cudart()
    if cudart is not None:
        try:
            err, prop = cudart.cudaGetDeviceProperties(device)
            if err == cudart.cudaError_t.cudaSuccess and prop is not None:
                name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
                return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
        except Exception:  # fall through to the next source
            pass
    smi = shutil.which("nvidia-smi")
    if smi is not None:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={device}"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip().splitlines()
            if out:
                name, _, cap = out[0].rpartition(",")
                return {"name": name.strip(), "compute_capability": cap.strip()}
        except (OSError, subprocess.SubprocessError):
            pass
    if importlib.util.find_spec("torch") is not None:
        import torch  # optional, TensorRT backend only

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(device)
            return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}
    return {"name": None, "compute_capability": None}


# ------------------------------------------------------------------------------------ device memory


class _CudartMemory:
    """Device buffers and a stream through cuda-python's runtime API."""

    library = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: list[int] = []

    def _call(self, result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CstarError(f"CUDA call {what} failed: {err}", "check the GPU driver and that a GPU is visible")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        ptr = int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))
        self._buffers.append(ptr)
        return ptr

    def htod(self, dst: int, host: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, host: np.ndarray, src: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    @property
    def stream_handle(self) -> int:
        return int(self.stream)

    def synchronize(self) -> None:
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        for ptr in self._buffers:
            self.rt.cudaFree(ptr)
        self._buffers.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class _TorchMemory:
    """Device buffers and a stream through torch CUDA tensors (fallback when cuda-python is absent)."""

    library = "torch"

    def __init__(self) -> None:
        import torch  # optional, TensorRT backend only

        if not torch.cuda.is_available():
            raise CstarError("torch sees no CUDA GPU", "check the GPU driver and CUDA_VISIBLE_DEVICES")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self._buffers: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        tensor = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[tensor.data_ptr()] = tensor
        return int(tensor.data_ptr())

    def htod(self, dst: int, host: np.ndarray) -> None:
        src = self.torch.from_numpy(np.ascontiguousarray(host).reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            self._buffers[dst][: host.nbytes].copy_(src)

    def dtoh(self, host: np.ndarray, src: int) -> None:
        with self.torch.cuda.stream(self.stream):
            data = self._buffers[src][: host.nbytes].cpu().numpy()
        host.reshape(-1).view(np.uint8)[:] = data

    @property
    def stream_handle(self) -> int:
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        self._buffers.clear()


def _device_memory() -> _CudartMemory | _TorchMemory:
    cudart = _import_cudart()
    if cudart is not None:
        return _CudartMemory(cudart)
    if importlib.util.find_spec("torch") is not None:
        return _TorchMemory()
    raise MissingDependencyError("cuda-python", None, "device buffers of the TensorRT backend")


# ---------------------------------------------------------------------------------------- building
#
# Polygraphy-style loaders, each small enough to check against a fake `trt` module without a GPU:
# network_from_onnx -> batch_profile_shapes -> optimization_profile -> build_config -> serialized_engine
# -> save_engine, then build_record reads back what the network and config really hold.


@dataclass(frozen=True)
class ProfileShapes:
    """Min/opt/max NCHW shapes of the one input in the optimization profile."""

    name: str
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


@dataclass(frozen=True)
class TimingCacheUse:
    """What happened to the timing cache file: bytes read into the build and bytes written back."""

    path: str
    loaded_bytes: int
    saved_bytes: int = 0
    discarded: bool = False  # the file was from another TensorRT version or GPU and was not used


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _has_half_tensors(network: Any, trt: Any) -> bool:
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        for j in range(layer.num_outputs):
            if layer.get_output(j).dtype == trt.DataType.HALF:
                return True
    return False


def _has_quantize(network: Any, trt: Any) -> bool:
    quantize = getattr(trt.LayerType, "QUANTIZE", None)
    return any(network.get_layer(i).type == quantize for i in range(network.num_layers))


def require_fp16_converter() -> None:
    """Raise MissingDependencyError unless onnxconverter-common (FP16 ONNX conversion) is importable."""
    if importlib.util.find_spec("onnxconverter_common") is None or importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError(
            "onnxconverter-common", "tensorrt",
            "FP16 TensorRT engines (a strongly typed network takes FP16 from the ONNX tensor types, "
            "so the FP32 model is converted to FP16 first)",
        )


def _fp16_onnx(onnx_path: Path, workdir: Path) -> Path:
    """An FP16 copy of an FP32 ONNX (float32 inputs/outputs kept) via onnxconverter-common."""
    require_fp16_converter()
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    out = workdir / "model.fp16.onnx"
    onnx.save(model, str(out))
    return out


def network_flags(trt: Any, strongly_typed: bool) -> int:
    """create_network() flags: STRONGLY_TYPED when asked and this TensorRT has it."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if strongly_typed and flag is not None else 0


def is_strongly_typed(trt: Any, network: Any) -> bool:
    """Whether `network` IS strongly typed (read back: TensorRT 11 is strongly typed whatever was asked)."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if flag is None:  # TensorRT < 9 had no strongly typed networks
        return False
    return bool(network.get_flag(flag))


def network_from_onnx(
    trt: Any, builder: Any, logger: Any, onnx_path: str | Path, strongly_typed: bool = True
) -> tuple[Any, Any]:
    """(network, parser) for an ONNX file; keep the parser alive as long as the network."""
    onnx_path = Path(onnx_path)
    network = builder.create_network(network_flags(trt, strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CstarError(
            f"TensorRT could not parse {onnx_path.name}: {errors or 'unknown error'}",
            "run `cstar export`/`cstar calibrate` again, or check trt_check.preflight(onnx) for unsupported ops",
        )
    return network, parser


def batch_profile_shapes(network: Any, model_name: str, min_batch: int, opt_batch: int,
                         max_batch: int) -> ProfileShapes:
    """The profile for a batch range over the network's one NCHW input (fixed C, H, W)."""
    if network.num_inputs != 1:
        raise CstarError(f"{model_name} has {network.num_inputs} inputs; expected one NCHW image", "re-export")
    inp = network.get_input(0)
    shape = tuple(int(d) for d in inp.shape)
    if len(shape) != 4 or any(d < 0 for d in shape[1:]):
        raise CstarError(f"input {inp.name} has shape {shape}; expected (N, C, H, W) with fixed C, H, W", "re-export")
    if shape[0] >= 0 and not min_batch == opt_batch == max_batch == shape[0]:
        raise CstarError(
            f"{model_name} has a static batch of {shape[0]}, but the build asks for {min_batch}..{max_batch}",
            f"re-export with a dynamic batch, or pass --min-batch {shape[0]} --opt-batch {shape[0]} "
            f"--max-batch {shape[0]}",
        )
    chw = shape[1:]
    return ProfileShapes(str(inp.name), (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))


def optimization_profile(builder: Any, shapes: ProfileShapes) -> Any:
    """An IOptimizationProfile holding `shapes`."""
    profile = builder.create_optimization_profile()
    profile.set_shape(shapes.name, shapes.min, shapes.opt, shapes.max)
    return profile


def _set_precision_flags(trt: Any, config: Any, network: Any, precision: str) -> None:
    """FP32 clears TF32; a weakly typed network (TensorRT 10 only) needs the FP16/INT8 builder flag.

    A strongly typed network takes precision from its tensor types and refuses precision flags.
    """
    tf32 = getattr(trt.BuilderFlag, "TF32", None)
    if precision == "fp32" and tf32 is not None:
        config.clear_flag(tf32)  # FP32 means FP32: TF32 matmuls would widen the parity gap
    if precision == "fp32" or is_strongly_typed(trt, network):
        return
    name = {"fp16": "FP16", "int8": "INT8"}[precision]
    flag = getattr(trt.BuilderFlag, name, None)
    if flag is None:
        raise CstarError(f"this TensorRT ({trt.__version__}) has no {name} builder flag for a weakly typed network",
                         "build strongly typed (the default)")
    config.set_flag(flag)


def load_timing_cache(trt: Any, config: Any, path: str | Path | None) -> TimingCacheUse | None:
    """Give `config` a timing cache, read from `path` when that file exists (a stale one is dropped)."""
    data = Path(path).read_bytes() if path is not None and Path(path).is_file() else b""
    cache: Any = None
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a corrupt file: TensorRT raises its own pybind error types
        cache = None
    discarded = False
    if cache is None or not config.set_timing_cache(cache, False):
        discarded = bool(data)
        if discarded:
            warnings.warn(f"timing cache {path} is from another TensorRT version or GPU; starting a new one",
                          UserWarning, stacklevel=2)
        data = b""
        config.set_timing_cache(config.create_timing_cache(b""), False)
    if path is None:
        return None
    return TimingCacheUse(str(path), len(data), discarded=discarded)


def save_timing_cache(config: Any, use: TimingCacheUse) -> TimingCacheUse:
    """Write the config's (now updated) timing cache back to its file, atomically."""
    data = bytes(memoryview(config.get_timing_cache().serialize()))
    atomic_write_bytes(use.path, data)
    return replace(use, saved_bytes=len(data))


def build_config(
    trt: Any, builder: Any, network: Any, precision: str, workspace_mb: int, profile: Any,
    timing_cache_path: str | Path | None = None,
) -> tuple[Any, TimingCacheUse | None]:
    """(IBuilderConfig, timing cache use): workspace, precision flags, the profile and a timing cache."""
    if precision not in PRECISIONS:
        raise CstarError(f"precision {precision!r} is not valid", f"use one of: {', '.join(PRECISIONS)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    _set_precision_flags(trt, config, network, precision)
    if config.add_optimization_profile(profile) < 0:
        raise CstarError("TensorRT refused the optimization profile", "check --min/--opt/--max-batch")
    return config, load_timing_cache(trt, config, timing_cache_path)


def serialized_engine(builder: Any, network: Any, config: Any, model_name: str = "the model") -> bytes:
    """The serialized engine (plan) bytes."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CstarError(
            f"TensorRT failed to build an engine from {model_name} (see the TensorRT log above)",
            "try a larger --workspace, another precision, or check trt_check.preflight",
        )
    return bytes(memoryview(serialized))


def save_engine(data: bytes, engine_path: str | Path) -> Path:
    """Write the engine atomically (a reader never sees half a plan)."""
    return atomic_write_bytes(engine_path, data)


def build_record(
    trt: Any, network: Any, config: Any, profile: Any, precision: str,
    timing_cache: TimingCacheUse | None = None, fp16_converted: bool = False,
) -> dict[str, Any]:
    """The build.json record, read back from the network, config and profile (not from what was asked)."""
    inp = network.get_input(0)
    low, opt, high = (tuple(int(d) for d in dims) for dims in profile.get_shape(inp.name))
    flags: dict[str, bool | None] = {}
    for key, name in (("fp16", "FP16"), ("int8", "INT8"), ("tf32", "TF32")):
        flag = getattr(trt.BuilderFlag, name, None)
        flags[key] = None if flag is None else bool(config.get_flag(flag))
    outputs = [str(network.get_output(i).name) for i in range(network.num_outputs)]
    return {
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "strongly_typed": is_strongly_typed(trt, network),
        "builder_flags": flags,
        "tf32": flags["tf32"],
        "network": {"layers": int(network.num_layers), "half_tensors": _has_half_tensors(network, trt),
                    "quantize_layers": _has_quantize(network, trt)},
        "batch": {"min": low[0], "opt": opt[0], "max": high[0]},
        "input": {"name": str(inp.name), "shape": list(low[1:])},
        "outputs": outputs,
        "logits_output": logits_output(outputs, "the network"),
        "optimization_profiles": int(config.num_optimization_profiles),
        "workspace_mb": int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)) >> 20,
        "timing_cache": asdict(timing_cache) if timing_cache is not None else None,
        "fp16_converted": fp16_converted,
    }


def _check_batch_range(min_batch: int, opt_batch: int, max_batch: int) -> None:
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CstarError(
            f"batch range min {min_batch} <= opt {opt_batch} <= max {max_batch} does not hold",
            "pass 1 <= --min-batch <= --opt-batch <= --max-batch",
        )


def _parse_for_precision(
    trt: Any, builder: Any, logger: Any, onnx_path: Path, precision: str, strongly_typed: bool, workdir: Path
) -> tuple[Any, Any, bool]:
    """(network, parser, fp16_converted): the network that carries `precision`."""
    network, parser = network_from_onnx(trt, builder, logger, onnx_path, strongly_typed)
    if precision == "int8" and not _has_quantize(network, trt):
        raise CstarError(
            f"{onnx_path.name} has no Q/DQ nodes: TensorRT takes INT8 only from explicit quantization",
            "build from a `cstar calibrate` directory (model.int8.onnx)",
        )
    if precision == "fp16" and is_strongly_typed(trt, network) and not _has_half_tensors(network, trt):
        network, parser = network_from_onnx(trt, builder, logger, _fp16_onnx(onnx_path, workdir), strongly_typed)
        return network, parser, True
    return network, parser, False


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    precision: str = "fp32",
    timing_cache_path: str | Path | None = None,
    workspace_mb: int = 1024,
    strongly_typed: bool = True,
) -> dict[str, Any]:
    """Build and save a TensorRT engine for `onnx_path`; returns the build record for build.json."""
    trt = _import_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise CstarError(f"precision {precision!r} is not valid", f"use one of: {', '.join(PRECISIONS)}")
    _check_batch_range(min_batch, opt_batch, max_batch)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=engine_path.parent) as tmp:
        network, parser, converted = _parse_for_precision(
            trt, builder, logger, onnx_path, precision, strongly_typed, Path(tmp))
        shapes = batch_profile_shapes(network, onnx_path.name, min_batch, opt_batch, max_batch)
        profile = optimization_profile(builder, shapes)
        config, cache = build_config(trt, builder, network, precision, workspace_mb, profile, timing_cache_path)
        save_engine(serialized_engine(builder, network, config, onnx_path.name), engine_path)
        if cache is not None:
            cache = save_timing_cache(config, cache)
        record = build_record(trt, network, config, profile, precision, cache, converted)
        del parser
    gpu = gpu_info()
    return {**record, "gpu_name": gpu["name"], "compute_capability": gpu["compute_capability"]}


# ------------------------------------------------------------------------------------------ runner


@dataclass
class _Binding:
    """One I/O tensor of the engine and its device buffer."""

    name: str
    dtype: Any
    ptr: int = 0
    nbytes: int = 0


class TensorrtRunner(Runner):
    """A serialized TensorRT engine (model.engine) on the current GPU."""

    name = "tensorrt"
    OPTIONS = Runner.OPTIONS | {"build_info", "check_build"}

    def __init__(self, model_path: str | Path, **options: Any) -> None:
        super().__init__(model_path, **options)
        self._trt: Any = None
        self._runtime: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._memory: _CudartMemory | _TorchMemory | None = None
        self._input: _Binding | None = None
        self._outputs: list[_Binding] = []
        self._logits = ""
        self._range: tuple[int, int] = (1, 1)
        #: every output of the last infer() (the runner returns the logits; the rest are kept here)
        self.last_outputs: dict[str, np.ndarray] = {}

    def _build_info(self) -> dict[str, Any] | None:
        if self.options.get("build_info") is not None:
            return dict(self.options["build_info"])
        path = self.model_path.parent / BUILD_INFO_NAME
        if path.is_file():
            try:
                return dict(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError) as exc:
                raise CstarError(f"{path} is unreadable ({exc})", "re-run `cstar build --backend tensorrt`") from exc
        return None

    def _check_compatible(self, trt: Any) -> None:
        info = self._build_info()
        if info is None or self.options.get("check_build") is False:
            return
        built = info.get("tensorrt_version")
        if built and built != trt.__version__:
            raise CstarError(
                f"{self.model_path.name} was built with TensorRT {built}, this machine has {trt.__version__}: "
                "TensorRT engines are not portable across versions",
                "re-run `cstar build --backend tensorrt` on this machine",
            )
        cap = info.get("compute_capability")
        current = gpu_info().get("compute_capability")
        if cap and current and cap != current:
            raise CstarError(
                f"{self.model_path.name} was built for compute capability {cap} ({info.get('gpu_name')}), "
                f"this GPU is {current}: TensorRT engines are not portable across GPU architectures",
                "re-run `cstar build --backend tensorrt` on this machine",
            )

    def _deserialize(self, trt: Any) -> tuple[Any, Any]:
        runtime = trt.Runtime(_logger(trt))
        engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
        if engine is None:
            raise CstarError(
                f"TensorRT {trt.__version__} could not deserialize {self.model_path}",
                "re-run `cstar build --backend tensorrt` on this machine (engines are version and GPU specific)",
            )
        return runtime, engine

    def _io_names(self, trt: Any, engine: Any) -> tuple[str, list[str]]:
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise CstarError(f"{self.model_path.name} has inputs {inputs} and outputs {outputs}", "rebuild it")
        return inputs[0], outputs

    def _batch_range(self, engine: Any, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        if shape[0] >= 0:  # static batch: no profile to read
            return shape[0], shape[0]
        low_shape, _, high_shape = engine.get_tensor_profile_shape(name, 0)
        return int(low_shape[0]), int(high_shape[0])

    def _bind(self, trt: Any, engine: Any, context: Any, memory: Any, name: str, shape: tuple[int, ...]) -> _Binding:
        """Allocate a device buffer for tensor `name` at `shape` (the largest batch) and bind it."""
        if any(d < 0 for d in shape):
            raise CstarError(f"tensor {name} of {self.model_path.name} has a data-dependent shape {shape}",
                             "cstar engines have fixed-size outputs; re-export the model")
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        nbytes = int(np.prod(shape)) * dtype.itemsize
        binding = _Binding(name, dtype, memory.alloc(nbytes), nbytes)
        if context.set_tensor_address(name, binding.ptr) is False:
            raise CstarError(f"TensorRT refused the device address of tensor {name}", "rebuild the engine")
        return binding

    def activate_impl(self) -> None:
        trt = _import_trt()
        self._check_compatible(trt)
        memory = _device_memory()
        try:
            runtime, engine = self._deserialize(trt)
            input_name, outputs = self._io_names(trt, engine)
            logits = logits_output(outputs, self.model_path.name)
            shape = tuple(int(d) for d in engine.get_tensor_shape(input_name))
            self._range = self._batch_range(engine, input_name, shape)
            context = engine.create_execution_context()
            if context is None:
                raise CstarError("TensorRT could not create an execution context", "check free GPU memory")
            chw = shape[1:]
            if not context.set_input_shape(input_name, (self._range[1], *chw)):
                raise CstarError(f"TensorRT refused input shape {(self._range[1], *chw)}", "rebuild the engine")
            binding = self._bind(trt, engine, context, memory, input_name, (self._range[1], *chw))
            bound = [self._bind(trt, engine, context, memory, name,
                                tuple(int(d) for d in context.get_tensor_shape(name))) for name in outputs]
        except BaseException:
            memory.close()
            raise
        self._trt, self._runtime, self._engine, self._context, self._memory = trt, runtime, engine, context, memory
        self._input, self._outputs, self._logits = binding, bound, logits
        dtype = "float16" if binding.dtype == np.float16 else "float32"
        self._spec = InputSpec(input_name, (None if shape[0] < 0 else shape[0], *chw), dtype)

    def deactivate_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        self._input, self._outputs = None, []
        self.last_outputs = {}
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def batch_range(self) -> tuple[int, int | None]:
        self._require_active()
        return self._range

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        assert self._memory is not None and self._input is not None
        host_in = np.ascontiguousarray(batch.astype(self._input.dtype, copy=False))
        ctx = self._context
        if not ctx.set_input_shape(self._input.name, tuple(batch.shape)):
            raise CstarError(f"TensorRT refused input shape {tuple(batch.shape)}", "stay within the built batch range")
        self._memory.htod(self._input.ptr, host_in)
        if not ctx.execute_async_v3(self._memory.stream_handle):
            raise CstarError("TensorRT execute_async_v3 failed (see the TensorRT log)", "rebuild the engine")
        outputs: dict[str, np.ndarray] = {}
        for out in self._outputs:  # every output, each at its shape for this batch
            host = np.empty(tuple(int(d) for d in ctx.get_tensor_shape(out.name)), dtype=out.dtype)
            self._memory.dtoh(host, out.ptr)
            outputs[out.name] = host
        self._memory.synchronize()
        self.last_outputs = outputs
        return outputs[self._logits].astype(np.float32, copy=False)

    def describe_impl(self) -> dict[str, Any]:
        info: dict[str, Any] = {"provider": "tensorrt", "gpu": gpu_info()}
        trt = self._trt
        if trt is None and importlib.util.find_spec("tensorrt") is not None:
            trt = _import_trt()
        if trt is not None:
            info["versions"] = {"tensorrt": trt.__version__}
        if self._memory is not None:
            info["device_buffers"] = self._memory.library
        if self._outputs:
            info["outputs"] = [out.name for out in self._outputs]
            info["logits_output"] = self._logits
        build = self._build_info()
        if build is not None:
            info["build"] = build
        info["env"] = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
        return info
