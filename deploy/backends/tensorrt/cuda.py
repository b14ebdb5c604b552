"""The CUDA side of the TensorRT backend: which GPU this is, and device buffers plus a stream to run on.

cuda-python (`cuda.bindings.runtime`, or the older `cuda.cudart`) is preferred; without it, torch CUDA
tensors provide the buffers (the one place on the device side where torch may be used, and only if it is
already installed). Every import is lazy, so this module imports with neither present.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from typing import Any

import numpy as np

from cstar.errors import CstarError, MissingDependencyError


def import_cudart() -> Any | None:
    """cuda-python's runtime module (new and old layouts), or None."""
    try:
        from cuda.bindings import runtime as cudart

        return cudart
    except ImportError:
        pass
    try:
        from cuda import cudart  # type: ignore[no-redef, unused-ignore]

        return cudart
    except ImportError:
        return None


def device_buffer_library() -> str | None:
    """'cuda-python' or 'torch' (whichever will provide device buffers), or None."""
    if import_cudart() is not None:
        return "cuda-python"
    if importlib.util.find_spec("torch") is not None:
        return "torch"
    return None


# --------------------------------------------------------------------------------------- GPU info


def _gpu_info_cudart(device: int) -> dict[str, str | None] | None:
    """{name, compute_capability} from cuda-python's device properties, or None when it cannot say."""
    cudart = import_cudart()
    if cudart is None:
        return None
    try:
        err, prop = cudart.cudaGetDeviceProperties(device)
        if err == cudart.cudaError_t.cudaSuccess and prop is not None:
            name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
            return {"name": name.rstrip("\x00").strip(), "compute_capability": f"{prop.major}.{prop.minor}"}
    except Exception:  # fall through to the next source
        pass
    return None


def _gpu_info_smi(device: int) -> dict[str, str | None] | None:
    """{name, compute_capability} from `nvidia-smi`, or None when it is absent or fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,compute_cap", "--format=csv,noheader", f"--id={device}"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout.strip().splitlines()
        if out:
            name, _, cap = out[0].rpartition(",")
            return {"name": name.strip(), "compute_capability": cap.strip()}
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _gpu_info_torch(device: int) -> dict[str, str | None] | None:
    """{name, compute_capability} from torch CUDA, or None when torch is absent or sees no GPU."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch  # optional, TensorRT backend only

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def gpu_info(device: int = 0) -> dict[str, str | None]:
    """{name, compute_capability ('8.9')} of GPU `device`: cuda-python, else nvidia-smi, else torch."""
    for source in (_gpu_info_cudart, _gpu_info_smi, _gpu_info_torch):
        info = source(device)
        if info is not None:
            return info
    return {"name": None, "compute_capability": None}


# ------------------------------------------------------------------------------------ device memory


class CudartMemory:
    """Device buffers and a stream through cuda-python's runtime API."""

    library = "cuda-python"

    def __init__(self, cudart: Any) -> None:
        self.rt = cudart
        self.stream = self._call(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: list[int] = []

    def _call(self, result: Any, what: str) -> Any:
        """The value of a cuda-python call (its error code checked), or a CstarError naming the call."""
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.rt.cudaError_t.cudaSuccess:
            raise CstarError(f"CUDA call {what} failed: {err}", "check the GPU driver and that a GPU is visible")
        return rest[0] if len(rest) == 1 else rest

    def alloc(self, nbytes: int) -> int:
        """A new device buffer of `nbytes` (at least 1); freed on close()."""
        ptr = int(self._call(self.rt.cudaMalloc(max(int(nbytes), 1)), "cudaMalloc"))
        self._buffers.append(ptr)
        return ptr

    def htod(self, dst: int, host: np.ndarray) -> None:
        """Copy `host` to device pointer `dst` on the stream."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._call(self.rt.cudaMemcpyAsync(dst, host.ctypes.data, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    def dtoh(self, host: np.ndarray, src: int) -> None:
        """Copy device pointer `src` into `host` on the stream (valid after synchronize())."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._call(self.rt.cudaMemcpyAsync(host.ctypes.data, src, host.nbytes, kind, self.stream), "cudaMemcpyAsync")

    @property
    def stream_handle(self) -> int:
        """The stream as the integer handle execute_async_v3 takes."""
        return int(self.stream)

    def synchronize(self) -> None:
        """Wait for the stream's copies and kernels."""
        self._call(self.rt.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")

    def close(self) -> None:
        """Free every buffer and the stream."""
        for ptr in self._buffers:
            self.rt.cudaFree(ptr)
        self._buffers.clear()
        if self.stream is not None:
            self.rt.cudaStreamDestroy(self.stream)
            self.stream = None


class TorchMemory:
    """Device buffers and a stream through torch CUDA tensors (fallback when cuda-python is absent)."""

    library = "torch"

    def __init__(self) -> None:
        import torch  # optional, TensorRT backend only

        if not torch.cuda.is_available():
            raise CstarError("torch sees no CUDA GPU", "check the GPU driver and CUDA_VISIBLE_DEVICES")
        self.torch = torch
        self.stream = torch.cuda.Stream()
        self._buffers: dict[int, Any] = {}

    def alloc(self, nbytes: int) -> int:
        """A new device buffer of `nbytes` (at least 1), kept alive as a uint8 tensor until close()."""
        tensor = self.torch.empty(max(int(nbytes), 1), dtype=self.torch.uint8, device="cuda")
        self._buffers[tensor.data_ptr()] = tensor
        return int(tensor.data_ptr())

    def htod(self, dst: int, host: np.ndarray) -> None:
        """Copy `host` to the buffer at `dst` on the stream."""
        src = self.torch.from_numpy(np.ascontiguousarray(host).reshape(-1).view(np.uint8))
        with self.torch.cuda.stream(self.stream):
            self._buffers[dst][: host.nbytes].copy_(src)

    def dtoh(self, host: np.ndarray, src: int) -> None:
        """Copy the buffer at `src` into `host`."""
        with self.torch.cuda.stream(self.stream):
            data = self._buffers[src][: host.nbytes].cpu().numpy()
        host.reshape(-1).view(np.uint8)[:] = data

    @property
    def stream_handle(self) -> int:
        """The stream as the integer handle execute_async_v3 takes."""
        return int(self.stream.cuda_stream)

    def synchronize(self) -> None:
        """Wait for the stream's copies and kernels."""
        self.stream.synchronize()

    def close(self) -> None:
        """Drop the buffers (torch frees them)."""
        self._buffers.clear()


DeviceMemory = CudartMemory | TorchMemory


def device_memory() -> DeviceMemory:
    """Device buffers from cuda-python, else torch; MissingDependencyError when neither is installed."""
    cudart = import_cudart()
    if cudart is not None:
        return CudartMemory(cudart)
    if importlib.util.find_spec("torch") is not None:
        return TorchMemory()
    raise MissingDependencyError("cuda-python", None, "device buffers of the TensorRT backend")
