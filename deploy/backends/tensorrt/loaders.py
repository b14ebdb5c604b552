"""TensorRT imported on first use, and the engine's Polygraphy-style lazy loaders.

`import_trt` is the only place `import tensorrt` happens, so the backend imports without it. The
loaders compose: each takes the object it works on or a callable that makes it, and does its work
when called, e.g. `SaveEngine(EngineBytesFromNetwork(builder, network, config), path)()` builds and
writes a plan, `EngineFromBytes(trt, BytesFromPath(path))()` reads and deserializes one. The plain
functions `serialized_engine` and `save_engine` are the same steps called at once.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from cstar.errors import CstarError, MissingDependencyError
from cstar.manifest import atomic_write_bytes

T = TypeVar("T")


def import_trt() -> Any:
    """The `tensorrt` module; MissingDependencyError naming the extra when it is not installed."""
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError("tensorrt", "tensorrt", "the native TensorRT backend") from exc
    return trt


def trt_logger(trt: Any) -> Any:
    """A TensorRT logger at WARNING (builder and runtime both need one)."""
    return trt.Logger(trt.Logger.WARNING)


def invoke_if_callable(value: T | Callable[[], T]) -> T:
    """`value` itself, or what it returns when it is a loader (a callable that makes the value)."""
    return value() if callable(value) else value


def serialized_engine(builder: Any, network: Any, config: Any, model_name: str = "the model") -> bytes:
    """The serialized engine (plan) bytes."""
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise CstarError(
            f"TensorRT failed to build an engine from {model_name} (see the TensorRT log above)",
            "try a larger --workspace, another precision, or check trt_check.preflight",
        )
    return bytes(memoryview(serialized))


def save_engine(data: bytes, engine_path: str | Path) -> Path:
    """Write the engine atomically (a reader never sees half a plan)."""
    return atomic_write_bytes(engine_path, data)


class EngineBytesFromNetwork:
    """Loader: build the plan for a parsed network under a builder config (serialized_engine, deferred)."""

    def __init__(self, builder: Any, network: Any, config: Any, model_name: str = "the model") -> None:
        self.builder, self.network, self.config, self.model_name = builder, network, config, model_name

    def __call__(self) -> bytes:
        """The serialized engine bytes."""
        return serialized_engine(self.builder, self.network, self.config, self.model_name)


class SaveEngine:
    """Loader: write plan bytes (or what a loader of them returns) to `engine_path`, atomically."""

    def __init__(self, serialized: bytes | Callable[[], bytes], engine_path: str | Path) -> None:
        self.serialized, self.engine_path = serialized, Path(engine_path)

    def __call__(self) -> Path:
        """The path written."""
        return save_engine(invoke_if_callable(self.serialized), self.engine_path)


class BytesFromPath:
    """Loader: the bytes of a file (a serialized engine), read when called."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __call__(self) -> bytes:
        """The file's bytes."""
        return self.path.read_bytes()


class EngineFromBytes:
    """Loader: (runtime, ICudaEngine) deserialized from plan bytes or a loader of them.

    The runtime is returned with the engine because the engine must not outlive it.
    """

    def __init__(
        self, trt: Any, serialized: bytes | Callable[[], bytes], model_name: str = "the engine"
    ) -> None:
        self.trt, self.serialized, self.model_name = trt, serialized, model_name

    def __call__(self) -> tuple[Any, Any]:
        """(runtime, engine); a CstarError when this TensorRT cannot read the plan."""
        runtime = self.trt.Runtime(trt_logger(self.trt))
        engine = runtime.deserialize_cuda_engine(invoke_if_callable(self.serialized))
        if engine is None:
            raise CstarError(
                f"TensorRT {self.trt.__version__} could not deserialize {self.model_name}",
                "re-run `cstar build --backend tensorrt` on this machine (engines are version and GPU specific)",
            )
        return runtime, engine
