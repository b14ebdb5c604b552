"""Opening the runtime for verify, bench and profile: which backend runs, and with which runner options.

The backend is the one named, else the artifact's own (its build's, executorch-xnnpack for a .pte),
else ort-cpu. `--threads` becomes a runner option only for backends that take a thread count, so the
same command line works on every backend. The backend registry is imported only when a thread count
is given: naming options stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cstar.errors import CstarError

if TYPE_CHECKING:
    from deploy.artifact import Artifact


def runner_options(backend: str, threads: int | None) -> dict[str, Any]:
    """Runner options for `--threads` (only backends that take a thread count)."""
    if threads is None:
        return {}
    if threads < 1:
        raise CstarError(f"--threads must be >= 1, got {threads}", "pass a positive thread count")
    from deploy.backends import runner_class

    if "intra_op_threads" in runner_class(backend).OPTIONS:
        return {"intra_op_threads": threads}
    return {}


def resolve_backend(artifact: Artifact, backend: str | None) -> str:
    """The backend to run: explicit, else the artifact's build backend (executorch-xnnpack for a .pte), else ort-cpu."""
    if backend:
        return backend
    return str(getattr(artifact, "default_backend", None) or artifact.backend or "ort-cpu")
