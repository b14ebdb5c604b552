"""Runtime side: backends, engine building, inference, benchmark, robustness verification, reports.

The device-side modules (backends, verify, bench, predict) import numpy and the runtime only, never torch.
`deploy.load(directory)` is the one-line way to run an exported, calibrated or built artifact.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deploy.artifact import Predictor

__all__ = ["load"]


def load(directory: str | Path, backend: str | None = None, **options: Any) -> Predictor:
    """A Predictor for an export, calibrate or build directory (verified by sha256, activated lazily)."""
    from deploy.artifact import Predictor, load_artifact

    return Predictor(load_artifact(directory), backend, **options)
