"""OpenVINO runners: CPU, GPU and NPU devices (torch-free; `pip install 'cstar[openvino]'`).

OpenVINO reads the ONNX model directly (its ONNX frontend turns explicit Q/DQ into real INT8 kernels
on the CPU), so a build directory holds the same `model.onnx` / `model.int8.onnx` plus build.json.
The CPU's default inference precision is bf16 on CPUs that have it; these runners ask for f32 unless
told otherwise, so an "fp32" artifact computes in FP32 (and matches ONNX Runtime to ~1e-6) and an
INT8 artifact runs its non-quantized layers in FP32. A device OpenVINO does not see here is refused
with a CstarError: a 'GPU' number measured elsewhere would be a lie.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.base import InputSpec, Runner

INFERENCE_PRECISIONS = ("f32", "bf16", "f16")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")
_OV_DTYPES = {"f32": "float32", "f16": "float16", "f64": "float64"}


def import_openvino() -> Any:
    """The openvino module, or a MissingDependencyError naming the extra that installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError("openvino", "openvino", "the OpenVINO backends") from exc
    return openvino


def device_present(device: str, available: list[str]) -> bool:
    """Whether `device` (CPU, GPU, NPU) is among OpenVINO's devices ('GPU.0', 'GPU.1' count as GPU)."""
    return any(name == device or name.startswith(device + ".") for name in available)


def available_devices() -> list[str]:
    """OpenVINO's devices on this machine (e.g. ['CPU', 'GPU.0', 'NPU'])."""
    return list(import_openvino().Core().available_devices)


def check_device(backend: str, device: str) -> None:
    """Raise a CstarError naming the devices OpenVINO does see when `device` is absent."""
    found = available_devices()
    if device_present(device, found):
        return
    raise CstarError(
        f"the '{backend}' backend needs an OpenVINO {device} device, but OpenVINO sees only: "
        f"{', '.join(found) or 'none'}",
        f"use --backend openvino-cpu, or run on a machine with an Intel {device} and its driver "
        f"(OpenVINO lists it in openvino.Core().available_devices)",
    )


