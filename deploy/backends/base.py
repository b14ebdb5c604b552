"""The runner contract every backend implements (Polygraphy style, torch-free).

A runner wraps one model file on one runtime. It is a context manager: `activate()` loads the model
(session, engine, device buffers), `deactivate()` frees it. `infer(batch)` validates the batch with
clear `CstarError`s (never a runtime exception for a user mistake) and returns float32 logits;
`predict(x)` splits or pads any number of images into batches the model accepts; it is the callable
attacks and verification query.
"""

from __future__ import annotations

import platform
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError

LOGITS_NAME = "logits"  # the export contract's output name (export/onnx_export.py OUTPUT_NAME; no torch here)


def logits_output(outputs: list[str], model_name: str) -> str:
    """The output holding the logits: the export contract's name, or the only output."""
    if LOGITS_NAME in outputs:
        return LOGITS_NAME
    if len(outputs) == 1:
        return outputs[0]
    raise CstarError(
        f"{model_name} has outputs {outputs} and none is named '{LOGITS_NAME}'",
        f"re-export with `cstar export` (the export contract names the logits output '{LOGITS_NAME}')",
    )


DEFAULT_PREDICT_BATCH = 256
BUILD_INFO_NAME = "build.json"  # a build directory's record of how it was built (deploy.build writes it)
RANGE_TOLERANCE = 1e-3


