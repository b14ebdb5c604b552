"""Dataclass configs that reject unknown keys (a typo must not be silently ignored)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from cstar.errors import CstarError

T = TypeVar("T")


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from `values`, refusing keys it does not define."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CstarError(
            f"unknown key(s) {unknown} in {where}",
            f"valid keys are: {', '.join(sorted(known))}",
        )
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a dataclass config, for manifests."""
    return dataclasses.asdict(config)
