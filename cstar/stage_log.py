"""One stage-progress logger for every stage: lines to stderr when progress is on, on rank 0 only
under torchrun (checked lazily, so torch-free stages never import torch for it)."""

from __future__ import annotations

import sys


class StageLog:
    """`log(message)` prints `prefix + message` to stderr when `enabled`; `log.enabled` says whether it will."""

    def __init__(self, enabled: bool, prefix: str = "", main_rank_only: bool = False) -> None:
        self.enabled = enabled
        self.prefix = prefix
        self.main_rank_only = main_rank_only

    def __call__(self, message: str) -> None:
        if not self.enabled:
            return
        if self.main_rank_only:
            from cstar import distributed as dist

            if not dist.is_main():
                return
        print(f"{self.prefix}{message}", file=sys.stderr, flush=True)
