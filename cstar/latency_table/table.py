"""`LatencyTable`: a latency table measured on a target runtime, loaded and validated, and the prices it
gives: ops, deploy forms, whole models (calibrated: op scale, weight streaming, spill, extra nodes)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cstar.errors import CstarError
from cstar.latency_table.batches import current_cpu_model
from cstar.latency_table.forms import DEPLOY_FORMS, EXTRA_NODES, FACTORIZED_FORMS, fastest_form
from cstar.latency_table.geometry import MIB, CostParts, LayerEntry
from cstar.latency_table.grid import interpolate
from cstar.latency_table.schema import (
    PROFILE_FIX,
    TABLE_KIND,
    TABLE_SCHEMA_VERSION,
    at_path,
    batch_sizes_of,
    get_field,
    layer_entry,
    number,
    optional_per_batch,
    per_batch,
    text_field,
)


@dataclass
class LatencyTable:
    """A `cstar profile` latency table: measured per-layer costs on one runtime, one machine, one thread count."""

    backend: str
    runtime: dict[str, str]
    machine: dict[str, Any]
    threads: int | None
    batch_sizes: tuple[int, ...]
    model: dict[str, Any]
    overhead_ms: dict[int, float]
    dense_model_ms: dict[int, float]
    layers: dict[str, LayerEntry]
    settings: dict[str, Any] = field(default_factory=dict)
    cache_bytes: int = 0
    weight_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per MiB beyond the cache
    op_scale: dict[int, float] = field(default_factory=dict)  # batch -> factor on every measured op (1: none)
    measured_rest_ms: dict[int, float] | None = None  # batch -> what the layers do not cover, when measured
    # batch -> what one more node costs inside a model beyond its kernel (dispatch, intermediate tensor):
    # kernel-timed tables (ort-cpu) charge it for every conv a deploy form adds over the dense layer
    node_ms: dict[int, float] = field(default_factory=dict)
    stream_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per MiB of every weight
    spill_ms_per_mb: dict[int, float] = field(default_factory=dict)  # batch -> ms per model MiB beyond spill_cache_mib
    spill_cache_mib: dict[int, float] = field(default_factory=dict)  # batch -> the shared cache a model's weights stay in
    calibration: dict[str, Any] | None = None  # the whole-model fit of op_scale etc. (cstar.latency_fit)
    path: Path | None = None

    # -------------------------------------------------------------- I/O
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        """Read and validate a table file; every problem is one CstarError with a fix."""
        source = Path(path)
        if not source.is_file():
            raise CstarError(f"latency table {source} does not exist",
                             "profile the model first: cstar profile --model-from DIR --backend ort-cpu --out TABLE")
        try:
            data = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CstarError(f"latency table {source} is not readable JSON ({exc})", PROFILE_FIX) from exc
        table = cls.from_dict(data, str(source))
        table.path = source
        return table

    @classmethod
    def from_dict(cls, data: Any, where: str = "latency table") -> LatencyTable:
        """Validate a parsed table (kind, schema, batches, finite positive numbers, non-empty layers)."""
        if not isinstance(data, dict) or data.get("kind") != TABLE_KIND:
            raise CstarError(f"{where} is not a cstar latency table (kind {get_field(data, 'kind')!r})",
                             f"pass a file written by `cstar profile` ({PROFILE_FIX})")
        if data.get("schema_version") != TABLE_SCHEMA_VERSION:
            raise CstarError(f"{where} has schema_version {data.get('schema_version')!r}, this cstar reads "
                             f"{TABLE_SCHEMA_VERSION}", f"profile again with this cstar version ({PROFILE_FIX})")
        batches = batch_sizes_of(data.get("batch_sizes"), where)
        layers_data = data.get("layers")
        if not isinstance(layers_data, dict) or not layers_data:
            raise CstarError(f"{where} has no layers", f"the model had no candidate layers or the file is cut; "
                             f"{PROFILE_FIX}")
        threads = data.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise CstarError(f"{where}: threads must be a positive integer or null, got {threads!r}", PROFILE_FIX)
        return cls(
            backend=text_field(data, "backend", where),
            runtime={str(k): str(v) for k, v in (data.get("runtime") or {}).items()},
            machine=dict(data.get("machine") or {}),
            threads=threads,
            batch_sizes=batches,
            model=dict(data.get("model") or {}),
            overhead_ms=per_batch(data.get("overhead_ms"), batches, f"{where}: overhead_ms", allow_zero=True),
            dense_model_ms=per_batch(data.get("dense_model_ms"), batches, f"{where}: dense_model_ms"),
            layers={str(name): layer_entry(str(name), body, batches, where) for name, body in layers_data.items()},
            settings=dict(data.get("settings") or {}),
            cache_bytes=int(number(data.get("cache_bytes", 0), f"{where}: cache_bytes", allow_zero=True)),
            weight_ms_per_mb=per_batch(data.get("weight_ms_per_mb", {str(b): 0.0 for b in batches}), batches,
                                        f"{where}: weight_ms_per_mb", allow_zero=True),
            op_scale=per_batch(data.get("op_scale", {str(b): 1.0 for b in batches}), batches, f"{where}: op_scale"),
            measured_rest_ms=(None if data.get("rest_ms") is None else
                              per_batch(data["rest_ms"], batches, f"{where}: rest_ms", allow_zero=True)),
            node_ms=per_batch(data.get("node_ms", {str(b): 0.0 for b in batches}), batches, f"{where}: node_ms",
                               allow_zero=True),
            stream_ms_per_mb=optional_per_batch(data, "stream_ms_per_mb", batches, where),
            spill_ms_per_mb=optional_per_batch(data, "spill_ms_per_mb", batches, where),
            spill_cache_mib=optional_per_batch(data, "spill_cache_mib", batches, where),
            calibration=dict(data["calibration"]) if isinstance(data.get("calibration"), dict) else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON body (`cstar profile` adds a per-batch summary for people)."""
        return {
            "kind": TABLE_KIND, "schema_version": TABLE_SCHEMA_VERSION, "backend": self.backend,
            "runtime": dict(self.runtime), "machine": dict(self.machine), "threads": self.threads,
            "batch_sizes": list(self.batch_sizes), "model": dict(self.model), "settings": dict(self.settings),
            "overhead_ms": {str(b): v for b, v in self.overhead_ms.items()},
            "dense_model_ms": {str(b): v for b, v in self.dense_model_ms.items()},
            "cache_bytes": self.cache_bytes,
            "weight_ms_per_mb": {str(b): v for b, v in self.weight_ms_per_mb.items()},
            "op_scale": {str(b): v for b, v in self.op_scale.items()},
            "rest_ms": None if self.measured_rest_ms is None else {str(b): v for b, v in self.measured_rest_ms.items()},
            "node_ms": {str(b): v for b, v in self.node_ms.items()},
            "stream_ms_per_mb": {str(b): v for b, v in self.stream_ms_per_mb.items()},
            "spill_ms_per_mb": {str(b): v for b, v in self.spill_ms_per_mb.items()},
            "spill_cache_mib": {str(b): v for b, v in self.spill_cache_mib.items()},
            "calibration": self.calibration,
            "layers": {name: entry.to_dict() for name, entry in self.layers.items()},
        }

    # -------------------------------------------------------------- lookups
    def layer_names(self) -> list[str]:
        """The priced layers, in model order."""
        return list(self.layers)

    def layer(self, name: str) -> LayerEntry:
        """The entry of layer `name`; CstarError when the table does not have it."""
        try:
            return self.layers[name]
        except KeyError:
            raise self.missing_error([name]) from None

    def missing_error(self, names: list[str]) -> CstarError:
        """The error for layers this table does not price."""
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        model = self.model.get("name", "?")
        return CstarError(f"the latency table{at_path(self.path)} has no layer {shown} (it was profiled on model "
                          f"'{model}' with {len(self.layers)} layers)",
                          "profile the model you compress: " + PROFILE_FIX)

    def require_layers(self, names: list[str]) -> None:
        """CstarError naming every layer of `names` the table lacks."""
        missing = [name for name in names if name not in self.layers]
        if missing:
            raise self.missing_error(missing)

    def check_batch(self, batch: int) -> int:
        """`batch` when the table has it; CstarError listing the profiled ones otherwise."""
        if batch not in self.batch_sizes:
            have = ",".join(str(b) for b in self.batch_sizes)
            raise CstarError(f"the latency table{at_path(self.path)} has no batch size {batch} (it has {have})",
                             f"pass --latency-batch with one of {have}, or profile with --batch-sizes {have},{batch}")
        return batch

    def op_parts(self, layer: str, op: str, rows: float, cols: float, batch: int) -> CostParts:
        """One op of `layer` at channel counts (rows, cols): its interpolated ms alone and its weights beyond
        the cache."""
        entry = self.layer(layer)
        grid_rows, grid_cols = entry.axes(op)
        measured = interpolate(grid_rows, grid_cols, entry.ms[self.check_batch(batch)][op], rows, cols)
        weight = entry.weight_bytes(op, rows, cols)
        return CostParts(measured, max(0.0, weight - self.cache_bytes) / MIB, 0, weight / MIB)

    def price(self, parts: CostParts, batch: int) -> float:
        """ms inside a model: op_scale x the ops alone + weight streaming + the extra nodes' dispatch (a sum over
        ops: no spill, see model_price)."""
        return (self.op_scale.get(batch, 1.0) * parts.alone_ms + self.weight_ms_per_mb.get(batch, 0.0) * parts.beyond_mib
                + self.stream_ms_per_mb.get(batch, 0.0) * parts.weight_mib
                + self.node_ms.get(batch, 0.0) * parts.extra_nodes)

    def spill_ms(self, weight_mib: float, batch: int) -> float:
        """What a whole model whose priced layers hold `weight_mib` MiB of weights pays for those beyond the shared
        cache they stay in between calls (0 without a fitted spill)."""
        rate = self.spill_ms_per_mb.get(batch, 0.0)
        return rate * max(0.0, weight_mib - self.spill_cache_mib.get(batch, 0.0)) if rate > 0 else 0.0

    def model_price(self, parts: CostParts, batch: int) -> float:
        """ms of a whole model's summed layer `parts` inside the model (the rest not included): price + spill."""
        return self.price(parts, batch) + self.spill_ms(parts.weight_mib, batch)

    def op_ms(self, layer: str, op: str, rows: float, cols: float, batch: int) -> float:
        """ms of one op of `layer` at channel counts (rows, cols): interpolated, plus its weight streaming."""
        return self.price(self.op_parts(layer, op, rows, cols, batch), batch)

    def streaming_ms(self, weight_bytes: float, batch: int) -> float:
        """Extra ms inside a model for weights beyond the per-core cache (0 without a calibrated rate)."""
        rate = self.weight_ms_per_mb.get(batch, 0.0)
        return rate * max(0.0, weight_bytes - self.cache_bytes) / MIB if rate > 0 else 0.0

    def conv_ms(self, layer: str, cin: int, cout: int, batch: int) -> float:
        """The layer's own op (kxk conv / Gemm) with `cin` -> `cout` channels."""
        return self.op_ms(layer, "conv", cin, cout, batch)

    def form_parts(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                   cin: int | None = None, cout: int | None = None) -> CostParts:
        """The cost parts of `layer` run as deploy `form` (see form_ms)."""
        entry = self.layer(layer)
        cin = entry.in_channels if cin is None else cin
        cout = entry.out_channels if cout is None else cout
        if form not in DEPLOY_FORMS:
            raise CstarError(f"unknown deploy form '{form}'", f"use one of: {', '.join(DEPLOY_FORMS)}")
        if form == "dense":
            return self.op_parts(layer, "conv", cin, cout, batch)
        if ranks is None:
            raise CstarError(f"deploy form '{form}' of layer '{layer}' needs ranks (r_in, r_out)",
                             "pass the Tucker-2 ranks, or form 'dense'")
        r_in, r_out = ranks
        extra = CostParts(0.0, 0.0, EXTRA_NODES["linear" if entry.type == "linear" else form])
        if entry.type == "linear" or form == "three-conv":
            core = (CostParts() if entry.type == "linear" else self.op_parts(layer, "conv", r_in, r_out, batch))
            return (self.op_parts(layer, "in_factor", cin, r_in, batch) + core
                    + self.op_parts(layer, "out_factor", r_out, cout, batch) + extra)
        if form == "merge-input":
            return (self.op_parts(layer, "conv", cin, r_out, batch)
                    + self.op_parts(layer, "out_factor", r_out, cout, batch) + extra)
        return (self.op_parts(layer, "in_factor", cin, r_in, batch) + self.op_parts(layer, "conv", r_in, cout, batch)
                + extra)

    def form_ms(self, layer: str, form: str, ranks: tuple[int, int] | None, batch: int,
                cin: int | None = None, cout: int | None = None) -> float:
        """ms of `layer` run as deploy `form` with Tucker-2 ranks (r_in, r_out); cin/cout default to full width.

        dense: kxk cin->cout; three-conv: 1x1 cin->r_in, kxk r_in->r_out, 1x1 r_out->cout;
        merge-input: kxk cin->r_out, 1x1 r_out->cout; merge-output: 1x1 cin->r_in, kxk r_in->cout.
        A Linear layer has two forms: dense (one Gemm) and factorized (any other name: cin->r, r->cout).
        """
        return self.price(self.form_parts(layer, form, ranks, batch, cin, cout), batch)

    def fastest_form(self, layer: str, ranks: tuple[int, int], batch: int, cin: int | None = None,
                     cout: int | None = None, forms: tuple[str, ...] = FACTORIZED_FORMS) -> tuple[str, float]:
        """(form, ms) of the fastest of `forms` (ties: FORM_TIE_ORDER, the rule export uses)."""
        costs = {form: self.form_ms(layer, form, ranks, batch, cin, cout) for form in forms}
        form = fastest_form(costs)
        return form, costs[form]

    def dense_ms(self, layer: str, batch: int) -> float:
        """The layer at its profiled (full) width."""
        entry = self.layer(layer)
        return self.conv_ms(layer, entry.in_channels, entry.out_channels, batch)

    def model_ms(self, batch: int) -> float:
        """The measured whole dense model (one runtime call)."""
        return self.dense_model_ms[self.check_batch(batch)]

    def dense_reference_ms(self, batch: int) -> float:
        """The dense model's latency a latency ratio divides: as measured in the calibration's interleaved rounds
        (the median of many short rounds, beside the models it was fitted on) when the table is calibrated, else
        the profile's one measurement. Measured, not predicted: the additive price of a large dense model is off
        by several percent (its big convs run faster inside the model than alone), and a budget of predicted
        dense / R would carry that error into every speedup."""
        fit = ((self.calibration or {}).get("by_batch") or {}).get(str(self.check_batch(batch))) or {}
        for row in fit.get("models") or []:
            if row.get("model") == "dense" and isinstance(row.get("measured_ms"), (int, float)) \
                    and math.isfinite(row["measured_ms"]) and row["measured_ms"] > 0:
                return float(row["measured_ms"])
        return self.model_ms(batch)

    def rest_ms(self, batch: int) -> float:
        """What the layers do not cover: measured (ort-cpu), else the whole dense model minus the sum of its
        dense layers (may then be < 0)."""
        if self.measured_rest_ms is not None:
            return self.measured_rest_ms[self.check_batch(batch)]
        return self.model_ms(batch) - sum(self.dense_ms(name, batch) for name in self.layers)

    def predicted_dense_ms(self, batch: int) -> float:
        """The dense model as the table predicts it (rest + dense layers + spill); model_ms is what was measured."""
        parts = CostParts()
        for name, entry in self.layers.items():
            parts = parts + self.op_parts(name, "conv", entry.in_channels, entry.out_channels, batch)
        return self.rest_ms(batch) + self.model_price(parts, batch)

    # -------------------------------------------------------------- provenance
    def check_matches(self, backend: str, threads: int | None = None, cpu: str | None = None) -> list[str]:
        """Warnings when this table was measured on another backend, CPU or thread count than the one in use.

        `threads` None: not checked; `cpu` None: this host's CPU.
        """
        warnings: list[str] = []
        where = f"latency table{at_path(self.path)}"
        if backend != self.backend:
            warnings.append(f"{where} was measured on backend '{self.backend}', not '{backend}': its latencies "
                            f"do not transfer; profile with --backend {backend}")
        if threads is not None and threads != self.threads:
            warnings.append(f"{where} was measured with {self.threads or 'the runtime default'} thread(s), "
                            f"not {threads}; profile with --threads {threads}")
        here = cpu if cpu is not None else current_cpu_model()
        there = str(self.machine.get("cpu_model", ""))
        if there and here != there:
            warnings.append(f"{where} was measured on CPU '{there}', this is '{here}': fine when that is the "
                            "deploy target, otherwise profile on the target")
        return warnings

    def describe(self) -> dict[str, Any]:
        """Provenance for manifests: path, backend, runtime, machine, threads."""
        from cstar.manifest import sha256_file

        info: dict[str, Any] = {"backend": self.backend, "runtime": dict(self.runtime), "machine": dict(self.machine),
                                "threads": self.threads, "model": self.model.get("name")}
        if self.path is not None:
            info.update(path=str(self.path.resolve()), sha256=sha256_file(self.path))
        return info