class OpenvinoRunner(Runner):
    """One compiled OpenVINO model on one device."""

    name = "openvino"
    device = "CPU"
    OPTIONS = Runner.OPTIONS | {"intra_op_threads", "inference_precision", "performance_hint", "config"}

    def __init__(self, model_path: str | Path, **options: Any) -> None:
        super().__init__(model_path, **options)
        precision = self.options.get("inference_precision", "f32")
        if precision not in INFERENCE_PRECISIONS:
            raise CstarError(f"inference_precision {precision!r} is not valid",
                             f"use one of: {', '.join(INFERENCE_PRECISIONS)}")
        hint = self.options.get("performance_hint", "LATENCY")
        if hint not in PERFORMANCE_HINTS:
            raise CstarError(f"performance_hint {hint!r} is not valid", f"use one of: {', '.join(PERFORMANCE_HINTS)}")
        threads = self.options.get("intra_op_threads")
        if threads is not None and int(threads) < 1:
            raise CstarError(f"intra_op_threads must be >= 1, got {threads}", "pass a positive thread count")
        self._compiled: Any = None
        self._request: Any = None

    # ------------------------------------------------------------------ compile
    def compile_config(self) -> dict[str, Any]:
        """Properties passed to Core.compile_model (threads only apply to the CPU; `config` overrides)."""
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.options.get("performance_hint", "LATENCY")}
        if self.device != "NPU" or "inference_precision" in self.options:  # the NPU picks its own precision
            config["INFERENCE_PRECISION_HINT"] = self.options.get("inference_precision", "f32")
        if self.device == "CPU" and self.options.get("intra_op_threads") is not None:
            config["INFERENCE_NUM_THREADS"] = int(self.options["intra_op_threads"])
        config.update(self.options.get("config") or {})
        return config

    def activate_impl(self) -> None:
        ov = import_openvino()
        check_device(self.name, self.device)
        core = ov.Core()
        try:
            model = core.read_model(str(self.model_path))
        except Exception as exc:  # openvino raises its own RuntimeError subclasses
            raise CstarError(
                f"OpenVINO could not read {self.model_path}: {exc}",
                "check the file is a valid ONNX model written by `cstar export`/`cstar calibrate`",
            ) from exc
        if len(model.inputs) != 1:
            raise CstarError(
                f"{self.model_path.name} has {len(model.inputs)} inputs; cstar models take one NCHW image tensor",
                "export the model with `cstar export`",
            )
        port = model.input(0)
        shape = tuple(int(d.get_length()) if d.is_static else None for d in port.get_partial_shape())
        if len(shape) != 4:
            raise CstarError(f"{self.model_path.name} input has rank {len(shape)}, expected NCHW", "re-export the model")
        try:
            compiled = core.compile_model(model, self.device, self.compile_config())
        except Exception as exc:
            raise CstarError(
                f"OpenVINO could not compile {self.model_path.name} for {self.device}: {exc}",
                "check the model and the options (config, inference_precision) of this build",
            ) from exc
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        dtype = _OV_DTYPES.get(port.get_element_type().get_type_name(), "float32")
        self._spec = InputSpec(port.any_name, shape, dtype)

    def deactivate_impl(self) -> None:
        self._request = None
        self._compiled = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        feed = batch if self.input_spec.dtype == "float32" else batch.astype(self.input_spec.dtype)
        try:
            self._request.infer({0: feed})
            out = self._request.get_output_tensor(0).data
        except Exception as exc:
            raise CstarError(
                f"OpenVINO ({self.device}) failed on a batch of shape {tuple(batch.shape)}: {exc}",
                "check the input matches the model (manifest input.shape) and the OpenVINO installation",
            ) from exc
        return np.array(out, dtype=np.float32, copy=True)

    # ------------------------------------------------------------------ reports
    def execution_precisions(self) -> dict[str, dict[str, int]]:
        """{layer type: {runtime precision: count}} for Convolution/MatMul/FullyConnected as compiled.

        The evidence that an INT8 artifact really runs INT8 kernels (u8/i8), not fake-quantized f32.
        """
        if self._compiled is None:
            return {}
        counts: dict[str, dict[str, int]] = {}
        for op in self._compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or "runtimePrecision" not in info:
                continue
            kind = str(info["layerType"].astype(str))
            if kind not in ("Convolution", "MatMul", "FullyConnected"):
                continue
            precision = str(info["runtimePrecision"].astype(str))
            counts.setdefault(kind, {}).setdefault(precision, 0)
            counts[kind][precision] += 1
        return counts

    def describe_impl(self) -> dict[str, Any]:
        ov = import_openvino()
        info: dict[str, Any] = {"device": self.device, "versions": {"openvino": ov.__version__},
                                "compile_config": self.compile_config()}
        if self._compiled is not None:
            properties = {}
            for key in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "NUM_STREAMS"):
                try:
                    properties[key] = _property_text(self._compiled.get_property(key))
                except Exception:  # noqa: BLE001 - not every device reports every property
                    continue
            info["compiled_properties"] = properties
            info["execution_precisions"] = self.execution_precisions()
            with contextlib.suppress(Exception):  # a device may not report its name
                info["device_name"] = str(ov.Core().get_property(self.device, "FULL_DEVICE_NAME"))
        return info


def _property_text(value: Any) -> str:
    """An OpenVINO property as plain text (element types as 'f32', not "<Type: 'float32'>")."""
    name = getattr(value, "get_type_name", None)
    return str(name()) if callable(name) else str(value)


class OpenvinoCpuRunner(OpenvinoRunner):
    """OpenVINO on the CPU."""

    name = "openvino-cpu"
    device = "CPU"


class OpenvinoGpuRunner(OpenvinoRunner):
    """OpenVINO on an Intel GPU (integrated or discrete); refused where OpenVINO sees none."""

    name = "openvino-gpu"
    device = "GPU"


class OpenvinoNpuRunner(OpenvinoRunner):
    """OpenVINO on an Intel NPU; refused where OpenVINO sees none."""

    name = "openvino-npu"
    device = "NPU"
