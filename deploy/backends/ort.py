"""ONNX Runtime runners: CPU, CUDA and TensorRT execution providers (torch-free).

A runner refuses to start when its execution provider is not compiled into the installed
onnxruntime, and refuses to run when ONNX Runtime silently fell back to the CPU provider: a
'CUDA' number measured on the CPU would be a lie. ONNX Runtime can also fall back node by node
(a kernel the GPU provider lacks runs on the CPU while the session still lists the GPU first), so
ort-cuda/ort-trt profile their first run once at activation (`SessionOptions.enable_profiling`: each
Node event names its provider) and warn, or raise with provider_check='strict', on CPU compute nodes.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.base import InputSpec, Runner, logits_output

OPT_LEVELS = ("disable", "basic", "extended", "all")
_ORT_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64"}
PROVIDER_CHECKS = ("warn", "strict", "off")
# outputs of shape arithmetic, which ONNX Runtime keeps on the CPU on purpose next to a GPU provider
SHAPE_TYPES = frozenset({"int64", "int32", "bool"})
_KERNEL_SUFFIX = "_kernel_time"


@dataclass(frozen=True)
class NodePlacement:
    """Where one graph node ran, from an ONNX Runtime profile."""

    node: str
    op: str
    provider: str
    output_types: tuple[str, ...]

    @property
    def computes(self) -> bool:
        """False for shape arithmetic (every output int64/int32/bool), which is meant to run on the CPU."""
        return not self.output_types or any(t not in SHAPE_TYPES for t in self.output_types)


def node_placements(events: Iterable[dict[str, Any]]) -> list[NodePlacement]:
    """Every node kernel of a profile (`end_profiling()` JSON events), once per node, in run order."""
    seen: dict[str, NodePlacement] = {}
    for event in events:
        args = event.get("args") or {}
        name = str(event.get("name", ""))
        if event.get("cat") != "Node" or not name.endswith(_KERNEL_SUFFIX) or "provider" not in args:
            continue
        node = name[: -len(_KERNEL_SUFFIX)]
        types = tuple(str(t) for out in args.get("output_type_shape") or [] if isinstance(out, dict) for t in out)
        seen.setdefault(node, NodePlacement(node, str(args.get("op_name", "")), str(args["provider"]), types))
    return list(seen.values())


def fallback_nodes(events: Iterable[dict[str, Any]], expected: str | Sequence[str]) -> list[NodePlacement]:
    """Compute nodes that ran on a provider other than `expected` (one name or several accepted ones)."""
    accepted = {expected} if isinstance(expected, str) else set(expected)
    return [p for p in node_placements(events) if p.computes and p.provider not in accepted]


def profile_events(path: str | Path) -> list[dict[str, Any]]:
    """The events of an ONNX Runtime profile file (a JSON list, or {"traceEvents": [...]})."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    events = data.get("traceEvents", []) if isinstance(data, dict) else data
    return [e for e in events if isinstance(e, dict)]


def _fallback_message(placements: list[NodePlacement], provider: str, backend: str, model: str) -> str:
    shown = ", ".join(f"{p.node} ({p.op} on {p.provider})" for p in placements[:8])
    more = f" and {len(placements) - 8} more" if len(placements) > 8 else ""
    return (f"ONNX Runtime ran {len(placements)} compute node(s) of {model} outside {provider}: {shown}{more}; "
            f"'{backend}' outputs and timings are partly CPU")


