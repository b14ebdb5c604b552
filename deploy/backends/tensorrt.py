"""Native TensorRT: engine building and a runner on the tensor-address API (TensorRT 10.x / 11.x).

Written against the documented Python API: a strongly typed network parsed from ONNX (INT8 comes
from the Q/DQ nodes of `cstar calibrate`, FP16 from an FP16-converted ONNX; TensorRT 11 has no
precision builder flags or calibrators), one optimization profile over the batch range, a timing
cache, `set_input_shape` / `set_tensor_address` / `execute_async_v3` at run time.

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
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import atomic_write_bytes
from deploy.backends.base import InputSpec, Runner

PRECISIONS = ("fp32", "fp16", "int8")
BUILD_INFO_NAME = "build.json"


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


def _fp16_onnx(onnx_path: Path, workdir: Path) -> Path:
    """An FP16 copy of an FP32 ONNX (float32 inputs/outputs kept) via onnxconverter-common."""
    if importlib.util.find_spec("onnxconverter_common") is None or importlib.util.find_spec("onnx") is None:
        raise MissingDependencyError(
            "onnxconverter-common", None,
            "FP16 TensorRT engines (TensorRT takes FP16 from the ONNX types; convert with "
            "ModelOpt AutoCast yourself or install onnxconverter-common)",
        )
    import onnx
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    out = workdir / "model.fp16.onnx"
    onnx.save(model, str(out))
    return out


def _parse(trt: Any, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:  # TensorRT >= 10.x; always on (flag accepted, ignored) in 11.x
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise CstarError(
            f"TensorRT could not parse {onnx_path.name}: {errors or 'unknown error'}",
            "run `cstar export`/`cstar calibrate` again, or check trt_check.preflight(onnx) for unsupported ops",
        )
    return network, parser


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    min_batch: int = 1,
    opt_batch: int = 8,
    max_batch: int = 64,
    precision: str = "fp32",
    timing_cache_path: str | Path | None = None,
    workspace_mb: int = 1024,
) -> dict[str, Any]:
    """Build and serialize a TensorRT engine for `onnx_path`; returns the build info for build.json."""
    trt = _import_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if precision not in PRECISIONS:
        raise CstarError(f"precision {precision!r} is not valid", f"use one of: {', '.join(PRECISIONS)}")
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CstarError(
            f"batch range min {min_batch} <= opt {opt_batch} <= max {max_batch} does not hold",
            "pass 1 <= --min-batch <= --opt-batch <= --max-batch",
        )
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = _logger(trt)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=engine_path.parent) as tmp:
        source = onnx_path
        network, parser = _parse(trt, builder, logger, source)
        if precision == "int8" and not _has_quantize(network, trt):
            raise CstarError(
                f"{onnx_path.name} has no Q/DQ nodes: TensorRT takes INT8 only from explicit quantization",
                "build from a `cstar calibrate` directory (model.int8.onnx)",
            )
        if precision == "fp16" and not _has_half_tensors(network, trt):
            source = _fp16_onnx(onnx_path, Path(tmp))
            network, parser = _parse(trt, builder, logger, source)
        if network.num_inputs != 1:
            raise CstarError(f"{onnx_path.name} has {network.num_inputs} inputs; expected one NCHW image", "re-export")
        inp = network.get_input(0)
        shape = tuple(int(d) for d in inp.shape)
        if len(shape) != 4 or any(d < 0 for d in shape[1:]):
            raise CstarError(f"input {inp.name} has shape {shape}; expected (N, C, H, W) with fixed C, H, W", "re-export")
        chw = shape[1:]
        if shape[0] >= 0 and not min_batch == opt_batch == max_batch == shape[0]:
            raise CstarError(
                f"{onnx_path.name} has a static batch of {shape[0]}, but the build asks for {min_batch}..{max_batch}",
                f"re-export with a dynamic batch, or pass --min-batch {shape[0]} --opt-batch {shape[0]} "
                f"--max-batch {shape[0]}",
            )

        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if precision == "fp32" and tf32 is not None:
            config.clear_flag(tf32)  # FP32 means FP32: TF32 matmuls would widen the parity gap
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (min_batch, *chw), (opt_batch, *chw), (max_batch, *chw))
        config.add_optimization_profile(profile)

        cache_bytes = b""
        if timing_cache_path is not None and Path(timing_cache_path).is_file():
            cache_bytes = Path(timing_cache_path).read_bytes()
        cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(cache, False)

        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise CstarError(
                f"TensorRT failed to build an engine from {onnx_path.name} (see the TensorRT log above)",
                "try a larger --workspace, another precision, or check trt_check.preflight",
            )
        atomic_write_bytes(engine_path, bytes(memoryview(serialized)))
        if timing_cache_path is not None:
            atomic_write_bytes(timing_cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
        del parser

    gpu = gpu_info()
    return {
        "tensorrt_version": trt.__version__,
        "gpu_name": gpu["name"],
        "compute_capability": gpu["compute_capability"],
        "precision": precision,
        "strongly_typed": True,
        "tf32": precision != "fp32",
        "batch": {"min": min_batch, "opt": opt_batch, "max": max_batch},
        "input": {"name": inp.name, "shape": list(chw)},
        "workspace_mb": int(workspace_mb),
        "timing_cache": str(timing_cache_path) if timing_cache_path is not None else None,
        "fp16_converted": source != onnx_path,
    }


# ------------------------------------------------------------------------------------------ runner


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
        self._input_name = ""
        self._output_name = ""
        self._input_dtype: Any = np.float32
        self._output_dtype: Any = np.float32
        self._range: tuple[int, int] = (1, 1)
        self._in_ptr = 0
        self._out_ptr = 0
        self._out_per_item = 0

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

    def activate_impl(self) -> None:
        trt = _import_trt()
        self._check_compatible(trt)
        memory = _device_memory()
        try:
            runtime = trt.Runtime(_logger(trt))
            engine = runtime.deserialize_cuda_engine(self.model_path.read_bytes())
            if engine is None:
                raise CstarError(
                    f"TensorRT {trt.__version__} could not deserialize {self.model_path}",
                    "re-run `cstar build --backend tensorrt` on this machine (engines are version and GPU specific)",
                )
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
            if len(inputs) != 1 or not outputs:
                raise CstarError(f"{self.model_path.name} has inputs {inputs} and outputs {outputs}", "rebuild it")
            self._input_name, self._output_name = inputs[0], outputs[0]
            shape = tuple(int(d) for d in engine.get_tensor_shape(self._input_name))
            if shape[0] >= 0:  # static batch: no profile to read
                self._range = (shape[0], shape[0])
            else:
                low_shape, _, high_shape = engine.get_tensor_profile_shape(self._input_name, 0)
                self._range = (int(low_shape[0]), int(high_shape[0]))
            self._input_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._input_name)))
            self._output_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(self._output_name)))
            context = engine.create_execution_context()
            if context is None:
                raise CstarError("TensorRT could not create an execution context", "check free GPU memory")
            chw = shape[1:]
            if not context.set_input_shape(self._input_name, (self._range[1], *chw)):
                raise CstarError(f"TensorRT refused input shape {(self._range[1], *chw)}", "rebuild the engine")
            out_shape = tuple(int(d) for d in context.get_tensor_shape(self._output_name))
            self._out_per_item = int(np.prod(out_shape[1:])) if len(out_shape) > 1 else 1
            high = self._range[1]
            self._in_ptr = memory.alloc(high * int(np.prod(chw)) * self._input_dtype.itemsize)
            self._out_ptr = memory.alloc(high * self._out_per_item * self._output_dtype.itemsize)
        except BaseException:
            memory.close()
            raise
        self._trt, self._runtime, self._engine, self._context, self._memory = trt, runtime, engine, context, memory
        dtype = "float16" if self._input_dtype == np.float16 else "float32"
        self._spec = InputSpec(self._input_name, (None if shape[0] < 0 else shape[0], *chw), dtype)

    def deactivate_impl(self) -> None:
        self._context = None
        self._engine = None
        self._runtime = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def batch_range(self) -> tuple[int, int | None]:
        self._require_active()
        return self._range

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        assert self._memory is not None
        n = batch.shape[0]
        host_in = np.ascontiguousarray(batch.astype(self._input_dtype, copy=False))
        host_out = np.empty((n, self._out_per_item), dtype=self._output_dtype)
        ctx = self._context
        if not ctx.set_input_shape(self._input_name, tuple(batch.shape)):
            raise CstarError(f"TensorRT refused input shape {tuple(batch.shape)}", "stay within the built batch range")
        ctx.set_tensor_address(self._input_name, self._in_ptr)
        ctx.set_tensor_address(self._output_name, self._out_ptr)
        self._memory.htod(self._in_ptr, host_in)
        if not ctx.execute_async_v3(self._memory.stream_handle):
            raise CstarError("TensorRT execute_async_v3 failed (see the TensorRT log)", "rebuild the engine")
        self._memory.dtoh(host_out, self._out_ptr)
        self._memory.synchronize()
        return host_out.astype(np.float32, copy=False)

    def describe_impl(self) -> dict[str, Any]:
        info: dict[str, Any] = {"provider": "tensorrt", "gpu": gpu_info()}
        trt = self._trt
        if trt is None and importlib.util.find_spec("tensorrt") is not None:
            trt = _import_trt()
        if trt is not None:
            info["versions"] = {"tensorrt": trt.__version__}
        if self._memory is not None:
            info["device_buffers"] = self._memory.library
        build = self._build_info()
        if build is not None:
            info["build"] = build
        info["env"] = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
        return info
