"""The knobs of `cstar verify`: the Square attack's budget and the gate thresholds, checked as user arguments.

The Square defaults are AutoAttack's (initial square fraction 0.8; 5000 queries with `--strict`), on a
class-stratified subset capped at 200 examples (1000 with `--strict`) so a default run stays short on a
CPU. Every value is checked before any work: a bad one is a bad argument (CstarError, exit 2), never a
gate that fails or passes by accident.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from cstar import validate
from cstar.errors import CstarError

SQUARE_SAMPLES_CAP = 200
SQUARE_STRICT_CAP = 1000
SQUARE_QUERIES = 1000
SQUARE_STRICT_QUERIES = 5000  # AutoAttack's Square budget
SQUARE_P_INIT = 0.8  # AutoAttack's


@dataclass
class Thresholds:
    """Gate thresholds: agreement fraction, clean and robust drops in percentage points."""

    min_agreement: float = 0.98
    max_clean_drop: float = 1.0
    max_robust_drop: float = 2.0

    def __post_init__(self) -> None:
        """Bad thresholds are bad arguments (exit 2), never a gate that fails or passes by accident."""
        self.min_agreement = validate.fraction("--min-agreement", self.min_agreement,
                                               "pass a fraction in [0, 1], e.g. --min-agreement 0.98")
        self.max_clean_drop = validate.in_range("--max-clean-drop", self.max_clean_drop, 0.0, 100.0,
                                                hint="pass accuracy points in [0, 100], e.g. --max-clean-drop 1")
        self.max_robust_drop = validate.in_range("--max-robust-drop", self.max_robust_drop, 0.0, 100.0,
                                                 hint="pass accuracy points in [0, 100], e.g. --max-robust-drop 2")

    def to_dict(self) -> dict[str, float]:
        """The thresholds as the report records them."""
        return {"min_agreement": self.min_agreement, "max_clean_drop": self.max_clean_drop,
                "max_robust_drop": self.max_robust_drop}


def square_plan(n: int, queries: int | None, samples: int | None, strict: bool) -> tuple[int, int]:
    """(queries per example, examples attacked) for a set of n: explicit values win, else the default
    (1000 queries on up to 200 examples) or --strict plan (5000 on up to 1000)."""
    queries = (SQUARE_STRICT_QUERIES if strict else SQUARE_QUERIES) if queries is None else queries
    samples = (SQUARE_STRICT_CAP if strict else SQUARE_SAMPLES_CAP) if samples is None else samples
    return queries, max(min(n, samples), 0)


def check_square_args(queries: int | None, samples: int | None, p_init: float, restarts: int, seed: int) -> None:
    """User errors in the Square options, before any work."""
    if (queries is not None and queries < 0) or (samples is not None and samples < 0):
        raise CstarError("--square-queries and --square-samples must be >= 0", "pass 0 to skip the Square attack")
    if not 0 < p_init <= 1:
        raise CstarError(f"--square-p-init must be in (0, 1], got {p_init}", f"use {SQUARE_P_INIT} (AutoAttack's)")
    if restarts < 1:
        raise CstarError(f"--square-restarts must be >= 1, got {restarts}", "pass 1 for a single Square run")
    if seed < 0:
        raise CstarError(f"--seed must be >= 0, got {seed}", "pass a non-negative seed")


def add_square_arguments(parser: argparse.ArgumentParser) -> None:
    """The Square attack's options (and --seed, which it uses), in `--help` order."""
    parser.add_argument("--square-queries", type=int, default=None,
                        help=f"Square queries per example and restart (default {SQUARE_QUERIES}; --strict "
                             f"{SQUARE_STRICT_QUERIES}; 0 = skip)")
    parser.add_argument("--square-samples", type=int, default=None,
                        help=f"examples attacked with Square (default: the set, capped at {SQUARE_SAMPLES_CAP}; "
                             f"--strict: capped at {SQUARE_STRICT_CAP})")
    parser.add_argument("--square-p-init", type=float, default=SQUARE_P_INIT,
                        help=f"Square initial square fraction (default {SQUARE_P_INIT}, AutoAttack's)")
    parser.add_argument("--square-restarts", type=int, default=1,
                        help="Square runs; each reruns the still-robust examples with a new seed and the full budget")
    parser.add_argument("--strict", action="store_true",
                        help=f"AutoAttack-strength Square: {SQUARE_STRICT_QUERIES} queries on every example of the "
                             f"set (up to {SQUARE_STRICT_CAP}) unless --square-queries/--square-samples say otherwise")
    parser.add_argument("--seed", type=int, default=0, help="Square attack seed")
