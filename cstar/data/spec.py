"""`DatasetSpec`: what a model and every later stage need to know about a dataset.

Manifests record it (`to_dict`) so later stages can rebuild the same view of the data (`from_dict`,
`data_arg`). Torch-free.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and every later stage need to know about a dataset."""

    name: str
    input_shape: tuple[int, int, int]
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_eps: float
    path: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def data_arg(self) -> str:
        """The `--data` string that reloads this dataset."""
        return self.name if self.path is None else f"{self.name}:{self.path}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DatasetSpec:
        return cls(
            name=values["name"],
            input_shape=tuple(values["input_shape"]),
            classes=tuple(values["classes"]),
            mean=tuple(values["mean"]),
            std=tuple(values["std"]),
            default_eps=float(values["default_eps"]),
            path=values.get("path"),
            options=dict(values.get("options", {})),
        )
