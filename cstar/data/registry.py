"""The dataset registry: loaders register under a name (`register_dataset`), `--data` strings pick one.

A `--data` string is `name` or `name:path` (`parse_dataset_arg`); `load_dataset` runs the loader,
`load_dataset_from_spec` reloads what a manifest recorded. The loaders register themselves when their
module is imported (`cstar/data/__init__.py` imports them all).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle
from cstar.errors import CstarError
from cstar.validate import classes as check_classes

Loader = Callable[[str | None, int | None, bool], DataBundle]
_REGISTRY: dict[str, Loader] = {}
_NEEDS_PATH: set[str] = set()


def register_dataset(name: str, needs_path: bool = False) -> Callable[[Loader], Loader]:
    """Decorator adding a loader `(path, image_size, augment) -> DataBundle` to the registry."""

    def wrap(loader: Loader) -> Loader:
        _REGISTRY[name] = loader
        if needs_path:
            _NEEDS_PATH.add(name)
        return loader

    return wrap


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def parse_dataset_arg(arg: str) -> tuple[str, str | None]:
    """'fashion-mnist:/data/fm' -> ('fashion-mnist', '/data/fm'); 'digits' -> ('digits', None)."""
    name, _, path = arg.partition(":")
    name = name.strip().lower()
    if name not in _REGISTRY:
        raise CstarError(
            f"unknown dataset '{name}'",
            f"valid datasets: {', '.join(dataset_names())} (path-based ones take NAME:PATH)",
        )
    if name in _NEEDS_PATH and not path:
        raise CstarError(f"dataset '{name}' needs a path", f"pass --data {name}:/path/to/data")
    return name, (path or None)


def load_dataset(arg: str, image_size: int | None = None, augment: bool = False) -> DataBundle:
    """Load a dataset by registry string (`name` or `name:path`)."""
    name, path = parse_dataset_arg(arg)
    if image_size is not None and image_size < 4:
        raise CstarError(f"image size {image_size} is too small", "use an image size of at least 4 pixels")
    bundle = _REGISTRY[name](path, image_size, augment)
    check_classes(bundle.spec.classes, f"dataset {arg}")
    return bundle


def load_dataset_from_spec(spec: DatasetSpec | dict[str, Any], augment: bool = False) -> DataBundle:
    """Reload the dataset a manifest recorded (same name, path and image size)."""
    spec = spec if isinstance(spec, DatasetSpec) else DatasetSpec.from_dict(spec)
    return load_dataset(spec.data_arg, image_size=spec.input_shape[-1], augment=augment)
