"""In-memory image datasets and the tensor helpers every loader shares.

`TensorImageDataset` (uint8 or float NCHW, optional random crop + flip), `DataBundle` (a spec and its
train/test splits), `to_tensors` (stack a subset into float32 images and int64 labels),
`stratified_indices` (deterministic class-stratified sample), and the loaders' `_resize` and
`_channel_stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from cstar.data.spec import DatasetSpec
from cstar.errors import CstarError


class TensorImageDataset(Dataset):
    """In-memory images (uint8 NCHW or float NCHW in [0,1]) with optional light augmentation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, augment: bool = False, crop_pad: int = 0) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be NCHW, got shape {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.augment = augment
        self.crop_pad = crop_pad

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
        if self.augment:
            image = _random_crop_flip(image, self.crop_pad)
        return image, self.labels[index]


def _random_crop_flip(image: torch.Tensor, pad: int) -> torch.Tensor:
    if pad > 0:
        _, height, width = image.shape
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        image = padded[:, top : top + height, left : left + width]
    if torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


@dataclass
class DataBundle:
    """A loaded dataset: its spec and the train/test splits."""

    spec: DatasetSpec
    train: Dataset
    test: Dataset

    def labels(self, split: str) -> np.ndarray:
        """Labels of a split as a numpy array (cheap for in-memory datasets)."""
        dataset = self.train if split == "train" else self.test
        if isinstance(dataset, TensorImageDataset):
            return dataset.labels.numpy()
        targets = getattr(dataset, "targets", None)
        if targets is not None:
            return np.asarray(targets)
        return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def to_tensors(
    dataset: Dataset, indices: Sequence[int] | np.ndarray | None = None, limit: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (a subset of) a dataset into float32 images and int64 labels."""
    if isinstance(dataset, TensorImageDataset) and not dataset.augment:
        chosen = torch.arange(len(dataset)) if indices is None else torch.as_tensor(np.asarray(indices))
        if limit is not None:
            chosen = chosen[:limit]
        images = dataset.images[chosen]
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return images.contiguous(), dataset.labels[chosen].clone()
    order = list(range(len(dataset))) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
    if limit is not None:
        order = order[:limit]
    pairs = [dataset[i] for i in order]
    return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs], dtype=torch.long)


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic class-stratified sample of `n` indices (as equal per class as possible)."""
    labels = np.asarray(labels)
    if n <= 0:
        raise CstarError(f"sample count must be positive, got {n}", "pass a positive number of samples")
    n = min(n, labels.shape[0])
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {int(c): rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    chosen: list[int] = []
    round_index = 0
    while len(chosen) < n:
        for c in classes:
            pool = per_class[int(c)]
            if round_index < pool.shape[0] and len(chosen) < n:
                chosen.append(int(pool[round_index]))
        round_index += 1
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _resize(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """Resize float NCHW images to size x size (bilinear, antialiased when shrinking)."""
    if size is None or images.shape[-1] == size and images.shape[-2] == size:
        return images
    shrinking = size < images.shape[-1]
    resized = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
    return resized.clamp(0.0, 1.0)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.float().transpose(0, 1).reshape(images.shape[1], -1)
    if images.dtype == torch.uint8:
        flat = flat / 255.0
    mean = tuple(round(float(v), 4) for v in flat.mean(dim=1))
    std = tuple(round(max(float(v), 1e-3), 4) for v in flat.std(dim=1))
    return mean, std
