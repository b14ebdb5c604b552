"""Native TensorRT: engine building and a runner on the tensor-address API (TensorRT 10.x / 11.x).

Written against the documented Python API: a strongly typed network parsed from ONNX (INT8 comes
from the Q/DQ nodes of `cstar calibrate`, FP16 from an FP16-converted ONNX; TensorRT 11 has no
precision builder flags or calibrators), one optimization profile over the batch range, a timing
cache, `set_input_shape` / `set_tensor_address` / `execute_async_v3` at run time (every output
bound; the one named 'logits', or the only one, is returned).

The package, one concern per module: `cuda` (GPU info, device buffers from cuda-python or torch),
`loaders` (the lazy `import tensorrt` and Polygraphy-style engine loaders), `network` (ONNX parsing,
network inspection, the batch profile), `build` (builder config, precision flags, timing cache, the
build record, `build_engine`) and `runner` (`TensorrtRunner`). The building steps take the `trt`
module as an argument, so tests check each one with a fake module. Importing the package needs
neither tensorrt nor cuda-python nor torch.
"""

from deploy.backends.base import logits_output
from deploy.backends.tensorrt.build import (
    PRECISIONS,
    TimingCacheUse,
    build_config,
    build_engine,
    build_record,
    load_timing_cache,
    save_timing_cache,
)
from deploy.backends.tensorrt.cuda import (
    CudartMemory,
    DeviceMemory,
    TorchMemory,
    device_buffer_library,
    device_memory,
    gpu_info,
    import_cudart,
)
from deploy.backends.tensorrt.loaders import (
    BytesFromPath,
    EngineBytesFromNetwork,
    EngineFromBytes,
    SaveEngine,
    import_trt,
    invoke_if_callable,
    save_engine,
    serialized_engine,
    trt_logger,
)
from deploy.backends.tensorrt.network import (
    ProfileShapes,
    batch_profile_shapes,
    fp16_onnx,
    has_half_tensors,
    has_quantize,
    is_strongly_typed,
    network_flags,
    network_from_onnx,
    optimization_profile,
    parse_for_precision,
    require_fp16_converter,
)
from deploy.backends.tensorrt.runner import Binding, TensorrtRunner

__all__ = [
    "PRECISIONS", "Binding", "BytesFromPath", "CudartMemory", "DeviceMemory", "EngineBytesFromNetwork",
    "EngineFromBytes", "ProfileShapes", "SaveEngine", "TensorrtRunner", "TimingCacheUse", "TorchMemory",
    "batch_profile_shapes", "build_config", "build_engine", "build_record", "device_buffer_library",
    "device_memory", "fp16_onnx", "gpu_info", "has_half_tensors", "has_quantize", "import_cudart",
    "import_trt", "invoke_if_callable", "is_strongly_typed", "load_timing_cache", "logits_output",
    "network_flags", "network_from_onnx", "optimization_profile", "parse_for_precision",
    "require_fp16_converter", "save_engine", "save_timing_cache", "serialized_engine", "trt_logger",
]
