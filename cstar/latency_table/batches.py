"""The batch sizes a latency budget holds at (`--latency-batch`), and the host's CPU model the table records."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cstar.errors import CstarError
from cstar.manifest import cpu_model

LatencyBatches = int | str | Sequence[int]  # --latency-batch: 1, "1,8" or [1, 8]


def latency_batches(value: LatencyBatches) -> tuple[int, ...]:
    """The batch sizes a latency budget must hold at, first = the headline one (reported, and the one whose
    latency picks each layer's deploy form). Accepts 1, "1,8" or [1, 8]; CstarError on anything else."""
    items: list[Any]
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, (int, np.integer)):
        items = [value]
    else:
        try:
            items = list(value)
        except TypeError:
            items = [None]
    try:
        batches = tuple(int(item) for item in items)
        valid = bool(batches) and all(b >= 1 for b in batches) and all(
            not isinstance(item, (bool, float)) for item in items)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise CstarError(f"--latency-batch must be one batch size or a comma list of them (each >= 1), got {value!r}",
                         "pass e.g. --latency-batch 1, or --latency-batch 1,8 to meet the budget at both")
    return tuple(dict.fromkeys(batches))


def current_cpu_model() -> str:
    """CPU model name of this host (the same reading `deploy.report.cpu_model` records)."""
    return cpu_model()