_FALLBACK_HINT = ("the provider has no kernel for these ops/types: re-export with supported ops (see ORT verbose "
                  "logs for 'Node placements'), use --backend tensorrt, or accept it with provider_check='warn'")


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
        "provider_check",
    }
    #: providers a compute node may run on; empty = no placement check (ort-cpu: nothing to fall back to)
    placement_providers: tuple[str, ...] = ()

    def __init__(self, model_path: str | Path, **options: Any) -> None:
        super().__init__(model_path, **options)
        level = self.options.get("graph_optimization_level", "all")
        if level not in OPT_LEVELS:
            raise CstarError(f"graph_optimization_level {level!r} is not valid", f"use one of: {', '.join(OPT_LEVELS)}")
        check = self.options.get("provider_check", "warn")
        if check not in PROVIDER_CHECKS:
            raise CstarError(f"provider_check {check!r} is not valid", f"use one of: {', '.join(PROVIDER_CHECKS)}")
        self._session: Any = None
        self._placements: list[NodePlacement] | None = None
        self._input_name = ""
        self._output_name = ""

    # ------------------------------------------------------------------ session
    def session_options(self, profile_prefix: str | None = None) -> Any:
        """onnxruntime.SessionOptions from this runner's options (profiling on when a prefix is given)."""
        ort = _import_ort()
        so = ort.SessionOptions()
        if profile_prefix is not None:
            so.enable_profiling = True
            so.profile_file_prefix = profile_prefix
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

    def checks_placement(self) -> bool:
        """Whether activation profiles one run to find node-level fallback (GPU providers only)."""
        return bool(self.placement_providers) and self.options.get("provider_check", "warn") != "off"

    def activate_impl(self) -> None:
        if not self.checks_placement():
            self._activate()
            return
        with tempfile.TemporaryDirectory(prefix="cstar-ort-profile-") as tmp:
            self._activate(str(Path(tmp) / "placement"))

    def _activate(self, profile_prefix: str | None = None) -> None:
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
                str(self.model_path), sess_options=self.session_options(profile_prefix), providers=self.providers()
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
        spec = InputSpec(inp.name, shape, _ORT_DTYPES.get(inp.type, "float32"))
        output_name = logits_output([o.name for o in session.get_outputs()], self.model_path.name)
        if profile_prefix is not None:
            self._check_placement(session, spec, output_name)
        self._session = session
        self._input_name = inp.name
        self._output_name = output_name
        self._spec = spec

    def _profiled_run(self, session: Any, spec: InputSpec, output_name: str) -> list[dict[str, Any]]:
        """Run zeros once on a profiling session, end profiling (later runs are not profiled), read events."""
        low = int(self.options.get("min_batch") or 1) if spec.static_batch is None else spec.static_batch
        shape = (low, *(d if d is not None else 1 for d in spec.chw))
        try:
            session.run([output_name], {spec.name: np.zeros(shape, dtype=spec.dtype)})
        except Exception as exc:
            raise CstarError(
                f"ONNX Runtime ({self.provider}) failed a first run of {self.model_path.name} on zeros {shape}: {exc}",
                "check the model and the GPU runtime libraries (CUDA/cuDNN/TensorRT versions)",
            ) from exc
        path = session.end_profiling()
        if not path:
            return []
        try:
            return profile_events(path)
        finally:
            Path(path).unlink(missing_ok=True)

    def _check_placement(self, session: Any, spec: InputSpec, output_name: str) -> None:
        """Warn (or raise with provider_check='strict') when compute nodes ran outside the GPU providers."""
        events = self._profiled_run(session, spec, output_name)
        self._placements = node_placements(events)
        fallen = fallback_nodes(events, self.placement_providers)
        if not fallen:
            return
        message = _fallback_message(fallen, self.provider, self.name, self.model_path.name)
        if self.options.get("provider_check", "warn") == "strict":
            raise CstarError(message, _FALLBACK_HINT)
        warnings.warn(f"{message} (fix: {_FALLBACK_HINT})", UserWarning, stacklevel=5)

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
        if self._placements is not None:
            info["node_providers"] = dict(Counter(p.provider for p in self._placements))
            info["fallback_nodes"] = [
                {"node": p.node, "op": p.op, "provider": p.provider}
                for p in self._placements if p.computes and p.provider not in self.placement_providers
            ]
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
    placement_providers = ("CUDAExecutionProvider",)


class OrtTensorrtRunner(OrtRunner):
    """ONNX Runtime on the TensorRT execution provider (CUDA for nodes TensorRT does not take)."""

    name = "ort-trt"
    provider = "TensorrtExecutionProvider"
    placement_providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider")  # CUDA takes what TRT does not
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
