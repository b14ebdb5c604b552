"""Runtime backends (torch-free): ONNX Runtime (CPU, CUDA, TensorRT EP), native TensorRT and OpenVINO."""

from __future__ import annotations

from deploy.backends.base import InputSpec, Runner
from deploy.backends.registry import (
    BACKENDS,
    backend_available,
    backend_names,
    create_runner,
    require_backend,
    runner_class,
)

__all__ = [
    "BACKENDS",
    "InputSpec",
    "Runner",
    "backend_available",
    "backend_names",
    "create_runner",
    "require_backend",
    "runner_class",
]
