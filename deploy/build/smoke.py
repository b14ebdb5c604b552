"""The smoke inference every build ends with: the artifact opened once, zeros run at the smallest and largest
batch, so a broken artifact fails at build time and not on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cstar.errors import CstarError
from deploy.backends.registry import create_runner


def smoke_test(runner_name: str, model_path: Path, options: dict[str, Any], chw: tuple[int, int, int],
           high: int, n_classes: int) -> dict[str, Any]:
    """Open the built artifact once and run zeros at the smallest and largest batch."""
    runner = create_runner(runner_name, model_path, **options)
    with runner:
        lo, hi = runner.batch_range()
        sizes = sorted({lo, hi if hi is not None else high})
        widths = set()
        for size in sizes:
            out = runner.infer(np.zeros((size, *chw), dtype=np.float32))
            if out.shape[0] != size or not np.isfinite(out).all():
                raise CstarError(
                    f"smoke inference on {model_path.name} returned shape {out.shape} / non-finite logits",
                    "check the source artifact (re-run export/calibrate)",
                )
            widths.add(out.shape[1])
        spec = runner.input_spec
        description = runner.describe()
    if n_classes and widths != {n_classes}:
        raise CstarError(
            f"{model_path.name} outputs {sorted(widths)} logits, but the manifest lists {n_classes} classes",
            "re-export the model from the right checkpoint",
        )
    return {
        "batch_sizes": sizes,
        "num_classes": widths.pop(),
        "input": {"name": spec.name, "shape": list(spec.shape), "dtype": spec.dtype},
        "effective_batch": [lo, hi],
        "runner": description,
    }
