"""ONNX Runtime runners: CPU, CUDA and TensorRT execution providers (torch-free).

A runner refuses to start when its execution provider is not compiled into the installed
onnxruntime, and refuses to run when ONNX Runtime silently fell back to the CPU provider: a
'CUDA' number measured on the CPU would be a lie.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.base import InputSpec, Runner

OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError("onnxruntime", None, "the ONNX Runtime backends") from exc
    return onnxruntime


def _dims(shape: Any) -> tuple[int | None, ...]:
    """ONNX Runtime shape (ints, strings or None for symbolic dims) -> ints / None."""
    return tuple(d if isinstance(d, int) and d > 0 else None for d in shape)


class OrtRunner(Runner):
    """One ONNX Runtime session on one execution provider."""

    name = "ort"
    provider = "CPUExecutionProvider"
    OPTIONS = Runner.OPTIONS | {
        "intra_op_threads",
        "inter_op_threads",
        "graph_optimization_level",
        "provider_options",
    }

    def __init__(self, model_path: str | Path, **options: Any) -> None:
        super().__init__(model_path, **options)
        level = self.options.get("graph_optimization_level", "all")
        if level not in OPT_LEVELS:
            raise CstarError(f"graph_optimization_level {level!r} is not valid", f"use one of: {', '.join(OPT_LEVELS)}")
        self._session: Any = None
        self._input_name = ""
        self._output_name = ""

    # ------------------------------------------------------------------ session
    def session_options(self) -> Any:
        """onnxruntime.SessionOptions from this runner's options."""
        ort = _import_ort()
        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[self.options.get("graph_optimization_level", "all")]
        if self.options.get("intra_op_threads") is not None:
            so.intra_op_num_threads = int(self.options["intra_op_threads"])
        if self.options.get("inter_op_threads") is not None:
            so.inter_op_num_threads = int(self.options["inter_op_threads"])
        so.log_severity_level = 3  # errors only: warnings about unused initializers are noise here
        return so

    def provider_options(self) -> dict[str, Any]:
        """Options passed to this runner's execution provider."""
        return dict(self.options.get("provider_options") or {})

    def providers(self) -> list[Any]:
        """The providers list given to InferenceSession (requested provider first)."""
        return [(self.provider, self.provider_options())]

    def activate_impl(self) -> None:
        ort = _import_ort()
        available = ort.get_available_providers()
        if self.provider not in available:
            raise MissingDependencyError(
                "onnxruntime-gpu", "gpu",
                f"the '{self.name}' backend ({self.provider} is not in this onnxruntime's providers: "
                f"{', '.join(available)})",
            )
        try:
            session = ort.InferenceSession(
                str(self.model_path), sess_options=self.session_options(), providers=self.providers()
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise CstarError(
                f"ONNX Runtime ({self.provider}) could not load {self.model_path}: {exc}",
                "check the file is a valid ONNX model written by `cstar export`/`cstar calibrate`",
            ) from exc
        active = session.get_providers()
        if not active or active[0] != self.provider:
            raise CstarError(
                f"ONNX Runtime fell back from {self.provider} to {active[0] if active else 'nothing'} "
                f"for {self.model_path.name}: results would not come from the '{self.name}' backend",
                "check the GPU driver, CUDA/cuDNN/TensorRT libraries and onnxruntime-gpu version "
                "(onnxruntime.get_device(), ORT verbose logs), or use --backend ort-cpu",
            )
        inputs = session.get_inputs()
        if len(inputs) != 1:
            raise CstarError(
                f"{self.model_path.name} has {len(inputs)} inputs; cstar models take one NCHW image tensor",
                "export the model with `cstar export`",
            )
        inp = inputs[0]
        shape = _dims(inp.shape)
        if len(shape) != 4:
            raise CstarError(f"{self.model_path.name} input has rank {len(shape)}, expected NCHW", "re-export the model")
        self._session = session
        self._input_name = inp.name
        self._output_name = session.get_outputs()[0].name
        self._spec = InputSpec(inp.name, shape, _ORT_DTYPES.get(inp.type, "float32"))

    def deactivate_impl(self) -> None:
        self._session = None

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        feed = batch if self.input_spec.dtype == "float32" else batch.astype(self.input_spec.dtype)
        try:
            (out,) = self._session.run([self._output_name], {self._input_name: feed})
        except Exception as exc:
            raise CstarError(
                f"ONNX Runtime ({self.provider}) failed on a batch of shape {tuple(batch.shape)}: {exc}",
                "check the input matches the model (manifest input.shape) and the runtime installation",
            ) from exc
        return np.asarray(out, dtype=np.float32)

    def describe_impl(self) -> dict[str, Any]:
        ort = _import_ort()
        info: dict[str, Any] = {"provider": self.provider, "versions": {"onnxruntime": ort.__version__}}
        if self._session is not None:
            info["providers"] = list(self._session.get_providers())
            info["provider_options"] = {
                k: v for k, v in self._session.get_provider_options().items() if k == self.provider
            }
        else:
            info["provider_options"] = {self.provider: self.provider_options()}
        info["session_options"] = {
            "intra_op_threads": self.options.get("intra_op_threads"),
            "inter_op_threads": self.options.get("inter_op_threads"),
            "graph_optimization_level": self.options.get("graph_optimization_level", "all"),
        }
        return info


class OrtCpuRunner(OrtRunner):
    """ONNX Runtime on the CPU execution provider."""

    name = "ort-cpu"
    provider = "CPUExecutionProvider"


class OrtCudaRunner(OrtRunner):
    """ONNX Runtime on the CUDA execution provider (onnxruntime-gpu)."""

    name = "ort-cuda"
    provider = "CUDAExecutionProvider"


class OrtTensorrtRunner(OrtRunner):
    """ONNX Runtime on the TensorRT execution provider (CUDA for nodes TensorRT does not take)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    OPTIONS = OrtRunner.OPTIONS | {
        "trt_fp16_enable",
        "trt_int8_enable",
        "trt_engine_cache_path",
        "trt_timing_cache_path",
        "workspace_mb",
    }

    def provider_options(self) -> dict[str, Any]:
        opts: dict[str, Any] = {}
        if self.options.get("trt_fp16_enable"):
            opts["trt_fp16_enable"] = True
        if self.options.get("trt_int8_enable"):
            opts["trt_int8_enable"] = True
        if self.options.get("trt_engine_cache_path"):
            Path(self.options["trt_engine_cache_path"]).mkdir(parents=True, exist_ok=True)
            opts["trt_engine_cache_enable"] = True
            opts["trt_engine_cache_path"] = str(self.options["trt_engine_cache_path"])
        if self.options.get("trt_timing_cache_path"):  # a folder: ORT names the cache file inside it
            Path(self.options["trt_timing_cache_path"]).mkdir(parents=True, exist_ok=True)
            opts["trt_timing_cache_enable"] = True
            opts["trt_timing_cache_path"] = str(self.options["trt_timing_cache_path"])
        if self.options.get("workspace_mb"):
            opts["trt_max_workspace_size"] = int(self.options["workspace_mb"]) << 20
        opts.update(self._profile_shapes(opts))
        opts.update(super().provider_options())
        return opts

    def _profile_shapes(self, opts: dict[str, Any]) -> dict[str, str]:
        """Explicit TensorRT profile over [min_batch, max_batch] for dynamic-batch models."""
        user = self.options.get("provider_options") or {}
        if "trt_profile_min_shapes" in user or self.options.get("max_batch") is None:
            return {}
        ort = _import_ort()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        so.log_severity_level = 3
        try:
            inp = ort.InferenceSession(str(self.model_path), so, providers=["CPUExecutionProvider"]).get_inputs()[0]
        except Exception as exc:
            raise CstarError(f"could not read the input of {self.model_path}: {exc}", "re-export the model") from exc
        shape = _dims(inp.shape)
        if shape[0] is not None or any(d is None for d in shape[1:]):
            return {}
        chw = "x".join(str(d) for d in shape[1:])
        low = int(self.options.get("min_batch") or 1)
        high = int(self.options["max_batch"])
        opt = int(self.options.get("opt_batch") or max(low, min(high, 8)))
        return {
            "trt_profile_min_shapes": f"{inp.name}:{low}x{chw}",
            "trt_profile_opt_shapes": f"{inp.name}:{opt}x{chw}",
            "trt_profile_max_shapes": f"{inp.name}:{high}x{chw}",
        }

    def providers(self) -> list[Any]:
        return [(self.provider, self.provider_options()), ("CUDAExecutionProvider", {})]
