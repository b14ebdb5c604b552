"""Fashion-MNIST from its original IDX files (optionally gzip-compressed), read with numpy alone."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from cstar.data.registry import register_dataset
from cstar.data.spec import DatasetSpec
from cstar.data.tensors import DataBundle, TensorImageDataset, _resize
from cstar.errors import CstarError

FASHION_MNIST_DEFAULT_PATH = "/usr/share/datasets/fashion-mnist"

FASHION_CLASSES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (optionally gzip-compressed) into a numpy array."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise CstarError(f"{path} is not an unsigned-byte IDX file", "use the original Fashion-MNIST IDX files")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise CstarError(f"{path} is truncated ({body.size} bytes for shape {dims})", "re-download the file")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.is_file():
            return candidate
    raise CstarError(
        f"Fashion-MNIST file {stem}[.gz] not found in {root}",
        "expected train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
        "t10k-labels-idx1-ubyte.gz (apt-get install dataset-fashion-mnist puts them in "
        f"{FASHION_MNIST_DEFAULT_PATH})",
    )


@register_dataset("fashion-mnist")
def _load_fashion_mnist(path: str | None, image_size: int | None, augment: bool) -> DataBundle:
    root = Path(path or FASHION_MNIST_DEFAULT_PATH)
    if not root.is_dir():
        raise CstarError(
            f"Fashion-MNIST directory {root} does not exist",
            "apt-get install dataset-fashion-mnist, or pass --data fashion-mnist:/dir/with/idx/files",
        )
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
        if images.shape[0] != labels.shape[0]:
            raise CstarError(f"{root}: {split} images and labels differ in count", "re-download the files")
        tensor = torch.from_numpy(images.copy()).unsqueeze(1)
        if image_size is not None and image_size != 28:
            tensor = (_resize(tensor.float() / 255.0, image_size) * 255.0).round().to(torch.uint8)
        splits[split] = (tensor, torch.from_numpy(labels.astype(np.int64)))
    size = int(splits["train"][0].shape[-1])
    spec = DatasetSpec(
        name="fashion-mnist",
        input_shape=(1, size, size),
        classes=FASHION_CLASSES,
        mean=(0.2860,),
        std=(0.3530,),
        default_eps=0.1,
        path=str(root) if path else None,
        options={"image_size": size},
    )
    train = TensorImageDataset(*splits["train"], augment=augment, crop_pad=2 if augment else 0)
    return DataBundle(spec, train, TensorImageDataset(*splits["test"]))
