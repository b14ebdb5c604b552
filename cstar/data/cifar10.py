"""CIFAR-10 from the python pickle batches (a numpy-only unpickler) or from a train/ + test/ image tree."""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cstar.data.image_tree import _class_dirs, _load_image_tree
from cstar.data.registry import register_dataset
from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle, TensorImageDataset, _resize
from cstar.errors import CstarError

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR-10 batches that refuses every global but numpy's array reconstruction."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as handle:
            batch = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, ValueError, EOFError, TypeError) as exc:
        raise CstarError(f"{path} is not a valid CIFAR-10 python batch ({exc})", "re-download CIFAR-10") from exc
    return data, labels


def _find_split_root(root: Path, markers: Sequence[str]) -> Path | None:
    """`root` or its single subdirectory that holds all `markers`."""
    for candidate in [root, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if all((candidate / marker).exists() for marker in markers):
            return candidate
    return None


@register_dataset("cifar10", needs_path=True)
def _load_cifar10(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    """CIFAR-10 from the python pickle batches or from an ImageFolder tree (train/, test/)."""
    assert path is not None
    root = Path(path)
    layout = "data_batch_1..5 + test_batch (python version), or train/<class>/*.png|jpg + test/<class>/..."
    if not root.is_dir():
        raise CstarError(f"CIFAR-10 directory {root} does not exist", f"expected layout: {layout}")
    pickle_root = _find_split_root(root, [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])
    if pickle_root is not None:
        parts = [_read_cifar_batch(pickle_root / f"data_batch_{i}") for i in range(1, 6)]
        train_x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        train_y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
        test_np = _read_cifar_batch(pickle_root / "test_batch")
        test_x, test_y = torch.from_numpy(test_np[0]), torch.from_numpy(test_np[1])
        if image_size is not None and image_size != 32:
            train_x = (_resize(train_x.float() / 255, image_size) * 255).round().to(torch.uint8)
            test_x = (_resize(test_x.float() / 255, image_size) * 255).round().to(torch.uint8)
        classes: Sequence[str] = CIFAR10_CLASSES
    else:
        folder_root = _find_split_root(root, ["train", "test"])
        if folder_root is None:
            raise CstarError(f"{root} is neither CIFAR-10 python batches nor an image tree", f"expected: {layout}")
        classes = _class_dirs(folder_root / "train")
        if len(classes) != 10 or _class_dirs(folder_root / "test") != list(classes):
            raise CstarError(
                f"{folder_root}: expected the same 10 class folders in train/ and test/, found {classes}",
                f"expected layout: {layout}",
            )
        train_x, train_y = _load_image_tree(folder_root / "train", classes, image_size)
        test_x, test_y = _load_image_tree(folder_root / "test", classes, image_size)
    size = int(train_x.shape[-1])
    spec = DatasetSpec(
        name="cifar10",
        input_shape=(3, size, size),
        classes=tuple(classes),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        default_eps=8 / 255,
        path=str(root),
        options={"image_size": size, "format": "pickle" if pickle_root is not None else "imagefolder"},
    )
    train = TensorImageDataset(train_x, train_y, augment=augment, crop_pad=4 if augment else 0)
    return DataBundle(spec, train, TensorImageDataset(test_x, test_y))
