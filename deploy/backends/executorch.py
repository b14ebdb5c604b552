"""ExecuTorch runner: a `.pte` program lowered to XNNPACK, on the CPU (`pip install 'cstar[executorch]'`).

Needs torch on the device. The ExecuTorch Python runtime (`executorch.runtime`, the pybindings in the
`executorch` wheel) imports torch and links libtorch, and `Method.execute` takes torch tensors only
(numpy arrays are refused), so this backend needs torch wherever it runs; the executorch wheel does
not declare it, so the `executorch` extra pins both (executorch 1.5.1 with torch 2.14.1). This module
imports neither executorch nor torch at import time: the registry lists the backend without them, and
`backend_available('executorch-xnnpack')` says what is missing. A C++ deployment of the same `.pte`
(ExecuTorch's runtime without Python) needs no torch; that is outside cstar.

Batch: `cstar build`/`cstar calibrate --target executorch` export the batch dimension dynamic in
[min, max] and store the bounds in the program as constant methods (`cstar_min_batch`,
`cstar_max_batch`), so a `.pte` says which batches it takes; a `.pte` without them takes the static
batch of its input. `predict` splits and pads any number of images into that range.

Threads: XNNPACK runs on ExecuTorch's process-wide threadpool. `intra_op_threads` resizes that pool
when the runner activates (process-wide: the last runner activated sets it for every program);
without it the pool keeps the runtime's default (one thread per performance core).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError
from deploy.backends.base import InputSpec, Runner

XNNPACK_BACKEND = "XnnpackBackend"
METHOD = "forward"
MIN_BATCH_METHOD = "cstar_min_batch"
MAX_BATCH_METHOD = "cstar_max_batch"
# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h) of the input types cstar uses
_SCALAR_TYPES = {5: "float16", 6: "float32", 7: "float64"}


def import_runtime() -> Any:
    """The `executorch.runtime` module, or a MissingDependencyError naming the extra that installs it."""
    try:
        import executorch.runtime as runtime
    except ImportError as exc:  # executorch absent, or present without torch (its pybindings need libtorch)
        raise MissingDependencyError(
            "executorch", "executorch",
            f"the executorch-xnnpack backend (import failed: {exc}; its Python runtime needs torch)",
        ) from exc
    return runtime


def executorch_version() -> str | None:
    """The installed executorch distribution's version (None when absent), read without importing it."""
    try:
        return importlib.metadata.version("executorch")
    except importlib.metadata.PackageNotFoundError:
        return None


def xnnpack_registered(runtime_module: Any) -> bool:
    """Whether this ExecuTorch build has the XNNPACK delegate compiled in."""
    return bool(runtime_module.Runtime.get().backend_registry.is_available(XNNPACK_BACKEND))


def _portable_lib() -> Any:
    import executorch.extension.pybindings.portable_lib as portable_lib

    return portable_lib


