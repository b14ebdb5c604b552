"""Dataclass configs that reject unknown keys (a typo must not be silently ignored)."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

from cstar.errors import CstarError
from cstar.validate import typed_value

T = TypeVar("T")

# adversarial training losses of `cstar train` and of compress's fine-tuning (torch-free, for the parsers);
# fgsm-rs and n-fgsm are fast AT: one gradient per batch (cstar.attacks.fast_example)
TRAIN_METHODS = ("pgd-at", "trades", "fgsm-rs", "n-fgsm")
# weight decay of factorized layers: on each factor, or on the product W they form (Frobenius decay)
FACTOR_DECAYS = ("factors", "frobenius")


def config_from_dict(cls: type[T], values: Any, where: str = "config") -> T:
    """Build dataclass `cls` from `values`, refusing keys it does not define and values of the wrong type.

    Types are checked against the field annotations before anything runs, so `epochs = "two"` or
    `backends = "ort-cpu"` (a string where a list belongs) is an error naming the key, not a late crash.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise CstarError(f"{where} must be a table of keys, got {values!r} ({type(values).__name__})",
                         "write it as a table: a [section] header followed by key = value lines")
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CstarError(
            f"unknown key(s) {unknown} in {where}",
            f"valid keys are: {', '.join(sorted(known))}",
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        typed_value(where, key, value, hints.get(key, Any))
    return cls(**values)


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-dict view of a dataclass config, for manifests."""
    return dataclasses.asdict(config)
