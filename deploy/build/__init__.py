"""`cstar build`: an export or calibrate directory -> a ready-to-run backend directory.

ONNX Runtime and OpenVINO backends get a copy of the ONNX model plus `build.json` (provider or device,
provider/compile and session options, batch range, versions); TensorRT gets `model.engine` built for
this GPU; executorch-xnnpack gets `model.pte` (FP32 lowered from the export's checkpoint, INT8 copied
from a `cstar calibrate --target executorch` directory). Either way the build opens the result once
and runs a smoke inference, so a broken artifact fails here and not on the device. An INT8 source
must be in the format the backend runs correctly and fast (the calibrate manifest's
`quantization.format`): U8S8 is refused for TensorRT (it takes symmetric int8 only), S8S8 for ort-cpu
(ONNX Runtime's x86 kernels run it 2.4x slower than U8S8), Q/DQ ONNX for executorch-xnnpack and
xnnpack-pt2e-int8 (a .pte) for every other backend.
`manifest.json` (stage `build`) is written last; on any error no file is left behind.

The package, one concept per module: `policy` (precision, INT8 format and batch-range rules, refused
before any work), `builders` (one builder per backend family, in `BUILDERS`), `smoke` (the one
inference on the built artifact) and `stage` (`run_build` and the command).
"""

from deploy.build.builders import (
    BUILDERS,
    ENGINE_NAME,
    TRT_CACHE_DIR,
    Builder,
    BuildRequest,
    backend_family,
    build_executorch,
    build_openvino,
    build_ort,
    build_tensorrt,
    builder_for,
    ort_execution_precision,
    ort_trt_timing_cache_dir,
)
from deploy.build.policy import (
    EXECUTORCH_BACKEND,
    PRECISIONS,
    PTE_NAME,
    XNNPACK_FORMAT,
    batch_range,
    check_int8_format,
    int8_format,
    resolve_precision,
)
from deploy.build.smoke import smoke_test
from deploy.build.stage import COPY_THROUGH, VERSION_PACKAGES, add_arguments, main, run_build

__all__ = [
    "BUILDERS", "COPY_THROUGH", "ENGINE_NAME", "EXECUTORCH_BACKEND", "PRECISIONS", "PTE_NAME", "TRT_CACHE_DIR",
    "VERSION_PACKAGES", "XNNPACK_FORMAT", "BuildRequest", "Builder", "add_arguments", "backend_family",
    "batch_range", "build_executorch", "build_openvino", "build_ort", "build_tensorrt", "builder_for",
    "check_int8_format", "int8_format", "main", "ort_execution_precision", "ort_trt_timing_cache_dir",
    "resolve_precision", "run_build", "smoke_test",
]