@dataclass(frozen=True)
class InputSpec:
    """The model's single input: name, NCHW shape (None = dynamic) and element type."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str = "float32"

    @property
    def chw(self) -> tuple[int | None, ...]:
        """(C, H, W) part of the shape."""
        return tuple(self.shape[1:])

    @property
    def static_batch(self) -> int | None:
        """The fixed batch size, or None when the batch dimension is dynamic."""
        return self.shape[0] if self.shape else None


class Runner:
    """Base class of every backend runner; subclasses implement the `*_impl` methods."""

    name: str = "base"
    #: option names this runner accepts (subclasses extend); anything else is refused as a typo
    OPTIONS: frozenset[str] = frozenset({"min_batch", "opt_batch", "max_batch"})

    def __init__(self, model_path: str | Path, **options: Any) -> None:
        self.model_path = Path(model_path)
        unknown = sorted(set(options) - set(self.OPTIONS))
        if unknown:
            raise CstarError(
                f"unknown option(s) {unknown} for backend '{self.name}'",
                f"valid options are: {', '.join(sorted(self.OPTIONS))}",
            )
        self.options: dict[str, Any] = dict(options)
        self._active = False
        self._spec: InputSpec | None = None
        self._num_classes: int | None = None
        self._warned_range = False

    # ---------------------------------------------------------------- lifecycle
    def activate(self) -> Runner:
        """Load the model (idempotent)."""
        if not self._active:
            if not self.model_path.is_file():
                raise CstarError(f"model file {self.model_path} does not exist", "pass a built or exported artifact")
            self.activate_impl()
            self._active = True
        return self

    def deactivate(self) -> None:
        """Free the model and its buffers (idempotent)."""
        if self._active:
            try:
                self.deactivate_impl()
            finally:
                self._active = False

    def __enter__(self) -> Runner:
        return self.activate()

    def __exit__(self, *exc: object) -> None:
        self.deactivate()

    @property
    def is_active(self) -> bool:
        """True between activate() and deactivate()."""
        return self._active

    def _require_active(self) -> None:
        if not self._active:
            raise CstarError(
                f"the '{self.name}' runner for {self.model_path.name} is not active",
                "use it as a context manager (`with runner:`) or call runner.activate() first",
            )

    # ---------------------------------------------------------------- to implement
    def activate_impl(self) -> None:
        """Load the model; must set `self._spec`."""
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        """Release the model."""
        raise NotImplementedError

    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        """Run one validated batch; returns the raw output."""
        raise NotImplementedError

    def describe_impl(self) -> dict[str, Any]:
        """Backend-specific part of describe()."""
        return {}

    def batch_range(self) -> tuple[int, int | None]:
        """(min, max) batch the loaded model accepts; max None = unbounded."""
        spec = self.input_spec
        if spec.static_batch is not None:
            return spec.static_batch, spec.static_batch
        return int(self.options.get("min_batch") or 1), self.options.get("max_batch")

    # ---------------------------------------------------------------- public API
    @property
    def input_spec(self) -> InputSpec:
        """The model's input, read from the loaded model."""
        self._require_active()
        assert self._spec is not None, "activate_impl() must set self._spec"
        return self._spec

    @property
    def max_batch(self) -> int:
        """Largest chunk `predict` sends in one call."""
        low, high = self.batch_range()
        if high is not None:
            return int(high)
        return max(int(self.options.get("max_batch") or DEFAULT_PREDICT_BATCH), low)

    def validate(self, batch: Any) -> np.ndarray:
        """Check a batch against the input spec; returns it C-contiguous."""
        spec = self.input_spec
        if not isinstance(batch, np.ndarray):
            raise CstarError(
                f"input must be a numpy array, got {type(batch).__name__}",
                "pass np.asarray(x, dtype=np.float32) with shape (N, C, H, W)",
            )
        if batch.dtype != np.float32:
            hint = "convert with x.astype(np.float32)"
            if np.issubdtype(batch.dtype, np.integer):
                hint = "scale pixels to [0, 1] and convert: (x / 255).astype(np.float32)"
            raise CstarError(f"input dtype is {batch.dtype}, but models take float32 pixels in [0, 1]", hint)
        expected = "(N, " + ", ".join("?" if d is None else str(d) for d in spec.chw) + ")"
        if batch.ndim != 4:
            raise CstarError(
                f"input must be NCHW (rank 4) {expected}, got shape {tuple(batch.shape)}",
                "add a batch axis with x[None] for a single image" if batch.ndim == 3 else "reshape to (N, C, H, W)",
            )
        for axis, (want, got) in enumerate(zip(spec.chw, batch.shape[1:], strict=True)):
            if want is not None and want != got:
                raise CstarError(
                    f"input shape {tuple(batch.shape)} does not match the model's {expected} "
                    f"(axis {axis + 1}: {got} != {want})",
                    "resize/convert images to the model's input shape (see the manifest's input.shape)",
                )
        low, high = self.batch_range()
        n = batch.shape[0]
        if n < low or (high is not None and n > high):
            rng = f"exactly {low}" if low == high else f"{low}..{high if high is not None else 'any'}"
            raise CstarError(
                f"batch of {n} is outside the range this '{self.name}' model accepts ({rng})",
                "use runner.predict(x), which splits and pads batches, or rebuild with other --min-batch/--max-batch",
            )
        if not np.isfinite(batch).all():
            raise CstarError("input contains NaN or inf values", "clean the input (np.nan_to_num) before inference")
        if not self._warned_range and batch.size and (
            float(batch.min()) < -RANGE_TOLERANCE or float(batch.max()) > 1 + RANGE_TOLERANCE
        ):
            self._warned_range = True
            warnings.warn(
                f"input values span [{float(batch.min()):.3g}, {float(batch.max()):.3g}], outside [0, 1]: "
                "models take raw [0, 1] pixels (normalization is inside the model)",
                UserWarning,
                stacklevel=3,
            )
        return np.ascontiguousarray(batch)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Validate one batch and run it; returns float32 logits (N, classes)."""
        self._require_active()
        batch = self.validate(batch)
        out = np.asarray(self.infer_impl(batch))
        out = out.reshape(out.shape[0], -1).astype(np.float32, copy=False)
        self._num_classes = out.shape[1]
        return out

    def num_classes(self) -> int:
        """Width of the logits (runs one dummy batch if the output shape is not known yet)."""
        if self._num_classes is None:
            low, _ = self.batch_range()
            chw = tuple(d if d is not None else 1 for d in self.input_spec.chw)
            self.infer(np.zeros((max(low, 1), *chw), dtype=np.float32))
        assert self._num_classes is not None
        return self._num_classes

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for any number of images: chunks of at most `max_batch`, padded up to the minimum batch."""
        self._require_active()
        if isinstance(x, np.ndarray) and x.ndim == 4 and x.shape[0] == 0:
            return np.zeros((0, self.num_classes()), dtype=np.float32)
        if not isinstance(x, np.ndarray) or x.ndim != 4:
            return self.infer(x)  # raises the precise validation error
        low, _ = self.batch_range()
        size = self.max_batch
        outputs: list[np.ndarray] = []
        for start in range(0, x.shape[0], size):
            chunk = x[start : start + size]
            n = chunk.shape[0]
            if n < low:
                pad = np.repeat(chunk[-1:], low - n, axis=0)
                chunk = np.concatenate([chunk, pad], axis=0)
            outputs.append(self.infer(chunk)[:n])
        return np.concatenate(outputs, axis=0)

    __call__ = predict

    def describe(self) -> dict[str, Any]:
        """Backend, options, versions and backend details (for reports)."""
        info: dict[str, Any] = {
            "backend": self.name,
            "model": str(self.model_path),
            "options": {k: _jsonable(v) for k, v in self.options.items()},
            "versions": {"python": platform.python_version(), "numpy": np.__version__},
        }
        if self._active:
            low, high = self.batch_range()
            info["input"] = {"name": self.input_spec.name, "shape": list(self.input_spec.shape),
                             "dtype": self.input_spec.dtype}
            info["batch_range"] = [low, high]
        extra = self.describe_impl()
        versions = extra.pop("versions", {})
        info["versions"].update(versions)
        info.update(extra)
        return info

    def __repr__(self) -> str:
        state = "active" if self._active else "inactive"
        return f"<{type(self).__name__} {self.name} {self.model_path.name} ({state})>"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
