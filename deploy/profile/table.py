"""The latency table's body: every layer's ops timed on the grid, the whole dense model, and the
calibration of the layers' sum against the model (cache, weight streaming, op scale). Torch-free."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.latency_table import MIB, OPS, TABLE_KIND, TABLE_SCHEMA_VERSION, LatencyTable
from cstar.manifest import atomic_write_json
from deploy.profile.specs import LayerSpec, ProfileSettings
from deploy.profile.timer import MicroTimer

PROGRESS = Callable[[int, int], None]


def calibrate(alone: float, in_model: float, beyond_mib: float) -> tuple[float, float]:
    """(ms per MiB of weights beyond the cache, scale of every op) that make the dense layers take, in sum,
    what they take inside the model: slower inside -> weight streaming (a scale when no weights stream);
    faster inside -> a scale below 1."""
    if alone <= 0 or in_model <= 0:
        return 0.0, 1.0
    if in_model >= alone and beyond_mib > 0:
        return (in_model - alone) / beyond_mib, 1.0
    return 0.0, in_model / alone


def cache_bytes() -> int:
    """Per-core L2 cache size (Linux sysfs), else 1 MiB: weights above it stream from memory inside a model."""
    root = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for index in sorted(root.glob("index*")):
            if (index / "level").read_text().strip() == "2":
                text = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(text[-1:], 1)
                return int(text.rstrip("KM")) * scale
    except (OSError, ValueError):
        pass
    return 1 << 20



def runtime_of(info: dict[str, Any]) -> dict[str, str]:
    """{"name", "version"} of the runtime library a runner reports (its versions besides python/numpy)."""
    versions = {k: v for k, v in (info.get("versions") or {}).items() if k not in ("python", "numpy")}
    if not versions:
        return {"name": str(info.get("backend", "?")), "version": "?"}
    name, version = next(iter(versions.items()))
    return {"name": str(name), "version": str(version)}


def machine_record() -> dict[str, Any]:
    """This host as the table records it (hostname-free): CPU model, architecture, cores."""
    from deploy.report import hardware_info

    hardware = hardware_info()
    return {"cpu_model": hardware["processor"], "machine": hardware["machine"], "cpu_count": hardware["cpu_count"],
            "cpus_available": hardware["cpus_available"], "platform": hardware["platform"]}


def profile_layers(layers: list[LayerSpec], dense_model: str | Path, input_shape: tuple[int, ...],
                   model_info: dict[str, Any], settings: ProfileSettings,
                   progress: PROGRESS | None = None) -> dict[str, Any]:
    """Time every layer's ops on the grid and the whole dense model; returns the table body (validated)."""
    settings.validate()
    if not layers:
        raise CstarError("the model has no candidate (conv or linear) layers to profile",
                         "profile a model with Conv2d/Linear layers")
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="cstar-profile-"))
    try:
        timer = MicroTimer(settings, work)
        timer.measure_overhead()
        timer.measure_node_cost()
        unique = list(dict.fromkeys(spec for layer in layers for _, _, _, spec in layer.ops()))
        for done, spec in enumerate(unique, start=1):
            timer.op_ms(spec)
            if progress is not None:
                progress(done, len(unique))
        whole = timer.time_file(Path(dense_model), tuple(input_shape), settings.model_iters)
        inside = (timer.kernel_file(Path(dense_model), tuple(input_shape), settings.model_iters)
                  if timer.kernel_timing else None)
    finally:
        for leftover in work.iterdir():
            leftover.unlink()
        work.rmdir()
    body: dict[str, Any] = {
        "kind": TABLE_KIND, "schema_version": TABLE_SCHEMA_VERSION, "backend": settings.backend,
        "runtime": runtime_of(timer.runner_info), "machine": machine_record(), "threads": settings.threads,
        "batch_sizes": list(settings.batch_sizes), "model": {**model_info, "input_shape": list(input_shape)},
        "settings": {"iters": settings.iters, "warmup": settings.warmup, "grid_cap": settings.grid_cap,
                     "ranks": list(settings.ranks) if settings.ranks else None, "model_iters": settings.model_iters,
                     "micro_graphs": len(unique), "timing": timer.timing,
                     "profiler_node_ms": {str(b): ms for b, ms in timer.node_overhead.items()},
                     "seconds": round(time.perf_counter() - started, 2)},
        "overhead_ms": {str(b): ms for b, ms in timer.overhead.items()},
        "node_ms": {str(b): timer.node_cost.get(b, 0.0) for b in settings.batch_sizes},
        "dense_model_ms": {str(b): ms for b, ms in whole.items()},
        "layers": {layer.name: _layer_body(layer, timer, settings.batch_sizes) for layer in layers},
    }
    alone, in_model = _calibrate_into(body, layers, timer, whole, inside)
    table = LatencyTable.from_dict(body, "the measured table")
    body["summary"] = {str(b): {"model_ms": table.model_ms(b), "overhead_ms": table.overhead_ms[b],
                                "layers_alone_ms": alone[b], "layers_in_model_ms": in_model[b],
                                "rest_ms": table.rest_ms(b), "predicted_dense_ms": table.predicted_dense_ms(b)}
                       for b in settings.batch_sizes}
    return body


def _calibrate_into(body: dict[str, Any], layers: list[LayerSpec], timer: MicroTimer, whole: dict[int, float],
                    inside: dict[int, dict[str, tuple[float, int]]] | None) -> tuple[dict[int, float], dict[int, float]]:
    """Add cache_bytes, weight_ms_per_mb, op_scale (and rest_ms on ort-cpu) to `body`: the dense layers'
    sum alone vs inside the whole model sets them. Returns (alone, in model) ms per batch."""
    batches = timer.settings.batch_sizes
    cache = cache_bytes()
    alone = {b: sum(timer.op_ms(layer.op("conv", layer.in_channels, layer.out_channels))[b] for layer in layers)
             for b in batches}
    if inside is not None:  # ort-cpu: the layers' kernels inside the model; the rest is every other node
        in_model = {b: timer.net_kernels(k, b, layers=True) for b, k in inside.items()}
        body["rest_ms"] = {str(b): timer.overhead.get(b, 0.0) + timer.net_kernels(k, b, layers=False)
                           for b, k in inside.items()}
    else:
        in_model = {b: whole[b] - timer.overhead.get(b, 0.0) for b in batches}
    beyond = sum(max(0, layer.dense_weight_bytes - cache) for layer in layers) / MIB
    calibration = {b: calibrate(alone[b], in_model[b], beyond) for b in batches}
    body["cache_bytes"] = cache
    body["weight_ms_per_mb"] = {str(b): rate for b, (rate, _) in calibration.items()}
    body["op_scale"] = {str(b): scale for b, (_, scale) in calibration.items()}
    return alone, in_model


def _layer_body(layer: LayerSpec, timer: MicroTimer, batch_sizes: tuple[int, ...]) -> dict[str, Any]:
    ms: dict[str, dict[str, list[list[float]]]] = {}
    for batch in batch_sizes:
        ms[str(batch)] = {}
        for op in OPS:
            rows, cols = layer.axes(op)
            ms[str(batch)][op] = [[round(timer.op_ms(layer.op(op, i, j))[batch], 6) for j in cols] for i in rows]
    return {**layer.geometry_dict(), "ms": ms}


def write_table(body: dict[str, Any], out: str | Path) -> LatencyTable:
    """Write the table atomically and read it back through the validating loader."""
    atomic_write_json(out, body)
    return LatencyTable.load(out)