class ExecutorchXnnpackRunner(Runner):
    """One `.pte` program (XNNPACK-delegated) on the ExecuTorch runtime."""

    name = "executorch-xnnpack"
    OPTIONS = Runner.OPTIONS | {"intra_op_threads"}

    def __init__(self, model_path: Any, **options: Any) -> None:
        super().__init__(model_path, **options)
        threads = self.options.get("intra_op_threads")
        if threads is not None and int(threads) < 1:
            raise CstarError(f"intra_op_threads must be >= 1, got {threads}", "pass a positive thread count")
        self._program: Any = None
        self._method: Any = None
        self._torch: Any = None
        self._bounds: tuple[int, int] | None = None

    # ------------------------------------------------------------------ load
    def activate_impl(self) -> None:
        runtime = import_runtime()
        if not xnnpack_registered(runtime):
            raise CstarError(
                f"this ExecuTorch build (executorch {executorch_version()}) has no {XNNPACK_BACKEND}",
                "install the PyPI executorch wheel (it includes XNNPACK): pip install 'cstar[executorch]'",
            )
        if self.options.get("intra_op_threads") is not None:
            _portable_lib()._unsafe_reset_threadpool(int(self.options["intra_op_threads"]))
        try:
            program = runtime.Runtime.get().load_program(self.model_path)
            method = program.load_method(METHOD) if METHOD in program.method_names else None
        except Exception as exc:  # the pybindings raise RuntimeError / ValueError for a bad program
            raise CstarError(
                f"ExecuTorch could not load {self.model_path}: {exc}",
                "check the file is a .pte written by `cstar build --backend executorch-xnnpack` or "
                "`cstar calibrate --target executorch`",
            ) from exc
        if method is None:
            raise CstarError(
                f"{self.model_path.name} has no '{METHOD}' method (it has {sorted(program.method_names)})",
                "lower the model with `cstar build --backend executorch-xnnpack`",
            )
        meta = method.metadata
        if meta.num_inputs() != 1:
            raise CstarError(
                f"{self.model_path.name} takes {meta.num_inputs()} inputs; cstar models take one NCHW image",
                "lower the model with `cstar build --backend executorch-xnnpack`",
            )
        info = meta.input_tensor_meta(0)
        sizes = tuple(int(d) for d in info.sizes())
        if len(sizes) != 4:
            raise CstarError(f"{self.model_path.name} input has rank {len(sizes)}, expected NCHW",
                             "lower the model again with `cstar build --backend executorch-xnnpack`")
        self._bounds = self._read_bounds(program)
        dynamic = self._bounds is not None and self._bounds[0] != self._bounds[1]
        shape: tuple[int | None, ...] = (None, *sizes[1:]) if dynamic else sizes
        import torch  # already loaded by executorch.runtime; tensors are the only input it takes

        self._torch = torch
        self._program, self._method = program, method
        self._spec = InputSpec("input", shape, _SCALAR_TYPES.get(int(info.dtype()), "float32"))

    @staticmethod
    def _read_bounds(program: Any) -> tuple[int, int] | None:
        """(min, max) batch from the program's constant methods; None for a static-batch program."""
        names = program.method_names
        if MIN_BATCH_METHOD not in names or MAX_BATCH_METHOD not in names:
            return None
        low = int(program.load_method(MIN_BATCH_METHOD).execute([])[0])
        high = int(program.load_method(MAX_BATCH_METHOD).execute([])[0])
        return low, high

    def deactivate_impl(self) -> None:
        self._method = None
        self._program = None
        self._bounds = None

    def batch_range(self) -> tuple[int, int | None]:
        """The program's batch bounds, narrowed by the min_batch/max_batch options."""
        if self._bounds is None:
            return super().batch_range()
        low, high = self._bounds
        wanted_low = int(self.options.get("min_batch") or low)
        wanted_high = int(self.options.get("max_batch") or high)
        return max(low, min(wanted_low, high)), min(high, max(wanted_high, low))

    # ------------------------------------------------------------------ run
    def infer_impl(self, batch: np.ndarray) -> np.ndarray:
        tensor = self._torch.from_numpy(batch if self.input_spec.dtype == "float32" else
                                        batch.astype(self.input_spec.dtype))
        try:
            outputs = self._method.execute([tensor])
        except Exception as exc:
            raise CstarError(
                f"ExecuTorch failed on a batch of shape {tuple(batch.shape)}: {exc}",
                "check the input matches the model (manifest input.shape) and the batch range of the build",
            ) from exc
        return np.array(outputs[0].detach().numpy(), dtype=np.float32, copy=True)

    # ------------------------------------------------------------------ reports
    def describe_impl(self) -> dict[str, Any]:
        versions = {"executorch": executorch_version() or "absent"}
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions["torch"] = importlib.metadata.version("torch")
        info: dict[str, Any] = {"provider": f"executorch:{XNNPACK_BACKEND}", "versions": versions}
        if self._program is not None:
            portable_lib = _portable_lib()
            info["threadpool_threads"] = int(portable_lib._threadpool_get_thread_count())
            info["registered_backends"] = list(portable_lib._get_registered_backend_names())
            info["dynamic_batch"] = self._bounds is not None
            info["program_batch"] = list(self._bounds) if self._bounds else [self.input_spec.static_batch] * 2
        return info
