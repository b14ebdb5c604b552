"""Backend registry: name -> runner class, imported only when used (torch-free)."""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.base import Runner

# name -> (module, class, required package (pip name), extra that installs it)
BACKENDS: dict[str, tuple[str, str, str, str | None]] = {
    "ort-cpu": ("deploy.backends.ort", "OrtCpuRunner", "onnxruntime", None),
    "ort-cuda": ("deploy.backends.ort", "OrtCudaRunner", "onnxruntime-gpu", "gpu"),
    "ort-trt": ("deploy.backends.ort", "OrtTensorrtRunner", "onnxruntime-gpu", "gpu"),
    "tensorrt": ("deploy.backends.tensorrt", "TensorrtRunner", "tensorrt", "tensorrt"),
    "openvino-cpu": ("deploy.backends.openvino", "OpenvinoCpuRunner", "openvino", "openvino"),
    "openvino-gpu": ("deploy.backends.openvino", "OpenvinoGpuRunner", "openvino", "openvino"),
    "openvino-npu": ("deploy.backends.openvino", "OpenvinoNpuRunner", "openvino", "openvino"),
    "executorch-xnnpack": ("deploy.backends.executorch", "ExecutorchXnnpackRunner", "executorch", "executorch"),
}

# OpenVINO device each openvino-* backend needs
OPENVINO_DEVICES: dict[str, str] = {"openvino-cpu": "CPU", "openvino-gpu": "GPU", "openvino-npu": "NPU"}

# ONNX Runtime execution provider each ort-* backend needs
ORT_PROVIDERS: dict[str, str] = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
}


# backend -> the `cstar calibrate --target` whose INT8 format that backend runs fast and correctly
CALIBRATE_TARGETS: dict[str, str] = {
    "ort-cpu": "ort-cpu", "ort-cuda": "tensorrt", "ort-trt": "tensorrt", "tensorrt": "tensorrt",
    "openvino-cpu": "openvino", "openvino-gpu": "openvino", "openvino-npu": "openvino",
    "executorch-xnnpack": "executorch",
}


def calibrate_target(backend: str) -> str:
    """The calibrate target of `backend`'s INT8 format (ort-cpu for a backend not listed)."""
    return CALIBRATE_TARGETS.get(backend, "ort-cpu")


def backend_names() -> list[str]:
    """Every backend name, in preference order for edge deployment."""
    return list(BACKENDS)


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise CstarError(f"unknown backend '{name}'", f"use one of: {', '.join(backend_names())}")


def backend_available(name: str) -> tuple[bool, str]:
    """(available, reason): whether the runtime `name` needs is installed here."""
    _check_name(name)
    if name in ORT_PROVIDERS:
        if importlib.util.find_spec("onnxruntime") is None:
            return False, "onnxruntime is not installed"
        import onnxruntime

        provider = ORT_PROVIDERS[name]
        available = onnxruntime.get_available_providers()
        if provider not in available:
            return False, (
                f"onnxruntime {onnxruntime.__version__} has no {provider} (available: {', '.join(available)}); "
                "install onnxruntime-gpu"
            )
        return True, f"onnxruntime {onnxruntime.__version__} with {provider}"
    if name in OPENVINO_DEVICES:
        return _openvino_available(OPENVINO_DEVICES[name])
    if name == "executorch-xnnpack":
        return _executorch_available()
    if importlib.util.find_spec("tensorrt") is None:
        return False, "the tensorrt Python package is not installed"
    from deploy.backends.tensorrt import device_buffer_library

    library = device_buffer_library()
    if library is None:
        return False, "tensorrt is installed but neither cuda-python nor torch (for device buffers) is"
    return True, f"tensorrt with {library} device buffers"


def _openvino_available(device: str) -> tuple[bool, str]:
    if importlib.util.find_spec("openvino") is None:
        return False, "openvino is not installed"
    from deploy.backends.openvino import available_devices, device_present, import_openvino

    version = import_openvino().__version__
    found = available_devices()
    if not device_present(device, found):
        return False, f"openvino {version} sees no {device} device (available: {', '.join(found) or 'none'})"
    return True, f"openvino {version} with {device}"


def _executorch_available() -> tuple[bool, str]:
    ok, reason, _ = _executorch_status()
    return ok, reason


def _executorch_status() -> tuple[bool, str, str]:
    """(available, reason, pip package that fixes it): executorch, the torch its runtime links, XNNPACK."""
    if importlib.util.find_spec("executorch") is None:
        return False, "executorch is not installed (its Python runtime also needs torch)", "executorch"
    from deploy.backends.executorch import executorch_version, xnnpack_registered

    version = executorch_version()
    torch_missing = (False, f"executorch {version} is installed but torch is not (the ExecuTorch Python runtime "
                            "links libtorch)", "torch")
    if importlib.util.find_spec("torch") is None:
        return torch_missing
    try:
        import executorch.runtime as runtime
    except ImportError as exc:
        root: BaseException = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__  # type: ignore[assignment]
        if isinstance(root, ModuleNotFoundError) and (root.name or "").split(".")[0] == "torch":
            return torch_missing
        return False, f"executorch {version} is installed but its runtime does not import: {root}", "executorch"
    if not xnnpack_registered(runtime):
        return False, f"executorch {version} was built without the XnnpackBackend delegate", "executorch"
    return True, f"executorch {version} with XnnpackBackend", "executorch"


def require_backend(name: str) -> None:
    """Raise MissingDependencyError (with the pip extra) when backend `name` cannot run here.

    An installed OpenVINO without the device (GPU, NPU) is a CstarError: no pip install fixes that.
    """
    ok, reason = backend_available(name)
    if ok:
        return
    _, _, package, extra = BACKENDS[name]
    if name in OPENVINO_DEVICES and importlib.util.find_spec("openvino") is not None:
        from deploy.backends.openvino import check_device

        check_device(name, OPENVINO_DEVICES[name])
    if name == "executorch-xnnpack":
        package = _executorch_status()[2]  # torch when executorch is there but its runtime cannot load torch
    if name == "tensorrt" and importlib.util.find_spec("tensorrt") is not None:
        raise MissingDependencyError("cuda-python", None, f"the '{name}' backend ({reason})")
    raise MissingDependencyError(package, extra, f"the '{name}' backend ({reason})")


def runner_class(name: str) -> type[Runner]:
    """The Runner subclass of backend `name` (imports its module)."""
    _check_name(name)
    module_name, class_name, _, _ = BACKENDS[name]
    module = importlib.import_module(module_name)
    return getattr(module, class_name)  # type: ignore[no-any-return, unused-ignore]


def create_runner(name: str, model_path: str | Path, **options: Any) -> Runner:
    """An inactive runner for `model_path` on backend `name` (use it as a context manager)."""
    _check_name(name)
    require_backend(name)
    return runner_class(name)(model_path, **options)
