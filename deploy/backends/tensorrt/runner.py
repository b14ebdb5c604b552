"""The TensorRT runner: a serialized engine (model.engine) on the current GPU, tensor-address API.

`activate` checks the engine was built by this TensorRT version for this GPU architecture (from
build.json), deserializes it, binds one device buffer per I/O tensor at the largest batch, and sets
the input shape; `infer` uses `set_input_shape` / `execute_async_v3` and copies every output back
(the one named 'logits', or the only one, is returned; the rest stay in `last_outputs`);
`deactivate` frees the buffers.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from deploy.backends.base import BUILD_INFO_NAME, InputSpec, Runner, logits_output
from deploy.backends.tensorrt.cuda import DeviceMemory, device_memory, gpu_info
from deploy.backends.tensorrt.loaders import BytesFromPath, EngineFromBytes, import_trt


@dataclass
class Binding:
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
        self._memory: DeviceMemory | None = None
        self._input: Binding | None = None
        self._outputs: list[Binding] = []
        self._logits = ""
        self._range: tuple[int, int] = (1, 1)
        #: every output of the last infer() (the runner returns the logits; the rest are kept here)
        self.last_outputs: dict[str, np.ndarray] = {}

    def _build_info(self) -> dict[str, Any] | None:
        """The build record: the `build_info` option, else build.json beside the engine, else None."""
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
        """Refuse an engine built by another TensorRT version or for another GPU architecture."""
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

    def _io_names(self, trt: Any, engine: Any) -> tuple[str, list[str]]:
        """(input name, output names) of the engine: exactly one input, at least one output."""
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise CstarError(f"{self.model_path.name} has inputs {inputs} and outputs {outputs}", "rebuild it")
        return inputs[0], outputs

    def _batch_range(self, engine: Any, name: str, shape: tuple[int, ...]) -> tuple[int, int]:
        """(min, max) batch: the static batch, else profile 0's range."""
        if shape[0] >= 0:  # static batch: no profile to read
            return shape[0], shape[0]
        low_shape, _, high_shape = engine.get_tensor_profile_shape(name, 0)
        return int(low_shape[0]), int(high_shape[0])

    def _bind(self, trt: Any, engine: Any, context: Any, memory: Any, name: str, shape: tuple[int, ...]) -> Binding:
        """Allocate a device buffer for tensor `name` at `shape` (the largest batch) and bind it."""
        if any(d < 0 for d in shape):
            raise CstarError(f"tensor {name} of {self.model_path.name} has a data-dependent shape {shape}",
                             "cstar engines have fixed-size outputs; re-export the model")
        dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
        nbytes = int(np.prod(shape)) * dtype.itemsize
        binding = Binding(name, dtype, memory.alloc(nbytes), nbytes)
        if context.set_tensor_address(name, binding.ptr) is False:
            raise CstarError(f"TensorRT refused the device address of tensor {name}", "rebuild the engine")
        return binding

    def activate_impl(self) -> None:
        """Deserialize the engine and bind every I/O tensor's device buffer (freed again on any failure)."""
        trt = import_trt()
        self._check_compatible(trt)
        memory = device_memory()
        try:
            runtime, engine = EngineFromBytes(trt, BytesFromPath(self.model_path), str(self.model_path))()
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
        """Drop the context, engine and runtime and free the device buffers."""
        self._context = None
        self._engine = None
        self._runtime = None
        self._input, self._outputs = None, []
        self.last_outputs = {}
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    def batch_range(self) -> tuple[int, int | None]:
        """(min, max) batch the engine was built for."""
        self._require_active()
        return self._range

    def _copy_outputs(self) -> dict[str, np.ndarray]:
        """Every output of the last execution at its shape for this batch (copies queued on the stream)."""
        assert self._memory is not None
        outputs: dict[str, np.ndarray] = {}
        for out in self._outputs:
            host = np.empty(tuple(int(d) for d in self._context.get_tensor_shape(out.name)), dtype=out.dtype)
            self._memory.dtoh(host, out.ptr)
            outputs[out.name] = host
        return outputs

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        """Run one batch; every output lands in `last_outputs`, the logits are returned as float32."""
        assert self._memory is not None and self._input is not None
        host_in = np.ascontiguousarray(batch.astype(self._input.dtype, copy=False))
        ctx = self._context
        if not ctx.set_input_shape(self._input.name, tuple(batch.shape)):
            raise CstarError(f"TensorRT refused input shape {tuple(batch.shape)}", "stay within the built batch range")
        self._memory.htod(self._input.ptr, host_in)
        if not ctx.execute_async_v3(self._memory.stream_handle):
            raise CstarError("TensorRT execute_async_v3 failed (see the TensorRT log)", "rebuild the engine")
        outputs = self._copy_outputs()
        self._memory.synchronize()
        self.last_outputs = outputs
        return outputs[self._logits].astype(np.float32, copy=False)

    def describe_impl(self) -> dict[str, Any]:
        """GPU, TensorRT version, device buffer library, outputs and the build record."""
        info: dict[str, Any] = {"provider": "tensorrt", "gpu": gpu_info()}
        trt = self._trt
        if trt is None and importlib.util.find_spec("tensorrt") is not None:
            trt = import_trt()
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
