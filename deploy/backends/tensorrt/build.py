"""Building a TensorRT engine: builder config (workspace, precision flags, profile), timing cache, record.

`build_engine` composes the steps: network_from_onnx (via parse_for_precision) -> batch_profile_shapes
-> optimization_profile -> build_config (with load_timing_cache) -> the plan, saved atomically ->
save_timing_cache, then build_record reads back what the network and config really hold for build.json.
TensorRT 11 has no precision builder flags or calibrators: precision comes from a strongly typed
network; only a weakly typed one (TensorRT 10) gets the FP16/INT8 flag.
"""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.manifest import atomic_write_bytes
from deploy.backends.base import logits_output
from deploy.backends.tensorrt.cuda import gpu_info
from deploy.backends.tensorrt.loaders import EngineBytesFromNetwork, SaveEngine, import_trt, trt_logger
from deploy.backends.tensorrt.network import (
    batch_profile_shapes,
    has_half_tensors,
    has_quantize,
    is_strongly_typed,
    optimization_profile,
    parse_for_precision,
)

PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class TimingCacheUse:
    """What happened to the timing cache file: bytes read into the build and bytes written back."""

    path: str
    loaded_bytes: int
    saved_bytes: int = 0
    discarded: bool = False  # the file was from another TensorRT version or GPU and was not used


def _check_precision(precision: str) -> None:
    """Refuse a precision outside PRECISIONS, naming the valid ones."""
    if precision not in PRECISIONS:
        raise CstarError(f"precision {precision!r} is not valid", f"use one of: {', '.join(PRECISIONS)}")


def _check_batch_range(min_batch: int, opt_batch: int, max_batch: int) -> None:
    """Refuse a batch range that is not 1 <= min <= opt <= max."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise CstarError(
            f"batch range min {min_batch} <= opt {opt_batch} <= max {max_batch} does not hold",
            "pass 1 <= --min-batch <= --opt-batch <= --max-batch",
        )


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
    _check_precision(precision)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    _set_precision_flags(trt, config, network, precision)
    if config.add_optimization_profile(profile) < 0:
        raise CstarError("TensorRT refused the optimization profile", "check --min/--opt/--max-batch")
    return config, load_timing_cache(trt, config, timing_cache_path)


def _builder_flags(trt: Any, config: Any) -> dict[str, bool | None]:
    """{fp16, int8, tf32}: each builder flag as set on `config` (None where this TensorRT lacks it)."""
    flags: dict[str, bool | None] = {}
    for key, name in (("fp16", "FP16"), ("int8", "INT8"), ("tf32", "TF32")):
        flag = getattr(trt.BuilderFlag, name, None)
        flags[key] = None if flag is None else bool(config.get_flag(flag))
    return flags


def build_record(
    trt: Any, network: Any, config: Any, profile: Any, precision: str,
    timing_cache: TimingCacheUse | None = None, fp16_converted: bool = False,
) -> dict[str, Any]:
    """The build.json record, read back from the network, config and profile (not from what was asked)."""
    inp = network.get_input(0)
    low, opt, high = (tuple(int(d) for d in dims) for dims in profile.get_shape(inp.name))
    flags = _builder_flags(trt, config)
    outputs = [str(network.get_output(i).name) for i in range(network.num_outputs)]
    return {
        "tensorrt_version": trt.__version__,
        "precision": precision,
        "strongly_typed": is_strongly_typed(trt, network),
        "builder_flags": flags,
        "tf32": flags["tf32"],
        "network": {"layers": int(network.num_layers), "half_tensors": has_half_tensors(network, trt),
                    "quantize_layers": has_quantize(network, trt)},
        "batch": {"min": low[0], "opt": opt[0], "max": high[0]},
        "input": {"name": str(inp.name), "shape": list(low[1:])},
        "outputs": outputs,
        "logits_output": logits_output(outputs, "the network"),
        "optimization_profiles": int(config.num_optimization_profiles),
        "workspace_mb": int(config.get_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)) >> 20,
        "timing_cache": asdict(timing_cache) if timing_cache is not None else None,
        "fp16_converted": fp16_converted,
    }


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
    trt = import_trt()
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    _check_precision(precision)
    _check_batch_range(min_batch, opt_batch, max_batch)
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    with tempfile.TemporaryDirectory(prefix=".trt-build-", dir=engine_path.parent) as tmp:
        network, parser, converted = parse_for_precision(
            trt, builder, logger, onnx_path, precision, strongly_typed, Path(tmp))
        shapes = batch_profile_shapes(network, onnx_path.name, min_batch, opt_batch, max_batch)
        profile = optimization_profile(builder, shapes)
        config, cache = build_config(trt, builder, network, precision, workspace_mb, profile, timing_cache_path)
        SaveEngine(EngineBytesFromNetwork(builder, network, config, onnx_path.name), engine_path)()
        if cache is not None:
            cache = save_timing_cache(config, cache)
        record = build_record(trt, network, config, profile, precision, cache, converted)
        del parser
    gpu = gpu_info()
    return {**record, "gpu_name": gpu["name"], "compute_capability": gpu["compute_capability"]}
